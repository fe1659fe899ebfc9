"""Stages 1-3 for one slide, shared by ``run_dlpfc.py`` and ``run_breast_cancer.py`` (datasets
differ only by config)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.cli import build_parser, output_lock, run_log, save_run_config, setup
from pipeline.demo import prepare_demo

log = logging.getLogger("stpipe")


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_stages(cfg: dict, out: Path, device: str, force: bool = False, progress: bool = True) -> dict:
    """Run stages 1-3 (each skipped when up to date) and return the metrics.

    The slide is read at most once, and only if stage 1 or 2 has to run.
    """
    from functools import lru_cache

    from image_process.main import run_stage as stage1
    from pipeline.domains import check_n_clusters
    from pipeline.slide import load_slide
    from pipeline.stage_domains import check_model, check_reference
    from pipeline.stage_domains import run_stage as stage3
    from pipeline.stages import read_metrics
    from positions_enhancement.run_enhancement import run_stage as stage2

    check_model(cfg)        # before stage 1, so a wrong model.name costs nothing
    check_reference(cfg, out)

    def checked(adata):     # the slide as read for stage 1: a number of domains it cannot have is refused now
        check_n_clusters(adata, cfg)
        return adata

    t0 = time.perf_counter()
    slide = lru_cache(maxsize=1)(lambda: checked(load_slide(cfg)))
    stage1(cfg, out, device, force, slide=slide)
    stage2(cfg, out, device, force, slide=slide)
    stage3(cfg, out, device, force, progress=progress, slide=slide)
    metrics = read_metrics(out)
    log.info("done in %.1fs: %s", time.perf_counter() - t0,
             {k: metrics[k] for k in ("ari", "nmi", "n_spots", "n_clusters") if k in metrics})
    return metrics


def main(default_config: str, description: str, argv=None) -> dict:
    args = build_parser(description, default_config, demo=True).parse_args(argv)
    cfg, out, device = setup(args, [DEMO_CONFIG] if args.demo else [])
    with output_lock(out), run_log(out, device):
        if args.demo:
            cfg = prepare_demo(cfg, out)
        save_run_config(cfg, out, device)
        return run_stages(cfg, out, device, args.force)
