"""Choosing the image of a slide, mapping spots onto it, checking they land on tissue, cutting patches.

Units: ``obsm['spatial']`` is in full-resolution pixels. An image of the slide is either the
full-resolution image itself (scale 1), or Space Ranger's hires/lowres PNG, whose pixel = full-res
pixel x ``tissue_{hires,lowres}_scalef``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from data import keys
from data.errors import InputError
from data.readers import refuse_if_flat, warn_if_grey
from data.wsi import TiledPixels, open_fullres_pixels

log = logging.getLogger("stpipe")
IMAGE_KINDS = keys.IMAGE_KINDS                 # image.use values, best first (auto takes the first present)
IMAGE_USES = ("auto", *IMAGE_KINDS, "none")     # every value image.use takes


@dataclass
class SlideImage:
    """An image of the slide and how to map full-resolution pixels onto it."""
    pixels: np.ndarray   # (H, W, 3) uint8 RGB, or data.wsi.TiledPixels (a tiled full-resolution image)
    scale: float         # image pixels per full-resolution pixel
    source: str          # file it came from (for error messages)
    scale_source: str    # where the scale came from (for error messages)

    def close(self) -> None:
        """Close the file a streamed full-resolution image (:class:`data.wsi.TiledPixels`) reads from; nothing
        to do for pixels held as an array. A stage calls it once its last patch is cut (:func:`close_image`)."""
        if isinstance(self.pixels, TiledPixels):
            self.pixels.close()


def close_image(image: SlideImage | None) -> None:
    """:meth:`SlideImage.close` of ``image``, when there is one (``image.use: none`` gives None)."""
    if image is not None:
        image.close()


def shrink_image(pixels: np.ndarray, scale: float, max_side: int) -> tuple[np.ndarray, float]:
    """(``pixels`` shrunk to at most ``max_side`` px on its longest side (area interpolation), its
    scale in image px per full-resolution px); unchanged when already small enough. ``scale``: the
    input's image px per full-resolution px."""
    f = min(1.0, max_side / max(pixels.shape[:2]))
    if isinstance(pixels, TiledPixels):
        small, factor = pixels.shrunk(max_side)
        return small, float(scale * factor)
    if f >= 1.0:
        return pixels, float(scale)
    import cv2
    small = cv2.resize(pixels, (max(1, round(pixels.shape[1] * f)), max(1, round(pixels.shape[0] * f))),
                       interpolation=cv2.INTER_AREA)
    return small, float(scale * small.shape[1] / pixels.shape[1])


def scanpy_spatial_entry(image: SlideImage | None, spot_diameter_fullres: float | None, max_side: int = 2000,
                         metadata: dict | None = None) -> dict:
    """One ``uns['spatial'][library_id]`` entry, so that ``sc.pl.spatial`` / ``sq.pl.spatial_scatter``
    draw an output over its H&E: ``images['hires']`` = ``image`` shrunk to at most ``max_side`` px
    (uint8 RGB), ``scalefactors['tissue_hires_scalef']`` = its pixels per full-resolution pixel,
    ``scalefactors['spot_diameter_fullres']`` = the size of one location (full-resolution px; for a
    grid, its spacing). Without an image, only the spot diameter (plot with ``img_key=None``)."""
    scalefactors = {} if spot_diameter_fullres is None else {"spot_diameter_fullres": float(spot_diameter_fullres)}
    images = {}
    if image is not None:
        px, scale = shrink_image(image.pixels, image.scale, max_side)
        images["hires"] = np.ascontiguousarray(px, dtype=np.uint8)
        scalefactors["tissue_hires_scalef"] = scale
    return {"images": images, "scalefactors": scalefactors,
            "metadata": dict(metadata or {}, **({"image": image.source} if image is not None else {}))}


def add_plot_image(adata, spot_diameter_fullres: float, prefer: str = "auto", max_side: int = 2000) -> bool:
    """When the slide's ``uns['spatial']`` entry holds no image but names a full-resolution one
    (legacy ST with ``data.image``), add a <= ``max_side`` px copy as ``images['hires']`` with its
    ``tissue_hires_scalef`` (and ``spot_diameter_fullres`` when unknown), so scanpy/squidpy draw the
    outputs over the H&E. Changes nothing else; returns whether an image was added."""
    lib = keys.library_id(adata)
    if lib is None or prefer == "none":
        return False
    entry = adata.uns[keys.SPATIAL_UNS][lib]
    if entry.get("images") or not (entry.get("metadata") or {}).get("fullres_path"):
        return False
    image = choose_image(adata, "fullres")
    try:
        plot = scanpy_spatial_entry(image, spot_diameter_fullres, max_side)
    finally:
        image.close()
    entry["images"] = plot["images"]
    entry["scalefactors"] = {**plot["scalefactors"], **dict(entry.get("scalefactors") or {})}
    return True


def choose_image(adata, prefer: str = "auto") -> SlideImage | None:
    """The best available image: full-resolution (``data.image``) > hires > lowres; None if none.

    ``prefer`` may force one of ``fullres``, ``hires``, ``lowres``.
    """
    lib = keys.library_id(adata)
    if lib is None:
        return None
    entry = adata.uns[keys.SPATIAL_UNS][lib]
    meta = entry.get("metadata", {}) or {}
    images = entry.get("images", {}) or {}
    sf = entry.get("scalefactors", {}) or {}
    order = list(IMAGE_KINDS) if prefer in (None, "auto") else [prefer]
    files = meta.get("image_files", {}) or {}
    for kind in order:
        if kind == "fullres" and meta.get("fullres_path"):
            placement = meta.get(keys.FULLRES_PLACEMENT)
            image = SlideImage(open_fullres_pixels(meta["fullres_path"], placement=placement), 1.0, meta["fullres_path"],
                               "full resolution (scale 1)" if placement is None else
                               f"full resolution, placed by the affine {np.round(np.asarray(placement), 4).tolist()}")
        elif kind in images:
            image = SlideImage(np.asarray(images[kind]), float(sf[f"tissue_{kind}_scalef"]),
                               files.get(kind, f"uns['spatial']['{lib}']['images']['{kind}']"),
                               f"tissue_{kind}_scalef={sf[f'tissue_{kind}_scalef']} in scalefactors_json.json")
        else:
            continue
        pixels = image.pixels if isinstance(image.pixels, np.ndarray) else image.pixels.shrunk(1024)[0]
        refuse_if_flat(pixels, image.source)
        warn_if_grey(pixels, image.source)
        return image
    if prefer not in (None, "auto"):
        if prefer not in IMAGE_USES:
            raise InputError(f"image.use={prefer!r}: choose auto, fullres, hires, lowres or none.")
        have = [k for k in IMAGE_KINDS if k in images or (k == "fullres" and meta.get("fullres_path"))]
        raise InputError(f"image.use={prefer!r} but the slide has no {prefer} image (it has: "
                         f"{', '.join(have) or 'none'}; image.use=auto takes the best there is).")
    return None


def tissue_mask(rgb: np.ndarray, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """Foreground (stained tissue) mask of an H&E image, computed at most ``max_side`` px wide.

    Tissue is where saturation is above an Otsu threshold or the pixel is clearly darker than the
    background. Returns (mask, scale) with mask pixel = image pixel x scale.
    """
    mask, _, scale = _tissue_layers(rgb, max_side)
    return mask, scale


def _tissue_layers(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(tissue mask, stained mask = the saturation criterion alone, scale); see :func:`tissue_mask`."""
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if isinstance(rgb, TiledPixels):
        small, scale = rgb.shrunk(max_side)
    else:
        small = cv2.resize(rgb, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA) \
            if scale < 1 else rgb
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    sat = cv2.GaussianBlur(hsv[..., 1], (5, 5), 0)
    thr, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(float)
    background = np.percentile(gray, 95)
    stained = sat > max(thr, 15)
    mask = stained | (gray < background - 40)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)) > 0
    return mask, stained, scale


def slide_tissue(rgb: np.ndarray, min_area: float, max_side: int = 1024,
                 min_stained: float = 0.25) -> tuple[np.ndarray, float]:
    """Tissue of a slide with no spots to go by (a whole-slide image): :func:`tissue_mask` without
    the pieces that are not stained tissue. Returns (mask, scale) as :func:`tissue_mask` does.

    A connected piece is kept when at least ``min_stained`` of its pixels are stained (the saturation
    criterion) and it covers at least ``min_area`` image pixels (e.g. one grid cell). What goes:
    grey pieces that are only darker than the background -- array frames and fiducials, scanner
    shading at the edges, black pen marks, dark slide edges (on the her2st and MOB images real
    tissue pieces have ~87% stained pixels, such pieces <= 9%) -- and specks smaller than a grid
    cell. The whole mask is returned when nothing would be left (e.g. a greyscale image)."""
    import cv2

    mask, stained, scale = _tissue_layers(rgb, max_side)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask, scale
    area = stats[1:, 4]
    stained_px = np.bincount(lab.ravel(), weights=stained.ravel(), minlength=n)[1:]
    keep = (stained_px >= min_stained * area) & (area >= min_area * scale ** 2)
    return (np.isin(lab, np.flatnonzero(keep) + 1) if keep.any() else mask), scale


def main_tissue(mask: np.ndarray) -> np.ndarray:
    """The mask's main tissue pieces: components not touching the border (slide frames, fiducials)
    and at least 10% the size of the largest; the whole mask if nothing is left."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    h, w = mask.shape
    x, y, bw, bh, area = stats[1:].T
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    if not inner.any():
        return mask
    keep = np.flatnonzero(inner & (area >= 0.1 * area[inner].max())) + 1
    return np.isin(lab, keep)


# refuse x/y when (y, x) lands on the tissue by this much more: on the 10 real slides here the right order
# beat the swapped one by 0.09-0.43 (DEVLOG 106)
SWAP_MARGIN = 0.05


def _fraction_on_mask(xy_image_px: np.ndarray, mask: np.ndarray, mscale: float) -> float:
    """Share of points (image px) inside the image and on the mask (mask px = image px x ``mscale``)."""
    mx, my = (xy_image_px[:, 0] * mscale).astype(int), (xy_image_px[:, 1] * mscale).astype(int)
    inside = (mx >= 0) & (my >= 0) & (mx < mask.shape[1]) & (my < mask.shape[0])
    return float(np.mean(inside & mask[np.clip(my, 0, mask.shape[0] - 1), np.clip(mx, 0, mask.shape[1] - 1)]))


def _unscaled_hint(coords: np.ndarray, image: SlideImage, mask: np.ndarray, mscale: float) -> str:
    """A sentence for the error when the coordinates fit the tissue *without* the scale factor, i.e. they
    are already pixels of this image (a tool that stored hires/lowres pixels in obsm['spatial'])."""
    if image.scale >= 0.99 or _fraction_on_mask(coords, mask, mscale) < 0.8:
        return ""
    return (" Unscaled, the coordinates land on the tissue: they look like pixels of this image already, "
            "but obsm['spatial'] (and Space Ranger's positions) must be full-resolution pixels; divide them "
            f"by the image's scale factor ({image.scale:g}) or give the positions in full-resolution pixels.")


def _downscaled_hint(xy_image_px: np.ndarray, image: SlideImage) -> str:
    """A sentence for the error when an image taken as full resolution is much smaller than the spots'
    extent: most likely a downscaled copy (Space Ranger's hires/lowres PNG) given as ``data.image``."""
    h, w = image.pixels.shape[:2]
    ratio = max(xy_image_px[:, 0].max() / w, xy_image_px[:, 1].max() / h)
    if image.scale < 0.99 or ratio < 1.5:
        return ""
    return (f" The spots span up to {ratio:.1f} times this image's size, and it is read as full resolution: "
            "data.image must be the full-resolution H&E the positions were registered to. A downscaled image "
            "(Space Ranger's tissue_hires/lowres PNG) is read with its scale factor from the Space Ranger "
            "folder: unset data.image.")


def check_spots_on_image(coords_fullres: np.ndarray, image: SlideImage, spot_diameter_fullres: float,
                         min_on_tissue: float = 0.5, min_cover: float = 0.2) -> None:
    """Raise :class:`InputError` when spots fall outside the image or mostly off the tissue.

    Also refused: spots whose bounding box covers less than ``min_cover`` of the tissue's (a scale
    factor that is too small squeezes them into a corner). All are the symptoms of a wrong scale
    factor or of an image from another slide.
    """
    xy = coords_fullres * image.scale
    h, w = image.pixels.shape[:2]
    mask, mscale = tissue_mask(image.pixels)
    margin = 0.5 * spot_diameter_fullres * image.scale
    outside = (xy[:, 0] < -margin) | (xy[:, 1] < -margin) | (xy[:, 0] > w + margin) | (xy[:, 1] > h + margin)
    if outside.mean() > 0.01:
        raise InputError(
            f"{image.source}: {outside.sum()} of {len(xy)} spots fall outside this {w}x{h} image "
            f"(spot extent x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}..{xy[:, 1].max():.0f} "
            f"image px, using {image.scale_source}). The scale factor or the image is wrong for these spots."
            + _unscaled_hint(coords_fullres, image, mask, mscale) + _downscaled_hint(xy, image))
    if outside.any():   # a few strays (<= 1%) are tolerated, but said
        log.warning("%s: %d of %d spots fall outside the image (first: %s); their patches repeat the image border.",
                    image.source, int(outside.sum()), len(xy), np.flatnonzero(outside)[:3].tolist())
    mx = np.clip((xy[:, 0] * mscale).astype(int), 0, mask.shape[1] - 1)
    my = np.clip((xy[:, 1] * mscale).astype(int), 0, mask.shape[0] - 1)
    on = mask[my, mx].mean()
    if mask.mean() > 0.02 and on < min_on_tissue:
        raise InputError(
            f"{image.source}: only {on:.0%} of spots land on tissue when mapped with {image.scale_source}. "
            "The scale factor is probably wrong (or the image belongs to another slide): check the "
            "scale factor against the image size the spot coordinates were registered to. (If the spots "
            "really lie mostly off the tissue, --set image.check_tissue=false skips this check.)"
            + _unscaled_hint(coords_fullres, image, mask, mscale))
    if mask.mean() > 0.02:
        given, swapped = _fraction_on_mask(xy, mask, mscale), _fraction_on_mask(xy[:, ::-1], mask, mscale)
        if swapped >= 0.8 and swapped > given + SWAP_MARGIN:
            raise InputError(
                f"{image.source}: the spots land on the tissue better with x and y swapped ({swapped:.0%} vs "
                f"{given:.0%}): the coordinates look like (row, column). Spot positions must be (x, y) = "
                "(column, row) in full-resolution pixels, as obsm['spatial'] holds them in scanpy; swap the two "
                "columns (e.g. adata.obsm['spatial'] = adata.obsm['spatial'][:, ::-1]). If they are right, "
                "--set image.check_tissue=false skips this check.")
        ty, tx = np.nonzero(main_tissue(mask))
        tissue_box = np.ptp(np.percentile(tx, [1, 99])) * np.ptp(np.percentile(ty, [1, 99])) / mscale ** 2
        spot_box = (np.ptp(xy[:, 0]) + 2 * margin) * (np.ptp(xy[:, 1]) + 2 * margin)
        if tissue_box > 0 and spot_box / tissue_box < min_cover:
            raise InputError(
                f"{image.source}: the spots cover only {spot_box / tissue_box:.0%} of the tissue's extent when "
                f"mapped with {image.scale_source}. The scale factor is probably too small for this image; "
                "if the slide was subset to a region on purpose, --set image.check_tissue=false skips this check."
                + _unscaled_hint(coords_fullres, image, mask, mscale))


MAX_PATCH_UPSAMPLING = 2.0   # a network's patch resampled more than this many times up has no real detail


def patch_too_coarse(side_px: float, out_px: int) -> bool:
    """Whether a patch of ``side_px`` image pixels would be upsampled more than
    ``MAX_PATCH_UPSAMPLING`` times to ``out_px`` (the stage-4 and stage-5 patch CNNs' rule)."""
    return float(side_px) * MAX_PATCH_UPSAMPLING < int(out_px)


def patch_cnn_wanted(use, sides: dict, px: int, scale: float, what: str, key: str, image_key: str) -> bool:
    """The stage-4 and stage-5 rule for training a patch CNN. ``use``: auto | true | false (``key``, the
    setting's name in messages); ``sides``: {section name: (patch side in its image's px, that image)}
    for every section it would learn from; ``px``: the network's patch side; ``what``: the CNN, as the log
    names it; ``image_key``: where a full-resolution image is given. ``auto``: only when no section's patch
    is upsampled to ``px`` more than 2x (:func:`patch_too_coarse`), with a log line when it is off;
    ``true``: always, with a warning when some are."""
    if not use:
        return False
    coarse = ", ".join(f"{name} ({side:.0f} px of {source})" for name, (side, source) in sides.items()
                       if patch_too_coarse(side, px))
    if not coarse:
        return True
    if use == "auto":
        log.info("%s is off: a patch of %.1f spot diameters is below %d px in %s (a full-resolution image, %s, "
                 "would give it detail; %s=true forces it)", what, float(scale), int(px) // 2, coarse, image_key, key)
        return False
    log.warning("%s=true, but its patches are upsampled more than 2x to %d px in %s; a full-resolution image (%s) "
                "would give it real detail", key, int(px), coarse, image_key)
    return True


def extract_patches(rgb: np.ndarray, centers_xy: np.ndarray, size_px: float, out_size: int,
                    threads: int | None = None) -> np.ndarray:
    """Square patches of side ``size_px`` image pixels centred on each spot, resized to ``out_size``.

    centers_xy: (n, 2) (x, y) in the image's pixels. Borders are replicated. Returns
    (n, out_size, out_size, 3) uint8. Many large patches (a full-resolution image's) are cut in up to
    ``threads`` threads (default :func:`image_process.process_pool.default_workers`; OpenCV's calls
    release the GIL): each patch is cut exactly as in one thread, so the result is the same.
    """
    import cv2

    from image_process.process_pool import default_workers

    side = max(2, int(round(size_px)))
    out = np.empty((len(centers_xy), out_size, out_size, 3), dtype=np.uint8)
    interp = cv2.INTER_AREA if side >= out_size else cv2.INTER_LINEAR
    centers_xy = np.asarray(centers_xy, float).reshape(-1, 2)
    sources = (_regions_by_block(rgb, centers_xy, side) if isinstance(rgb, TiledPixels)
               else [(range(len(centers_xy)), rgb, (0, 0))])
    threads = default_workers() if threads is None else max(1, int(threads))

    def cut(rows, pixels, x0, y0):
        for i in rows:
            patch = cv2.getRectSubPix(pixels, (side, side), (float(centers_xy[i, 0] - x0), float(centers_xy[i, 1] - y0)))
            out[i] = cv2.resize(patch, (out_size, out_size), interpolation=interp) if side != out_size else patch

    for rows, pixels, (x0, y0) in sources:
        rows = np.asarray(rows)
        if threads == 1 or len(rows) * side * side < THREAD_ABOVE_PX:
            cut(rows, pixels, x0, y0)
            continue
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:   # rows written by one thread each
            list(pool.map(lambda chunk: cut(chunk, pixels, x0, y0), np.array_split(rows, 4 * threads)))
    return out


THREAD_ABOVE_PX = 4_000_000   # patches are cut in threads when they hold more source pixels than this (~10 ms of work)


READ_BLOCK_PX = 2048   # a tiled image is read in blocks of this many px (plus a patch's margin) a side


def _regions_by_block(pixels: TiledPixels, centers_xy: np.ndarray, side: int):
    """For a tiled image, the spots grouped by the ``READ_BLOCK_PX`` block their centre falls in
    (centres off the image go to the nearest block), each block read once with a margin of half a
    patch: yields (spot indices, region (h, w, 3), (x0, y0) of the region in image px). The region
    is clipped to the image, so ``cv2.getRectSubPix`` replicates the image's own border there, as it
    does on a whole array, and a patch of a spot inside the block lies wholly inside its region."""
    h, w = pixels.shape[:2]
    margin = side // 2 + 2
    bx = np.clip(np.floor(centers_xy[:, 0] / READ_BLOCK_PX), 0, max(0, (w - 1) // READ_BLOCK_PX)).astype(int)
    by = np.clip(np.floor(centers_xy[:, 1] / READ_BLOCK_PX), 0, max(0, (h - 1) // READ_BLOCK_PX)).astype(int)
    for key in np.unique(np.stack([by, bx], 1), axis=0):
        rows = np.flatnonzero((by == key[0]) & (bx == key[1]))
        x0 = max(0, int(key[1]) * READ_BLOCK_PX - margin)
        y0 = max(0, int(key[0]) * READ_BLOCK_PX - margin)
        region = pixels.region(x0, y0, (int(key[1]) + 1) * READ_BLOCK_PX + margin, (int(key[0]) + 1) * READ_BLOCK_PX + margin)
        yield rows, region, (x0, y0)
