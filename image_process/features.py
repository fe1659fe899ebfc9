"""Per-spot image features: map spots onto the slide image, check them, run the chosen encoder."""
from __future__ import annotations

import logging

import numpy as np

from data import keys
from data.errors import InputError
from data.lattice import is_hex_grid
from image_process.encoders import build_encoder
from image_process.patches import check_spots_on_image, choose_image
from positions_enhancement.spatial_weights import estimate_spot_spacing

log = logging.getLogger("stpipe")


VISIUM_DIAMETER_SHARE = 0.65   # spot_diameter_fullres / spacing as Space Ranger writes it (65 um / 100 um)
ST_DIAMETER_SHARE = 0.5        # legacy ST: 100 um spots 200 um apart
MAX_PATCH_SPACINGS = 10   # image.patch_size_fullres larger than this many spot spacings is refused


def spot_diameter_fullres(adata, image_cfg: dict | None = None) -> float:
    """Spot diameter in full-resolution pixels: ``image.patch_size_fullres`` if set, else Space
    Ranger's ``spot_diameter_fullres``, else a share of the spot spacing: 0.65 on a Visium (hexagonal)
    array, as Space Ranger defines it (a 65 um spot on the 100 um grid), 0.5 otherwise (legacy ST:
    100 um spots, 200 um grid). The share matters for an .h5ad without scale factors."""
    image_cfg = image_cfg or {}
    arr = adata.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy() if keys.ARRAY_COL in adata.obs else None
    if image_cfg.get("patch_size_fullres"):
        size = float(image_cfg["patch_size_fullres"])
        spacing = estimate_spot_spacing(adata.obsm[keys.SPATIAL], arr)
        if size > MAX_PATCH_SPACINGS * spacing:       # ~10^4 such patches would take hours, for no meaning
            raise InputError(f"image.patch_size_fullres={size:g}: {size / spacing:.0f} spot spacings ({spacing:.0f} "
                             f"full-resolution px here); a patch is about one spot (at most {MAX_PATCH_SPACINGS}). "
                             "It is in full-resolution pixels; null takes the spot diameter.")
        return size
    sf = keys.scalefactors(adata)
    stated = sf.get("spot_diameter_fullres")
    if stated is not None:
        try:
            size = float(stated)
        except (TypeError, ValueError):
            size = float("nan")
        spacing = estimate_spot_spacing(adata.obsm[keys.SPATIAL], arr)
        if not 0 < size <= MAX_PATCH_SPACINGS * spacing:     # NaN too
            raise InputError(f"the slide's spot_diameter_fullres={stated!r} (its scale factors: scalefactors_json.json "
                             f"or uns['spatial'][library]['scalefactors']) is not a spot's diameter: the spots are "
                             f"{spacing:.0f} full-resolution px apart, and a spot is about 0.5-0.65 of that. Fix it, "
                             "or set image.patch_size_fullres (full-resolution pixels).")
        return size
    share = VISIUM_DIAMETER_SHARE if is_hex_grid(arr) else ST_DIAMETER_SHARE
    return share * estimate_spot_spacing(adata.obsm[keys.SPATIAL], arr)


def spot_image_features(adata, image_cfg: dict, device: str = "cpu", image=None) -> tuple[np.ndarray, dict]:
    """Features of every spot's patch from the slide's best image.

    Returns (features (n_spots, d) float32, info). With no image (or ``image.use: none``) returns
    an (n_spots, 0) array: the pipeline then goes on with genes and coordinates only.
    Patch side = spot diameter (full-res px, see :func:`spot_diameter_fullres`) x image scale
    factor, so the same tissue area is used whichever image (full-res, hires, lowres) is present.
    ``image``: the slide's :class:`SlideImage` when the caller has already read it (and closes it); else the
    image is read here and closed before returning.
    """
    use = image_cfg.get("use", "auto")
    if use == "none":
        return np.zeros((adata.n_obs, 0), np.float32), {"image": None}
    if image is None:
        image = choose_image(adata, use)
        if image is None:
            log.info("no image for this slide: continuing with genes and coordinates only")
            return np.zeros((adata.n_obs, 0), np.float32), {"image": None}
        try:
            return spot_image_features(adata, image_cfg, device, image=image)
        finally:
            image.close()
    diameter = spot_diameter_fullres(adata, image_cfg)
    if image_cfg.get("check_tissue", True):
        check_spots_on_image(adata.obsm[keys.SPATIAL], image, diameter)
    centers = adata.obsm[keys.SPATIAL] * image.scale
    spot_px = diameter * image.scale
    encoder = build_encoder(image_cfg.get("encoder", "handcrafted"), image_cfg.get("weights"),
                            **(image_cfg.get("options") or {}))
    feats = encoder.encode(image.pixels, centers, spot_px, device=device)
    if not np.all(np.isfinite(feats)):
        raise InputError(f"{image.source}: the encoder produced non-finite features.")
    info = {"image": image.source, "image_scale": image.scale, "spot_diameter_fullres": diameter,
            "spot_diameter_image_px": spot_px, "encoder": image_cfg.get("encoder", "handcrafted"),
            "n_features": int(feats.shape[1])}
    if spot_px < 3:
        log.warning("spots are only %.1f px wide in %s: image features will be coarse", spot_px, image.source)
    return feats, info
