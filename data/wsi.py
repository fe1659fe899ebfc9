"""Whole-slide image reading, region by region (never the whole level-0 image at once).

:func:`open_whole_slide` returns a :class:`WholeSlide` with

* ``size`` -- (width, height) of level 0 in pixels;
* ``mpp`` -- microns per level-0 pixel read from the file (OpenSlide's ``openslide.mpp-x``, or the
  TIFF resolution tags), None when the file does not say;
* ``read_region(x, y, w, h)`` -- an (h, w, 3) uint8 RGB array of level 0; areas outside the slide
  come back white;
* ``thumbnail(max_side)`` -- a downsampled RGB image and its scale (thumbnail px per level-0 px),
  built tile by tile from the best pyramid level, so memory stays bounded by the tile size.

Backends: tifffile + zarr for a plain tiled ``.tif``/``.tiff`` (pyramidal or not; what OpenSlide
calls "generic-tiff") and for an Aperio ``.svs`` whose pixels it reads as OpenSlide does (checked
when the file is opened); OpenSlide for other formats (``.ndpi``, ``.mrxs``, vendor TIFFs, ...) when it
can open the file; a plain image (JPG/PNG/untiled TIFF) is read whole with OpenCV/Pillow (an untiled,
uncompressed TIFF is memory-mapped instead); zarr for an OME-Zarr image folder (a SpatialData store's
``images/<name>``, :class:`OmeZarrImage`). A JPEG or PNG cannot be read in parts: one too large to
decode whole is refused by :func:`data.readers.read_image` with the fix, :func:`write_tiled_tiff`
(``python -m data.wsi IN.jpg OUT.tif``), which rewrites it once as a tiled pyramid read block by block.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data.errors import InputError

log = logging.getLogger("stpipe")
TILE = 2048   # pixels (at the level read) per read when building a thumbnail


class WholeSlide:
    """A slide read region by region. ``close()`` (or ``with open_whole_slide(path) as slide:``) releases the file
    it holds open; a slide read whole or from memory holds none."""
    size: tuple[int, int]
    mpp: float | None
    source: str

    def close(self) -> None:
        """Release the open file (OpenSlide's handle, tifffile's stores); reading afterwards is an error."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read_whole(self, band: int = TILE) -> np.ndarray:
        """Level 0 whole as (H, W, 3) uint8, read ``band`` rows at a time, so that memory holds the result and
        one band's decoded pixels, not a whole decoded copy beside it."""
        width, height = self.size
        out = np.empty((height, width, 3), np.uint8)
        for y in range(0, height, band):
            out[y:y + band] = self.read_region(0, y, width, min(band, height - y))
        return out

    def _best_level_for(self, downsample: float):
        return None

    def _downsample(self, level) -> float:
        return 1.0

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """(thumbnail (h, w, 3) uint8, scale = thumbnail px per level-0 px), built tile by tile."""
        import cv2

        W, H = self.size
        scale = min(1.0, max_side / max(W, H))
        tw, th = max(1, int(round(W * scale))), max(1, int(round(H * scale)))
        thumb = np.full((th, tw, 3), 255, np.uint8)
        level = self._best_level_for(1 / scale)
        step = max(1, int(TILE * self._downsample(level)))   # each read is at most TILE x TILE at its level
        for y0 in range(0, H, step):
            for x0 in range(0, W, step):
                w, h = min(step, W - x0), min(step, H - y0)
                region = self.read_region_downsampled(x0, y0, w, h, scale, level)
                tx0, ty0 = int(round(x0 * scale)), int(round(y0 * scale))
                tx1, ty1 = min(tw, int(round((x0 + w) * scale))), min(th, int(round((y0 + h) * scale)))
                if tx1 > tx0 and ty1 > ty0:
                    thumb[ty0:ty1, tx0:tx1] = cv2.resize(region, (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA)
        return thumb, scale

    def read_region_downsampled(self, x, y, w, h, scale, level=None) -> np.ndarray:
        """Level-0 region (x, y, w, h) at roughly ``scale`` (may be larger; the caller resizes)."""
        return self.read_region(x, y, w, h)


@contextmanager
def decoding(source, x, y):
    """Pixels decoded inside this block: a decoder's error (a truncated or damaged file: zlib, JPEG,
    OpenSlide errors of many types) becomes one line naming the file and the place."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - imagecodecs, zarr, tifffile and OpenSlide raise their own types
        detail = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        stop_zarr_reads()
        raise InputError(f"{source}: its pixels near ({int(x)}, {int(y)}) px cannot be decoded ({detail}): the file is "
                         "truncated or damaged, e.g. an interrupted copy; copy it again.") from None


def stop_zarr_reads(cancel: bool = False) -> None:
    """Finish the tile reads zarr still runs after the call that started them ended early, and take their errors:
    waited for (a tile that failed to decode, ``decoding``), or cancelled (``cancel``: Ctrl-C or another stop,
    :func:`pipeline.cli.run_main`). zarr reads a region's tiles as concurrent tasks on its own event loop and leaves
    the rest running when one fails or the caller is interrupted; left so, they printed hundreds of lines of
    asyncio warnings as the process ended, after the one line that says why it stopped. Nothing to do (and zarr
    not imported) when no tiled image was read."""
    import asyncio
    import sys

    if "zarr.core.sync" not in sys.modules:
        return
    from zarr.core.sync import sync

    async def finish():
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others if cancel else ():
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    try:
        sync(finish(), timeout=60)
    except BaseException as exc:  # noqa: BLE001 - a tidy exit, not a result: the caller's error stands either way
        log.debug("zarr's pending reads not finished (%s)", exc)


def check_tiles_within_file(tf, path) -> None:
    """Refuse a TIFF cut short (an interrupted copy): a tile of its first series stored past the end of the file.
    Checked from the tile offsets when the file is opened, so that a whole-slide prediction stops before its first
    region rather than midway. ``tf``: the open ``tifffile.TiffFile`` of ``path``."""
    size = Path(path).stat().st_size
    series = tf.series[0]
    end = 0
    for level in (series.levels if getattr(series, "levels", None) else [series]):
        for page in level.pages:
            if page is not None and len(page.dataoffsets):
                end = max(end, int((np.asarray(page.dataoffsets, np.int64)
                                    + np.asarray(page.databytecounts, np.int64)).max()))
    if end > size:
        raise InputError(f"{path}: the file ends at byte {size:,} but its tiles reach byte {end:,}: it is truncated, "
                         "e.g. an interrupted copy; copy it again.")


class OpenSlideImage(WholeSlide):
    def __init__(self, path: Path):
        import openslide

        self.slide = openslide.OpenSlide(str(path))
        self.size = tuple(int(v) for v in self.slide.dimensions)
        mpp = self.slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self.source = str(path)

    def close(self) -> None:
        self.slide.close()

    def read_region(self, x, y, w, h):
        with decoding(self.source, x, y):
            rgba = np.asarray(self.slide.read_region((int(x), int(y)), 0, (int(w), int(h))))
        from data.readers import alpha_on_white   # premultiplied RGBA, transparent where nothing was scanned
        return alpha_on_white(rgba, premultiplied=True)

    def _best_level_for(self, downsample):
        return self.slide.get_best_level_for_downsample(downsample)

    def _downsample(self, level) -> float:
        return float(self.slide.level_downsamples[level or 0])

    def read_region_downsampled(self, x, y, w, h, scale, level=None):
        level = 0 if level is None else level
        ds = self.slide.level_downsamples[level]
        lw, lh = max(1, int(np.ceil(w / ds))), max(1, int(np.ceil(h / ds)))
        with decoding(self.source, x, y):
            rgba = np.asarray(self.slide.read_region((int(x), int(y)), level, (lw, lh)))
        from data.readers import alpha_on_white   # premultiplied RGBA, transparent where nothing was scanned
        return alpha_on_white(rgba, premultiplied=True)


class InMemoryImage(WholeSlide):
    def __init__(self, pixels: np.ndarray, source: str, mpp: float | None = None):
        self.pixels = pixels
        self.size = (int(pixels.shape[1]), int(pixels.shape[0]))
        self.mpp = mpp
        self.source = source

    def read_region(self, x, y, w, h):
        x, y, w, h = int(x), int(y), int(w), int(h)
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.size[0], x + w), min(self.size[1], y + h)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._rgb(x0, y0, x1, y1)
        return out

    def _rgb(self, x0, y0, x1, y1) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (inside the image) as (h, w, 3) uint8 RGB."""
        return self.pixels[y0:y1, x0:x1, :3]


class TiledPixels:
    """A slide's full-resolution image read region by region, never whole: what
    :class:`image_process.patches.SlideImage` holds as ``pixels`` for a tiled TIFF or a whole-slide
    format (OpenSlide), in place of an (H, W, 3) array. It answers ``shape`` (H, W, 3), ``ndim`` and
    ``dtype`` as the array would; pixels come from :meth:`region` (what
    :func:`image_process.patches.extract_patches` reads, a block of spots at a time) and
    :meth:`shrunk` (tissue masks and figures, built tile by tile from the best pyramid level)."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, slide: WholeSlide):
        self.slide = slide
        self.shape = (int(slide.size[1]), int(slide.size[0]), 3)

    def region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of level 0 as (h, w, 3) uint8 RGB, the box clipped to the image."""
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(self.shape[1], int(x1)), min(self.shape[0], int(y1))
        return self.slide.read_region(x0, y0, max(1, x1 - x0), max(1, y1 - y0))

    def shrunk(self, max_side: int) -> tuple[np.ndarray, float]:
        """(the image at most ``max_side`` px on its longest side, its px per level-0 px)."""
        return self.slide.thumbnail(max_side)

    def close(self) -> None:
        """Close the slide's file once the last region is read (reading afterwards is an error)."""
        self.slide.close()


class TiledTiffImage(InMemoryImage):
    """Level 0 of a tiled TIFF (plain or pyramidal, any codec tifffile reads) as a zarr array over
    tifffile's store (``pixels``): a region decodes only the tiles it overlaps (a pass over a
    13,332 px JPEG-tiled image took 0.75 s, OpenSlide's ``read_region`` 5.7 s; over a 20,000 px
    one 2.4 s vs 23 s). Pixels as (H, W, 3 or 4) or (H, W) uint8. The pyramid's smaller levels
    (``levels``: (zarr array, downsampling factor), level 0 first) serve :meth:`thumbnail`, as
    OpenSlide's levels do. A 16-bit TIFF is scaled to uint8 by :attr:`bits`, the bit depth of its whole
    level 0, in every region alike."""

    def __init__(self, path: Path, array, store, levels=(), mpp: float | None = None):
        super().__init__(array, str(path), mpp)
        self._store = store      # holds the open file
        self.levels = list(levels) or [(array, 1.0)]
        self._bits = None

    def close(self) -> None:
        for store in self._store or ():          # tifffile's zarr stores, one per level (None: an OME-Zarr folder)
            store.close()
        self._store = None

    @property
    def bits(self) -> int | None:
        """A 16-bit TIFF's bit depth (:func:`data.readers.uint16_bit_depth` of level 0's largest value,
        found tile row by tile row on first use: one decoding pass, which a TIFF read whole instead never
        pays); None for 8 bits."""
        if self.pixels.dtype != np.uint16:
            return None
        if self._bits is None:
            from data.readers import uint16_bit_depth
            with decoding(self.source, 0, 0):
                top = _largest_value(self.pixels)
            self._bits = uint16_bit_depth(top, self.source)
        return self._bits

    def _rgb(self, x0, y0, x1, y1) -> np.ndarray:
        return self._level_rgb(self.pixels, x0, y0, x1, y1)

    def read_whole(self) -> np.ndarray:
        """Level 0 whole as (H, W, 3) uint8: a TIFF through :func:`data.readers.read_image` (one decoding
        pass, faster than region by region)."""
        from data.readers import read_image
        return read_image(self.source)

    def _level_rgb(self, array, x0, y0, x1, y1) -> np.ndarray:
        from data.readers import as_rgb_uint8

        bits = self.bits
        with decoding(self.source, x0 * self._level_scale(array), y0 * self._level_scale(array)):
            region = array[y0:y1, x0:x1]
        return as_rgb_uint8(region, self.source, bits)

    def _level_scale(self, array) -> float:
        """Level-0 px per px of ``array`` (one of :attr:`levels`)."""
        return next((ds for a, ds in self.levels if a is array), 1.0)

    def _best_level_for(self, downsample):
        """The smallest level still at least as detailed as ``downsample`` asks (OpenSlide's rule)."""
        fits = [i for i, (_, ds) in enumerate(self.levels) if ds <= downsample * (1 + 1e-6)]
        return fits[-1] if fits else 0

    def _downsample(self, level) -> float:
        return float(self.levels[level or 0][1])

    def read_region_downsampled(self, x, y, w, h, scale, level=None):
        if not level:
            return self.read_region(x, y, w, h)
        array, ds = self.levels[level]
        lh, lw = array.shape[:2]
        x0, y0 = max(0, int(x // ds)), max(0, int(y // ds))
        x1, y1 = min(lw, max(x0 + 1, int(np.ceil((x + w) / ds)))), min(lh, max(y0 + 1, int(np.ceil((y + h) / ds))))
        return self._level_rgb(array, x0, y0, x1, y1)


def open_tiled_tiff(path) -> TiledTiffImage | None:
    """A :class:`TiledTiffImage` when ``path`` is a TIFF whose first series is stored in tiles with
    interleaved samples (RGB, RGBA or grey, 8- or 16-bit); None otherwise (not a TIFF, stripped, planar,
    zarr or the codec's package missing), and the caller reads it another way. ``mpp`` from the
    TIFF resolution tags (None when absent). A 16-bit TIFF's bit depth comes from the largest value of
    its level 0 (:attr:`TiledTiffImage.bits`; never the whole image in memory)."""
    try:
        import tifffile
        import zarr

        from data.readers import tiff_level0

        with tifffile.TiffFile(str(path)) as tf:
            level, page = tiff_level0(tf)
            if not page.is_tiled or level.axes not in ("YXS", "YX") or level.dtype not in (np.uint8, np.uint16) \
                    or (level.axes == "YXS" and level.shape[2] not in (3, 4)):
                return None
            tifffile.TIFF.DECOMPRESSORS[page.compression]   # KeyError when its codec (imagecodecs) is missing
            check_tiles_within_file(tf, path)
            width = level.shape[1]
            series = tf.series[0]
            n_levels = len(series.levels) if getattr(series, "levels", None) else 1
            widths = [series.levels[i].shape[1] for i in range(n_levels)]
        stores = [tifffile.imread(str(path), aszarr=True, series=0, level=i) for i in range(n_levels)]
        arrays = [zarr.open(st, mode="r") for st in stores]
        levels = [(a, width / w) for a, w in zip(arrays, widths)
                  if a.ndim == arrays[0].ndim and a.shape[2:] == arrays[0].shape[2:]]
        return TiledTiffImage(Path(path), arrays[0], stores, levels, _tiff_mpp(Path(path)))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - not a TIFF tifffile/zarr can index: read it another way
        log.debug("%s is not read as a tiled TIFF (%s)", path, exc)
        return None


class OmeZarrImage(TiledTiffImage):
    """An OME-NGFF (OME-Zarr) multiscale image, as a SpatialData store keeps its images
    (``images/<name>/``: one zarr array per level, axes such as (c, y, x)), read region by region as a
    tiled TIFF is: ``pixels`` is level 0 seen as (H, W, C) (:class:`ChannelsLast`), ``levels`` the
    pyramid with each level's downsampling factor (level-0 px per px, from the arrays' widths)."""

    read_whole = WholeSlide.read_whole      # band by band from its chunks (a TIFF's one decoding pass does not apply)


class PlacedImage(WholeSlide):
    """``slide`` seen in another pixel frame into which an affine places it: frame px = ``to_frame`` @ (x, y, 1)
    of the slide's level-0 px (a 2x3 or 3x3 matrix; coordinates of pixel corners, pixel (i, j) spanning
    [i, i+1) x [j, j+1)). This is how a SpatialData image registered or cropped onto the spots (placed by a
    translation, rotation or affine) is read in the spots' frame (``obsm['spatial']``'s pixels).

    A region is read from the part of ``slide`` it covers (from the pyramid level nearest the resolution
    asked, for :meth:`thumbnail`) and resampled bicubically (a real H&E turned and turned back kept its
    stage-1 features better than with bilinear weights: DEVLOG 252); white outside the slide. A
    translation by whole pixels gives the slide's pixels unchanged. ``size`` reaches from the frame's
    origin to the slide's farthest corner (what lies left of or above the origin is not seen); ``mpp`` is
    the slide's, per frame px."""

    def __init__(self, slide: WholeSlide, to_frame):
        matrix = np.vstack([np.asarray(to_frame, float).reshape(-1, 3)[:2], [0.0, 0.0, 1.0]])
        det = float(np.linalg.det(matrix[:2, :2]))
        if not np.isfinite(matrix).all() or abs(det) < 1e-12:
            raise InputError(f"{slide.source}: the affine placing this image on the spots is not invertible "
                             f"({matrix[:2].tolist()}).")
        self.slide, self.to_frame, self.to_image = slide, matrix, np.linalg.inv(matrix)
        self.linear = abs(det) ** 0.5        # frame px per slide px (the geometric mean of the two axes')
        W, H = slide.size
        corners = np.array([[0, 0, 1], [W, 0, 1], [0, H, 1], [W, H, 1]], float) @ matrix[:2].T
        self.size = (max(1, int(np.ceil(corners[:, 0].max()))), max(1, int(np.ceil(corners[:, 1].max()))))
        self.mpp = None if slide.mpp is None else slide.mpp / self.linear
        self.source = slide.source

    def close(self) -> None:
        self.slide.close()

    def read_region(self, x, y, w, h):
        return self._resampled(x, y, w, h, 1.0, None)

    def _best_level_for(self, downsample):
        return self.slide._best_level_for(downsample / self.linear)

    def _downsample(self, level) -> float:
        return self.slide._downsample(level) * self.linear

    def read_region_downsampled(self, x, y, w, h, scale, level=None):
        return self._resampled(x, y, w, h, min(1.0, 1.0 / self._downsample(level)), level)

    def _resampled(self, x, y, w, h, k: float, level) -> np.ndarray:
        """Frame region (x, y, w, h) as (ceil(h k), ceil(w k), 3) uint8 RGB, k output px per frame px,
        resampled from ``level`` of the slide (level 0 when None or the slide has no pyramid)."""
        import cv2

        out_w, out_h = max(1, int(np.ceil(w * k))), max(1, int(np.ceil(h * k)))
        box = np.array([[x, y, 1], [x + w, y, 1], [x, y + h, 1], [x + w, y + h, 1]], float) @ self.to_image[:2].T
        levels = getattr(self.slide, "levels", None)
        openslide_level = bool(level) and isinstance(self.slide, OpenSlideImage)
        ds = self.slide._downsample(level) if level and (levels or openslide_level) else 1.0   # slide px per level px
        lo = np.floor(box.min(0) / ds).astype(int) - 3                      # level px, margin for the bicubic kernel
        hi = np.ceil(box.max(0) / ds).astype(int) + 3
        if ds == 1.0:
            src = self.slide.read_region(lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])
        elif openslide_level:                   # OpenSlide reads a level from a level-0 origin, white outside
            src = self.slide.read_region_downsampled(lo[0] * ds, lo[1] * ds, (hi[0] - lo[0]) * ds,
                                                     (hi[1] - lo[1]) * ds, None, level)[:hi[1] - lo[1], :hi[0] - lo[0]]
        else:
            array = levels[level][0]
            lo = np.maximum(lo, 0)
            hi = np.maximum(np.minimum(hi, [array.shape[1], array.shape[0]]), lo + 1)
            src = self.slide._level_rgb(array, lo[0], lo[1], hi[0], hi[1])
        # output pixel (i, j), centre (i + 1/2, j + 1/2) / k + (x, y) in the frame -> slide px -> index in src
        lin = self.to_image[:2, :2] / (k * ds)
        offset = (self.to_image[:2, :2] @ (np.array([x, y], float) + 0.5 / k) + self.to_image[:2, 2]) / ds - 0.5 - lo
        return cv2.warpAffine(np.ascontiguousarray(src), np.column_stack([lin, offset]), (out_w, out_h),
                              flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(255, 255, 255))


class ChannelsLast:
    """A zarr image array whose axes are named (OME-NGFF: e.g. ``c, y, x``; a ``t`` or ``z`` axis of size 1
    is dropped) seen as (H, W, C), or (H, W) for one channel: ``shape``, ``ndim``, ``dtype``, ``chunks``
    and ``view[y0:y1, x0:x1]`` as an (H, W, C) array would give them; only the pixels indexed are read."""

    def __init__(self, array, axes: list[str]):
        self.array, self.axes = array, list(axes)
        size = dict(zip(self.axes, array.shape))
        chunk = dict(zip(self.axes, array.chunks))
        self.has_channels = size.get("c", 1) > 1
        self.shape = (size["y"], size["x"], size["c"]) if self.has_channels else (size["y"], size["x"])
        self.chunks = tuple(chunk.get(a, 1) for a in ("y", "x", "c")[:len(self.shape)])
        self.ndim, self.dtype = len(self.shape), array.dtype

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, cols = (tuple(key) + (slice(None), slice(None)))[:2]
        index = tuple(rows if a == "y" else cols if a == "x" else slice(None) if a == "c" else 0 for a in self.axes)
        kept = [a for a in self.axes if a in ("y", "x", "c")]
        block = np.asarray(self.array[index])
        block = np.transpose(block, [kept.index(a) for a in ("y", "x", "c") if a in kept])
        return block if self.has_channels else block.reshape(block.shape[:2])


def zarr_attributes(folder) -> dict:
    """A zarr group's attributes: zarr 3's ``zarr.json`` (its ``attributes``) or zarr 2's ``.zattrs``; {} when
    the folder has neither, or they cannot be parsed."""
    import json

    folder = Path(folder)
    for name in ("zarr.json", ".zattrs"):
        meta = folder / name
        if not meta.is_file():
            continue
        try:
            attrs = json.loads(meta.read_text())
        except (OSError, ValueError):
            return {}
        return (attrs.get("attributes") or {}) if name == "zarr.json" else attrs
    return {}


def axis_names(axes) -> list[str]:
    """Axis names from an OME-NGFF / spatialdata axes list (``[{'name': 'c', ...}, ...]`` or ``['c', ...]``)."""
    return [str(a["name"]) if isinstance(a, dict) else str(a) for a in axes]


def _ome_attributes(folder) -> dict:
    """The OME-NGFF attributes (``multiscales``, ``omero``) of an image group at ``folder`` (zarr 3 keeps them
    under ``ome``); {} when there are none."""
    attrs = zarr_attributes(folder)
    ome = attrs.get("ome") or attrs
    return ome if ome.get("multiscales") else {}


def ome_multiscales(folder) -> dict | None:
    """The first ``multiscales`` entry of an OME-NGFF image group at ``folder``, or None when the folder
    is not one."""
    found = _ome_attributes(folder).get("multiscales")
    return found[0] if found else None


RGB_CHANNEL_LABELS = {"r", "g", "b", "a", "red", "green", "blue", "alpha"}


def stain_channels(folder) -> list[str]:
    """The channel labels of an OME-Zarr image (``omero.channels``) when they name something other than
    red, green, blue and alpha (or plain numbers, as an unnamed image's): a fluorescence image's stains
    (DAPI, ...), which are not an H&E's colours; [] otherwise."""
    channels = (_ome_attributes(folder).get("omero") or {}).get("channels") or []
    labels = [str(c.get("label", "")) if isinstance(c, dict) else str(c) for c in channels]
    named = [lab for lab in labels if lab.strip() and not lab.strip().isdigit()]
    return labels if any(lab.strip().lower() not in RGB_CHANNEL_LABELS for lab in named) else []


def open_ome_zarr_image(folder) -> OmeZarrImage | None:
    """An :class:`OmeZarrImage` for a folder holding an OME-NGFF multiscale image with ``y`` and ``x`` axes
    (and ``c``), or None when the folder is not one."""
    import zarr

    folder = Path(folder)
    meta = ome_multiscales(folder)
    if meta is None:
        return None
    axes = axis_names(meta.get("axes", ["c", "y", "x"]))
    if "y" not in axes or "x" not in axes:
        return None
    stains = stain_channels(folder)
    if stains:
        raise InputError(f"{folder}: an OME-Zarr image whose channels are {', '.join(stains)}, not an H&E's red, green "
                         "and blue; the stages read a brightfield H&E (RGB) image.")
    try:
        arrays = [zarr.open_array(str(folder / d["path"]), mode="r") for d in meta["datasets"]]
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for a damaged or partial store
        raise InputError(f"{folder}: an OME-Zarr image whose arrays cannot be opened ({exc}).") from None
    views = [ChannelsLast(a, axes) for a in arrays if a.ndim == len(axes)]
    if not views:
        return None
    width = views[0].shape[1]
    return OmeZarrImage(folder, views[0], None, [(v, width / v.shape[1]) for v in views])


def _largest_value(array) -> int:
    """The largest value of a (zarr) image array, read a band of rows at a time (the band as tall as
    its chunks, so each tile is decoded once)."""
    rows = int(array.chunks[0]) if getattr(array, "chunks", None) else 1024
    top = 0
    for y in range(0, array.shape[0], rows):
        top = max(top, int(np.asarray(array[y:y + rows]).max()))
    return top


STREAM_ABOVE_BYTES = 1e9   # a tiled image larger than this decoded (RGB; ~18,000 px square) is read by region


def open_fullres_pixels(path, stream_above_bytes: float | None = None, placement=None):
    """A full-resolution H&E (``data.image``, or a SpatialData store's image at scale 1) for the stages.

    A tiled TIFF (:class:`TiledTiffImage`) or a whole-slide format OpenSlide reads (``.svs``,
    ``.ndpi``, ``.mrxs``, ...) whose RGB pixels would take more than ``stream_above_bytes`` (default
    :data:`STREAM_ABOVE_BYTES`) decoded (2 bytes a sample for a 16-bit TIFF, which a whole read holds
    beside its uint8 copy) is
    returned as :class:`TiledPixels`, read region by region and never whole, so memory does not grow
    with the image. Anything else comes whole as an (H, W, 3) uint8 array
    (:func:`data.readers.read_image`: an uncompressed stripped TIFF memory-mapped, others decoded
    into one array), because the stages cut patches around the same spots many times (stage 4: the
    grid, the training pairs, several patch sizes) and each pass over a streamed image decodes its
    blocks again: stage 4 on a 13,332 px JPEG-tiled image took 193 s streamed and 150 s read whole
    (DEVLOG 114).

    ``placement`` (``uns['spatial'][lib]['metadata']['fullres_placement']``, a 2x3 affine from the image's
    px to ``obsm['spatial']``'s) reads the image through :class:`PlacedImage`, resampled into the spots'
    frame, under the same rule."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found (data.image).")
    slide = open_whole_slide(path)     # the same reader as stage 5's whole-slide path (see its docstring)
    if placement is None and not isinstance(slide, (OpenSlideImage, TiledTiffImage)):
        return slide.pixels
    sample_bytes = slide.pixels.dtype.itemsize if isinstance(slide, TiledTiffImage) else 1   # 2: a 16-bit TIFF
    if placement is not None:
        slide = PlacedImage(slide, placement)
    width, height = slide.size
    if width * height * 3 * sample_bytes > (STREAM_ABOVE_BYTES if stream_above_bytes is None else stream_above_bytes):
        return TiledPixels(slide)      # streamed: the file stays open while the stage reads it
    with slide:
        return slide.read_whole()


def _tiff_mpp(path: Path) -> float | None:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            page = tf.pages[0]
            tags = page.tags
            if "XResolution" not in tags:
                return None
            num, den = tags["XResolution"].value
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
            per_unit = num / den if den else 0
            if per_unit <= 0:
                return None
            um = {2: 25400.0, 3: 10000.0}.get(int(unit))
            return um / per_unit if um else None
    except Exception:  # noqa: BLE001 - not a TIFF or unreadable tags: the size is unknown
        return None


VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")   # whole-slide formats only OpenSlide reads


def open_whole_slide(path, mpp: float | None = None) -> WholeSlide:
    """Open a whole-slide or plain image, or an OME-Zarr image folder; ``mpp`` (microns per pixel) overrides
    the file's value."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such image file.")
    if path.is_dir():      # an OME-Zarr image (a SpatialData store's images/<name>)
        slide = open_ome_zarr_image(path)
        if slide is None:
            raise InputError(f"{path}: a folder, not an image; an image folder must be an OME-Zarr image (as a "
                             "SpatialData store's images/<name>).")
    else:
        slide = _open_image_file(path)
    if mpp is not None:
        slide.mpp = float(mpp)
    elif slide.mpp is None and path.suffix.lower() in (".tif", ".tiff"):
        slide.mpp = _tiff_mpp(path)
    return slide


def _open_image_file(path: Path) -> WholeSlide:
    """:func:`open_whole_slide` for a file: tifffile, OpenSlide or a plain read (see the module docstring)."""
    from data.readers import refuse_gzipped_image

    refuse_gzipped_image(path)
    slide = None
    try:
        import openslide

        kind = openslide.OpenSlide.detect_format(str(path))
        if kind == "generic-tiff" or (kind is None and path.suffix.lower() in (".tif", ".tiff")):
            slide = open_tiled_tiff(path)   # a plain tiled TIFF: tifffile reads it ~10x faster (see TiledTiffImage)
        elif kind in CHECKED_VENDOR_TIFFS:
            slide = _faster_if_identical(OpenSlideImage(path))
        if slide is None and kind not in (None, "generic-image"):
            slide = OpenSlideImage(path)
    except ImportError:
        if path.suffix.lower() in (".tif", ".tiff"):
            slide = open_tiled_tiff(path)
        if path.suffix.lower() in VENDOR_SUFFIXES:
            raise InputError(f"{path}: reading this format needs OpenSlide: pip install openslide-python "
                             "openslide-bin.") from None
    except InputError:        # a file that cannot be read either way (a TIFF cut short): no fallback
        raise
    except Exception as exc:  # noqa: BLE001 - OpenSlide refused the file: fall back to a plain read
        log.info("OpenSlide cannot open %s (%s); reading it as a plain image", path, exc)
    return slide if slide is not None else _open_plain(path)


def file_mpp(path) -> float | None:
    """The microns per pixel a slide file states, from its metadata alone (no pixels are decoded): what
    :func:`open_whole_slide` finds there. A vendor format's from OpenSlide, a TIFF's from its resolution
    tags; None for a plain JPEG/PNG, which never says."""
    path = Path(path)
    try:
        import openslide

        kind = openslide.OpenSlide.detect_format(str(path))
        if kind not in (None, "generic-image", "generic-tiff"):
            with OpenSlideImage(path) as slide:
                return slide.mpp
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - OpenSlide refused it; open_whole_slide reads it as a plain image
        log.debug("OpenSlide cannot open %s (%s)", path, exc)
    return _tiff_mpp(path) if path.suffix.lower() in (".tif", ".tiff") else None


# vendor formats that are tiled TIFFs tifffile can also read (its series 0 = the slide, with its levels);
# each file is checked against OpenSlide when opened (:func:`_faster_if_identical`)
CHECKED_VENDOR_TIFFS = ("aperio",)


def _faster_if_identical(reference: OpenSlideImage, tolerance: float = 2.0) -> WholeSlide:
    """The slide read through tifffile (:func:`open_tiled_tiff`; a pass over an 8,192 px Aperio-style file
    with 256 px JPEG tiles took 1.2 s, through OpenSlide 3.2 s, and this check ~1 s) when it gives
    the pixels OpenSlide gives, else ``reference`` itself. Checked on the whole slide at 512 px (its
    smallest level) and on a 512 px level-0 region at the most stained part of it: mean |difference|
    at most ``tolerance`` grey levels in both (a codec or colour-space quirk of a vendor's file, e.g. a
    JPEG 2000 variant or YCbCr tiles, shows up as a larger one). mpp stays OpenSlide's (a vendor's
    file keeps it in its own metadata, e.g. Aperio's ImageDescription)."""
    fast = open_tiled_tiff(reference.source)
    if fast is None or fast.size != reference.size:
        if fast is not None:
            fast.close()
        return reference
    try:
        (thumb_fast, scale), (thumb_ref, _) = fast.thumbnail(512), reference.thumbnail(512)
        same = thumb_fast.shape == thumb_ref.shape and \
            np.abs(thumb_fast.astype(np.int16) - thumb_ref).mean() <= tolerance
        if same:
            import cv2
            stain = cv2.blur(255 - thumb_ref.min(axis=2), (15, 15))       # darkest neighbourhood = tissue
            ty, tx = np.unravel_index(int(np.argmax(stain)), stain.shape)
            x, y = int(tx / scale) - 256, int(ty / scale) - 256
            same = np.abs(fast.read_region(x, y, 512, 512).astype(np.int16)
                          - reference.read_region(x, y, 512, 512)).mean() <= tolerance
    except Exception as exc:  # noqa: BLE001 - tifffile failed on this file: OpenSlide reads it
        log.info("%s: tifffile cannot read it like OpenSlide (%s); reading it through OpenSlide", reference.source, exc)
        fast.close()
        return reference
    if not same:
        log.info("%s: tifffile's pixels differ from OpenSlide's; reading it through OpenSlide", reference.source)
        fast.close()
        return reference
    fast.mpp = reference.mpp
    reference.close()
    return fast


def _open_plain(path: Path) -> WholeSlide:
    from data.readers import read_image

    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            mm = tifffile.memmap(str(path), mode="r")
            if mm.ndim == 3 and mm.shape[2] in (3, 4) and mm.dtype == np.uint8:
                return InMemoryImage(mm, str(path), _tiff_mpp(path))
        except Exception:  # noqa: BLE001 - compressed or tiled: not memory-mappable
            pass
    return InMemoryImage(read_image(path), str(path))


def write_pyramid_tiff(path, level_tiles, height: int, width: int, steps=None, tile: int = 512,
                       mpp: float | None = None, compression: str = "jpeg", quality: int = 90) -> Path:
    """Write a tiled, pyramidal RGB TIFF tile by tile (never a whole level in memory), atomically.

    ``level_tiles(step, h, w)`` yields the (tile, tile, 3) uint8 tiles of the level ``step`` times
    smaller than level 0 (``h`` x ``w`` px, ``ceil`` of level 0 / ``step``) in row-major order; tiles
    past the level's edge are padded by the caller and never read. ``steps``: the levels' downsampling
    factors (default 1, 4, 16, ... until the level fits in 2048 px); ``mpp``: microns per level-0
    pixel to record; ``compression``: "jpeg" (at ``quality``) or any tifffile codec ("zlib", None)."""
    import tifffile

    path = Path(path)
    if steps is None:
        steps = [1]
        while max(height, width) / steps[-1] > 2048:
            steps.append(steps[-1] * 4)
    codec = {"compression": compression, **({"compressionargs": {"level": int(quality)}} if compression == "jpeg" else {})}
    tmp = path.with_name(path.name + ".part")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=height * width * 3 > 2 ** 31) as tw:
            for k, step in enumerate(steps):
                h, w = -(-height // step), -(-width // step)
                extra = {"resolution": (1e4 / (mpp * step),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
                tw.write(level_tiles(step, h, w), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                         photometric="rgb", subfiletype=1 if k else 0, **codec, **extra)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)      # no half-written pyramid left behind
        raise
    return path


def write_tiled_tiff(src, dst, mpp: float | None = None, tile: int = 512, quality: int = 90) -> Path:
    """Rewrite an image that can only be decoded whole (a large JPEG or PNG) as a tiled, pyramidal
    TIFF (``tile`` px JPEG-compressed tiles at ``quality``; levels 1/4, 1/16, ... down to <= 2048 px),
    which ``data.image`` and whole-slide prediction then read block by block. Decodes ``src`` once with
    Pillow, so it needs ~4 bytes per pixel of memory (6.4 GB for a 40,000 px square), once.
    ``mpp``: microns per pixel to record (default: none; a JPEG's DPI is usually a placeholder such as
    72, not the scan's resolution, so it is not trusted -- give ``wsi.mpp`` or ``--mpp`` instead)."""
    from PIL import Image

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"{src}: no such image file.")
    if dst.resolve() == src.resolve():
        raise InputError(f"{dst}: the output must be another file than the input.")
    if not dst.parent.is_dir():            # before decoding, which takes minutes for a large image
        raise InputError(f"{dst.parent}: no such folder for the output; create it or choose another path.")
    if dst.is_dir():
        raise InputError(f"{dst}: a folder; give the output file's name (e.g. {dst / src.with_suffix('.tif').name}).")
    Image.MAX_IMAGE_PIXELS = None           # the point is to read a large image, once
    try:
        with Image.open(src) as im:
            level0 = im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"{src}: cannot be read as an image ({exc}).") from None
    levels = {1: level0}

    def tiles(step, h, w):
        if step not in levels:
            levels[step] = levels[step // 4].reduce(4)      # each level from the one above: (h, w) rounded up
        img = levels[step]
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                yield np.asarray(img.crop((x, y, x + tile, y + tile)))   # outside the image: 0, not read

    return write_pyramid_tiff(dst, tiles, level0.size[1], level0.size[0], tile=tile, mpp=mpp, quality=quality)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m data.wsi", description="Rewrite a large JPEG/PNG as a tiled, "
                                "pyramidal TIFF that the pipeline reads block by block (see write_tiled_tiff).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel to record (default: none recorded)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the tiles (default 90)")
    args = p.parse_args(argv)

    def convert():
        try:
            out = write_tiled_tiff(args.src, args.dst, args.mpp, quality=args.quality)
        except OSError as exc:          # a read-only folder, a full disk: the partial file is removed
            raise InputError(f"{args.dst}: cannot be written ({exc.strerror or exc}).") from None
        print(f"wrote {out}")

    from pipeline.cli import run_main     # bad input: one line, exit status 2, as the stage scripts
    run_main(convert)


if __name__ == "__main__":
    main()
