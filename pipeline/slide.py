"""Loading the slide named by a config (one place, so every stage reads it the same way)."""
from __future__ import annotations

from data.readers import read_slide
from pipeline.config import resolve_data_paths, resolve_path


def load_slide(cfg: dict):
    """The AnnData of ``cfg['data']`` with paths resolved (see :func:`data.readers.read_slide`)."""
    return read_slide(resolve_data_paths(cfg.get("data", {})))


# the data keys that only say which labels score the domains (obs['truth']); stages 1-3 do not train on them,
# so changing them re-scores a finished run instead of redoing it (pipeline.stage_domains.refresh_truth)
TRUTH_KEYS = ("truth", "truth_column", "truth_missing")


def data_inputs(cfg: dict) -> list:
    """Input files of ``cfg['data']`` but the label file (:func:`truth_fingerprint` covers that), and the
    image encoder's weights file (:func:`weights_inputs`), for stage fingerprints."""
    from data.readers import data_files
    return data_files(resolve_data_paths(cfg.get("data", {}))) + weights_inputs(cfg)


def data_without_truth(cfg: dict) -> dict:
    """``cfg['data']`` without :data:`TRUTH_KEYS`: what the slide's counts, positions and image depend on."""
    return {k: v for k, v in (cfg.get("data") or {}).items() if k not in TRUTH_KEYS}


def truth_fingerprint(cfg: dict) -> str:
    """Which labels ``obs['truth']`` holds under this config: the :data:`TRUTH_KEYS` and the label
    file's size and time (an .h5ad's own ``obs`` labels change with the .h5ad, an input of stage 1)."""
    from pipeline import stages

    d = resolve_data_paths(cfg.get("data", {}))
    return stages.fingerprint({k: d.get(k) for k in TRUTH_KEYS}, [d["truth"]] if d.get("truth") else [])


def weights_inputs(cfg: dict) -> list:
    """``image.weights`` (a timm encoder's local weights file) when set: replacing the file under the
    same name must redo the features, as replacing a data file does."""
    weights = (cfg.get("image") or {}).get("weights")
    return [resolve_path(weights)] if weights else []
