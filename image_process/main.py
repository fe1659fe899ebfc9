"""Stage 1: image features per spot -> ``01_image_features.npy`` (+ ``01_image_features.spots.txt``), and
``01_image_features.png`` (their first 3 PCs over the spots; none with ``plot.figures`` false).

    python image_process/main.py --config configs/dlpfc.yaml --out runs/151673
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from data import keys
from pipeline import stages
from pipeline.cli import stage_main
from pipeline.slide import data_inputs, data_without_truth, load_slide

log = logging.getLogger("stpipe")
STAGE = "image_features"
FEATURES = "01_image_features.npy"
SPOTS = "01_image_features.spots.txt"
FIGURE = "01_image_features.png"    # the features' first PCs over the spots (none without an image or plot.figures)


def fingerprint(cfg: dict) -> str:
    """Stage 1's fingerprint: the slide's data and image settings, not its labels (``data.truth``)."""
    return stages.fingerprint({"data": data_without_truth(cfg), "image": cfg["image"]},
                              data_inputs(cfg))


def run_stage(cfg: dict, out: Path, device: str = "cpu", force: bool = False, slide=None) -> bool:
    """Compute and write stage-1 outputs unless they are up to date. Returns True if it ran.

    ``slide``: a function returning the slide's AnnData (called only if the stage runs).
    """
    from image_process.features import spot_image_features
    from image_process.patches import choose_image, close_image
    from pipeline.plotting import percentile_ranges, spot_maps

    fp = fingerprint(cfg)
    if not force and stages.is_fresh(out, STAGE, fp, [FEATURES, SPOTS]):
        log.info("stage 1 (image features): up to date, skipped (use --force to redo)")
        return False
    t0 = time.perf_counter()
    adata = slide() if slide else load_slide(cfg)
    use = cfg["image"].get("use", "auto")
    img = None if use == "none" else choose_image(adata, use)     # read once, for the features and the figure
    try:
        feats, info = spot_image_features(adata, cfg["image"], device, image=img)
        stages.save_npy(out / FEATURES, feats)
        stages.atomic_write(out / SPOTS, lambda t: Path(t).write_text("\n".join(adata.obs_names) + "\n"))
        if stages.figures_off(cfg, out, [FIGURE]):
            pass
        elif feats.shape[1] > 0:
            from pipeline.preprocess import pca
            pc = pca(feats, 3)
            panels = {f"image feature PC{i + 1}": pc[:, i] for i in range(pc.shape[1])}
            spot_maps(adata.obsm[keys.SPATIAL], panels, out / FIGURE,
                      image=img.pixels if img else None, image_scale=img.scale if img else 1.0,
                      value_ranges=percentile_ranges(panels))
        else:                      # no image, no features: an earlier run's figure would show other features
            (out / FIGURE).unlink(missing_ok=True)
    finally:
        close_image(img)           # a streamed full-resolution image holds its file open
    seconds = time.perf_counter() - t0
    stages.update_metrics(out, {"image": info}, {STAGE: seconds}, stage=STAGE)
    stages.write_stamp(out, STAGE, fp)
    log.info("stage 1 (image features): %s features for %d spots in %.1fs", feats.shape[1], len(feats), seconds)
    return True


if __name__ == "__main__":
    stage_main(__doc__, run_stage)
