"""Loading the slide named by a config (one place, so every stage reads it the same way)."""
from __future__ import annotations

from data.readers import read_slide
from pipeline.config import resolve_data_paths, resolve_path


def load_slide(cfg: dict):
    """The AnnData of ``cfg['data']`` with paths resolved (see :func:`data.readers.read_slide`)."""
    return read_slide(resolve_data_paths(cfg.get("data", {})))


def data_inputs(cfg: dict) -> list:
    """Input files of ``cfg['data']``, and the image encoder's weights file (:func:`weights_inputs`), for
    stage fingerprints."""
    d = resolve_data_paths(cfg.get("data", {}))
    return [d[k] for k in ("path", "counts", "spots", "image", "truth") if d.get(k)] + weights_inputs(cfg)


def weights_inputs(cfg: dict) -> list:
    """``image.weights`` (a timm encoder's local weights file) when set: replacing the file under the
    same name must redo the features, as replacing a data file does."""
    weights = (cfg.get("image") or {}).get("weights")
    return [resolve_path(weights)] if weights else []
