"""Loading the slide named by a config (one place, so every stage reads it the same way)."""
from __future__ import annotations

from data.readers import read_slide
from pipeline.config import resolve_data_paths


def load_slide(cfg: dict):
    """The AnnData of ``cfg['data']`` with paths resolved (see :func:`data.readers.read_slide`)."""
    return read_slide(resolve_data_paths(cfg.get("data", {})))


def data_inputs(cfg: dict) -> list:
    """Input files of ``cfg['data']`` (for stage fingerprints)."""
    d = resolve_data_paths(cfg.get("data", {}))
    return [d[k] for k in ("path", "counts", "spots", "image", "truth") if d.get(k)]
