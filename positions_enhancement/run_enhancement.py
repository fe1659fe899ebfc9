"""Stage 2: position-aware enhancement -> ``02_enhanced.h5ad``.

Reads the slide (``data.*``) and stage 1's ``01_image_features.npy`` from ``--out``; writes an
AnnData restricted to the modelled genes (the ``preprocess.n_top_genes`` most variable) with

* ``X`` raw counts, ``obs['total_counts']`` (all genes read), ``layers['lognorm']`` log1p(CP10k);
* ``var['morans_i']``: each gene's Moran's I on the measured log1p(CP10k) over the 6-nearest-spot graph
  (``pipeline.metrics.morans_i``; near 1 for a smooth spatial pattern, near 0 for none): the spatially
  variable genes, ranked;
* ``layers['enhanced']`` = (1 - a) lognorm + a W lognorm (see positions_enhancement.spatial_weights);
* ``obsm['image_features']`` raw stage-1 features, ``obsm['image_enhanced']`` their standardised
  PCs after the same enhancement (both (n, 0) without an image);
* ``obsp['spatial_weights']`` = W, ``uns['spot_spacing_px']`` (full-resolution px);
* ``uns['spatial']`` as read, plus a <= 2000 px copy of a full-resolution image as ``images['hires']``
  when the slide has no other (legacy ST with ``data.image``), for scanpy/squidpy plots.

    python positions_enhancement/run_enhancement.py --config configs/dlpfc.yaml --out runs/151673
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from data import keys
from data.errors import InputError
from pipeline import stages
from pipeline.cli import stage_main
from pipeline.slide import load_slide, truth_fingerprint

log = logging.getLogger("stpipe")
STAGE = "enhancement"
OUTPUT = "02_enhanced.h5ad"
FIGURE = "02_enhanced.png"          # the most patterned gene before and after (none with plot.figures false)
TRUTH_STAMP = f"{STAGE}.truth"      # which labels (data.truth) obs['truth'] of OUTPUT holds: see stage_domains.refresh_truth


def load_image_features(out: Path, obs_names) -> np.ndarray:
    """Stage 1's features, checked to be in the same spot order as the slide."""
    from image_process.main import FEATURES, SPOTS

    f, s = out / FEATURES, out / SPOTS
    if not f.exists() or not s.exists():
        raise InputError(f"{f}: stage 1 output not found; run image_process/main.py with the same --out first.")
    feats = np.load(f)
    spots = s.read_text().split()
    if len(spots) != len(obs_names) or list(spots) != list(obs_names):
        raise InputError(f"{f}: computed for other spots than this slide's ({len(spots)} vs {len(obs_names)}); "
                         "rerun stage 1 with --force.")
    return feats


def enhance_slide(adata, image_features: np.ndarray, cfg: dict):
    """Library function: gene selection, spatial weight matrix and enhancement (keys as module doc)."""
    from pipeline.preprocess import pca, select_genes
    from positions_enhancement.spatial_weights import enhance, estimate_spot_spacing, spatial_weight_matrix

    pre, enh = cfg["preprocess"], cfg["enhance"]
    sub = select_genes(adata, pre.get("n_top_genes"), pre.get("min_spots", 10), pre.get("flavor", "seurat_v3"))
    arr = sub.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy() if keys.ARRAY_COL in sub.obs else None
    spacing = estimate_spot_spacing(sub.obsm[keys.SPATIAL], arr)
    W = spatial_weight_matrix(sub.obsm[keys.SPATIAL], spacing, enh["radius"], enh["kernel"], enh["sigma"], arr)
    sub.layers[keys.ENHANCED] = enhance(sub.layers[keys.LOGNORM], W, enh["alpha"])
    from pipeline.metrics import morans_i
    sub.var[keys.MORANS_I] = morans_i(sub.layers[keys.LOGNORM], sub.obsm[keys.SPATIAL]).astype(np.float32)
    sub.obsm[keys.IMAGE_FEATURES] = image_features.astype(np.float32)
    if image_features.shape[1] > 0:
        pcs = pca(image_features, enh.get("image_pcs", 30), seed=cfg.get("seed", 0))
        sub.obsm[keys.IMAGE_ENHANCED] = enhance(pcs, W, enh["alpha"])
    else:
        sub.obsm[keys.IMAGE_ENHANCED] = np.zeros((sub.n_obs, 0), np.float32)
    from pipeline.graphs import store_graph
    store_graph(sub, keys.SPATIAL_WEIGHTS, W)
    sub.uns[keys.SPOT_SPACING] = float(spacing)
    return sub


def fingerprint(cfg: dict) -> str:
    from image_process.main import fingerprint as fp1
    return stages.fingerprint({k: cfg[k] for k in ("preprocess", "enhance", "seed")}, upstream=fp1(cfg))


def run_stage(cfg: dict, out: Path, device: str = "cpu", force: bool = False, slide=None) -> bool:
    """Stage 2 unless up to date; ``slide`` as in stage 1. Returns True if it ran."""
    from pipeline.plotting import spot_maps

    fp = fingerprint(cfg)
    if not force and stages.is_fresh(out, STAGE, fp, [OUTPUT]):
        log.info("stage 2 (enhancement): up to date, skipped (use --force to redo)")
        return False
    t0 = time.perf_counter()
    from image_process.main import FEATURES
    from image_process.main import STAGE as STAGE1
    from image_process.main import fingerprint as fp1
    if (out / FEATURES).exists():
        stages.check_upstream(out, STAGE1, fp1(cfg), out / FEATURES, "image_process/main.py")
    adata = slide() if slide else load_slide(cfg)
    feats = load_image_features(out, adata.obs_names)
    sub = enhance_slide(adata, feats, cfg)
    from image_process.features import spot_diameter_fullres
    from image_process.patches import add_plot_image
    from pipeline.metrics import most_patterned_genes
    add_plot_image(sub, spot_diameter_fullres(sub, cfg["image"]), cfg["image"].get("use", "auto"))
    stages.save_h5ad(out / OUTPUT, sub, cfg)
    if not stages.figures_off(cfg, out, [FIGURE]):
        gene = most_patterned_genes(sub.layers[keys.LOGNORM], sub.obsm[keys.SPATIAL], list(sub.var_names), 1,
                                    scores=sub.var[keys.MORANS_I])[0]
        g = sub.var_names.get_loc(gene)
        spot_maps(sub.obsm[keys.SPATIAL], {f"{gene} log-normalised": sub.layers[keys.LOGNORM][:, g],
                                           f"{gene} enhanced": sub.layers[keys.ENHANCED][:, g]}, out / FIGURE)
    seconds = time.perf_counter() - t0
    stages.update_metrics(out, {"n_spots": int(sub.n_obs), "n_genes_modelled": int(sub.n_vars),
                                "spot_spacing_px": float(sub.uns[keys.SPOT_SPACING])}, {STAGE: seconds},
                          stage=STAGE)
    stages.write_stamp(out, STAGE, fp)
    stages.write_stamp(out, TRUTH_STAMP, truth_fingerprint(cfg))
    log.info("stage 2 (enhancement): %d spots x %d genes, spacing %.4g px, in %.1fs",
             sub.n_obs, sub.n_vars, sub.uns[keys.SPOT_SPACING], seconds)
    return True


if __name__ == "__main__":
    stage_main(__doc__, run_stage)
