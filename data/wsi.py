"""Whole-slide image reading, region by region (never the whole level-0 image at once).

:func:`open_whole_slide` returns a :class:`WholeSlide` with

* ``size`` -- (width, height) of level 0 in pixels;
* ``mpp`` -- microns per level-0 pixel read from the file (OpenSlide's ``openslide.mpp-x``, or the
  TIFF resolution tags), None when the file does not say;
* ``read_region(x, y, w, h)`` -- an (h, w, 3) uint8 RGB array of level 0; areas outside the slide
  come back white;
* ``thumbnail(max_side)`` -- a downsampled RGB image and its scale (thumbnail px per level-0 px),
  built tile by tile from the best pyramid level, so memory stays bounded by the tile size.

Backends: OpenSlide (``.svs``, ``.ndpi``, ``.mrxs``, tiled ``.tif``/``.tiff`` pyramids, ...) when it
can open the file; a plain image (JPG/PNG/untiled TIFF) is read whole with OpenCV/Pillow (such
files are small enough by nature; an untiled, uncompressed TIFF is memory-mapped instead).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data.errors import InputError

log = logging.getLogger("stpipe")
TILE = 2048   # pixels (at the level read) per read when building a thumbnail


class WholeSlide:
    size: tuple[int, int]
    mpp: float | None
    source: str

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

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


class OpenSlideImage(WholeSlide):
    def __init__(self, path: Path):
        import openslide

        self.slide = openslide.OpenSlide(str(path))
        self.size = tuple(int(v) for v in self.slide.dimensions)
        mpp = self.slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self.source = str(path)

    def read_region(self, x, y, w, h):
        rgba = np.asarray(self.slide.read_region((int(x), int(y)), 0, (int(w), int(h))))
        return _rgba_on_white(rgba)

    def _best_level_for(self, downsample):
        return self.slide.get_best_level_for_downsample(downsample)

    def _downsample(self, level) -> float:
        return float(self.slide.level_downsamples[level or 0])

    def read_region_downsampled(self, x, y, w, h, scale, level=None):
        level = 0 if level is None else level
        ds = self.slide.level_downsamples[level]
        lw, lh = max(1, int(np.ceil(w / ds))), max(1, int(np.ceil(h / ds)))
        return _rgba_on_white(np.asarray(self.slide.read_region((int(x), int(y)), level, (lw, lh))))


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
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.pixels[y0:y1, x0:x1, :3]
        return out


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (premultiplied, as OpenSlide returns it) over a white background, without float copies
    of the whole region (only the partly transparent pixels are blended)."""
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgb
    part = alpha < 255
    a = alpha[part].astype(np.uint16)[:, None]
    rgb[part] = np.minimum(rgb[part].astype(np.uint16) + (255 - a), 255).astype(np.uint8)
    return rgb


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


def open_whole_slide(path, mpp: float | None = None) -> WholeSlide:
    """Open a whole-slide or plain image; ``mpp`` (microns per pixel) overrides the file's value."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such image file.")
    slide = None
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)) not in (None, "generic-image"):
            slide = OpenSlideImage(path)
    except ImportError:
        if path.suffix.lower() in (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif"):
            raise InputError(f"{path}: reading this format needs OpenSlide: pip install openslide-python "
                             "openslide-bin.") from None
    except Exception as exc:  # noqa: BLE001 - OpenSlide refused the file: fall back to a plain read
        log.info("OpenSlide cannot open %s (%s); reading it as a plain image", path, exc)
    if slide is None:
        slide = _open_plain(path)
    if mpp is not None:
        slide.mpp = float(mpp)
    elif slide.mpp is None and path.suffix.lower() in (".tif", ".tiff"):
        slide.mpp = _tiff_mpp(path)
    return slide


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
