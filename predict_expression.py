"""Stage 5: spot-level expression predicted from the H&E image alone (HESpotEx).

    python predict_expression.py --config configs/predict.yaml --out runs/predict_C2
    python predict_expression.py --config configs/predict.yaml --out runs/tcga \\
        --set predict.model_file=runs/predict_C2/05_model.pt --set 'train.sections=[]' \\
        --set 'test.sections=[{image: /data/TCGA-XX.svs, name: TCGA-XX}]'

Trains on ``train.sections`` (each: ``path``, or ``counts`` + ``spots``, plus ``image`` and an
optional ``name``) and predicts ``test.sections``; a test section with only ``image`` is a
whole-slide image: tissue is detected, a spot grid laid (``wsi.*``) and predicted tile by tile.
``predict.model_file`` reuses a saved model (no training). A rerun in the same ``--out`` reuses its
own ``05_model.pt`` as long as the training sections, their files and the training settings are
unchanged (changing only ``test.sections``, ``wsi.*``, ``predict.genes`` or ``predict.plot_genes``
predicts again without retraining; ``--force`` retrains).

Outputs in ``--out``: ``05_model.pt`` (the trained model, when trained here); per predicted section
``<name>/05_predicted.h5ad`` (``X`` predicted log1p(CP10k) of the model's genes, ``obsm['spatial']``
full-resolution / level-0 px, ``layers['measured']`` when the section has expression,
``obs['nuclei']`` nuclei counted per spot, ``uns['prediction']`` model, genes, training sections,
patch-CNN settings, ``uns['spatial'][name]`` the H&E at <= 2000 px with its scale factor and spot size, so
``sc.pl.spatial`` draws over it) and ``<name>/05_predicted.png`` (chosen genes over the H&E, predicted beside
measured; none with ``plot.figures`` false); ``metrics.json``
with ``sections: {name: {pcc_all, pcc_heg, mse, n_genes, n_spots, seen_in_training}}`` for sections with expression,
top-level ``pcc_all``/``pcc_heg``/``mse`` = their mean, ``model_reused`` (the saved model of an earlier
run was used), ``seconds`` per step (as ``predict_<step>``),
``seconds_per_1000_spots`` and ``peak_memory_gb``; all of them also under ``predict``, the stage's own copy
that another stage writing into the same folder (stage 4's ``pcc_all``) cannot replace.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from data import keys
from data.errors import InputError
from pipeline import stages
from pipeline.cli import stage_main
from pipeline.slide import weights_inputs

log = logging.getLogger("stpipe")
STAGE = "predict"
TRAIN_STAGE = "predict.train"   # the model's own stamp: reused while its training inputs are unchanged
MODEL_FILE = "05_model.pt"
OUTPUT_ONLY_KEYS = ("model_file", "genes", "plot_genes")   # predict.* keys that do not change the model
PREDICTED = "05_predicted.h5ad"
FIGURE = "05_predicted.png"         # in each section's folder


def peak_memory_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def train_fingerprint(cfg: dict, device: str, train_specs: list) -> str:
    """What ``05_model.pt`` depends on: the training sections (and their files), the training settings
    (``predict.*`` less :data:`OUTPUT_ONLY_KEYS`), ``image``, ``seed`` and the device. A rerun that changes
    only the test sections or those keys reuses the saved model instead of retraining."""
    from pipeline.sections import section_inputs
    pcfg = {k: v for k, v in cfg["predict"].items() if k not in OUTPUT_ONLY_KEYS}
    return stages.fingerprint({"train": cfg.get("train"), "predict": pcfg, "image": cfg.get("image"),
                               "seed": cfg.get("seed"), "device": device},
                              section_inputs(train_specs) + weights_inputs(cfg))


def run_stage(cfg: dict, out: Path, device: str = "cpu", force: bool = False, progress: bool = True) -> bool:
    from image_process.patches import patch_too_coarse
    from pipeline.expression_prediction import (Predictor, fit_predictor, image_settings, load_section,
                                                patch_geometry, predict_section, prediction_uns, restrict_genes,
                                                settings_not_used)
    from pipeline.sections import (check_disjoint, check_section_specs, is_whole_slide_spec,
                                   refuse_training_sections_beside, require_image_use, section_inputs)
    from pipeline.config import model_name
    from pipeline.metrics import most_patterned_genes
    from pipeline.preprocess import match_gene_names
    from pipeline.plotting import no_gene_panels, spot_maps
    from pipeline.wsi_prediction import check_whole_slide_mpp

    model_name(cfg, ("hespotex",), "hespotex")     # the only stage-5 model; a stage-4 name is an error
    require_image_use(cfg, "stage 5 (HESpotEx)")
    pcfg, wsi_cfg = cfg["predict"], cfg.get("wsi", {}) or {}
    train_specs = check_section_specs((cfg.get("train") or {}).get("sections"), "train.sections")
    test_specs = check_section_specs((cfg.get("test") or {}).get("sections"), "test.sections")
    if not test_specs and not train_specs:
        raise InputError("nothing to do: set train.sections (to train) and/or test.sections (to predict).")
    model_file = pcfg.get("model_file")
    if not model_file:
        check_disjoint(train_specs, test_specs)
    check_whole_slide_mpp(test_specs, wsi_cfg)
    fp = stages.fingerprint({k: cfg.get(k) for k in ("train", "test", "predict", "wsi", "image", "seed")}
                            | {"device": device} | ({} if stages.figures_wanted(cfg) else {"figures": False}),
                            section_inputs(train_specs + test_specs) + weights_inputs(cfg)
                            + ([model_file] if model_file else []))
    outputs = ([] if model_file else [MODEL_FILE]) + [f"{s['name']}/{PREDICTED}" for s in test_specs]
    if not force and stages.is_fresh(out, STAGE, fp, outputs):
        log.info("stage 5 (expression from image): up to date, skipped (use --force to redo)")
        return False

    seconds = {"features": 0.0, "train": 0.0, "predict": 0.0}
    loaded: dict = {}       # test sections read before training (name -> Section), with these settings:
    loaded_with = None
    n_train_spots = 0
    metrics: dict = {"model": "hespotex", "device": device}
    train_fp = None if model_file else train_fingerprint(cfg, device, train_specs)
    if model_file:
        from pipeline.config import resolve_path
        predictor = Predictor.load(resolve_path(model_file))
        refuse_training_sections_beside("predict.model_file", model_file, train_specs)
        log.info("loaded %s: %d genes, trained on %s", model_file, len(predictor.genes), predictor.train_sections)
        ignored = settings_not_used(predictor, cfg)
        if ignored:
            log.warning("%s predicts with the settings it was trained with; these config settings differ and are "
                        "not used: %s", model_file, ", ".join(ignored))
    elif not force and stages.is_fresh(out, TRAIN_STAGE, train_fp, [MODEL_FILE]):
        predictor = Predictor.load(out / MODEL_FILE)
        metrics["model_reused"] = True
        log.info("stage 5: %s is up to date for train.sections and the training settings; reused, not retrained "
                 "(use --force to retrain)", out / MODEL_FILE)
    else:
        t = time.perf_counter()
        train = [load_section(s, cfg["image"], device, patch_geometry(pcfg)) for s in train_specs]
        # the test sections' features take the same settings: computed now, a bad test section (spots off
        # its image, say) stops the run before training instead of after it
        loaded_with = (image_settings(cfg["image"]), patch_geometry(pcfg))
        loaded = {s["name"]: load_section(s, cfg["image"], device, patch_geometry(pcfg))
                  for s in test_specs if not is_whole_slide_spec(s)}
        seconds["features"] += time.perf_counter() - t
        n_train_spots = sum(s.n for s in train)
        t = time.perf_counter()
        predictor, info = fit_predictor(train, pcfg, cfg["image"], int(cfg.get("seed", 0)), device, progress)
        seconds["train"] = time.perf_counter() - t
        predictor.save(out / MODEL_FILE)
        stages.write_stamp(out, TRAIN_STAGE, train_fp)
        metrics.update(model_reused=False, n_train_spots=n_train_spots, train_sections=[s.name for s in train],
                       loss_first=info["loss_first"], loss_last=info["loss_last"])
        log.info("trained HESpotEx on %s (%d spots, %d genes) in %.1fs", metrics["train_sections"],
                 n_train_spots, len(predictor.genes), seconds["train"])
    keep = restrict_genes(predictor.genes, pcfg.get("genes"))

    asked_plot, plot_missing = match_gene_names(pcfg.get("plot_genes") or [], keep, "predict.plot_genes")
    if plot_missing:      # once for every section; not again when training warned of each already
        warned = set(match_gene_names(pcfg.get("plot_genes"), predictor.genes, "predict.plot_genes")[1]
                     if n_train_spots else [])
        (log.warning if set(plot_missing) - warned else log.debug)(
            "predict.plot_genes not predicted, left out of every section's map: %s", ", ".join(plot_missing))
    per_section, n_pred_spots = {}, 0
    for spec in test_specs:
        name = spec["name"]
        assert name not in predictor.train_sections or model_file, "a test section entered training"
        seen = name in predictor.train_sections
        if seen:
            log.warning("section %s was a training section of %s: its scores are not a test of the model",
                        name, model_file)
        if is_whole_slide_spec(spec):
            from pipeline.wsi_prediction import predict_whole_slide
            t = time.perf_counter()
            adata, thumb, tscale, info = predict_whole_slide(predictor, spec, wsi_cfg, device, progress)
            seconds["predict"] += time.perf_counter() - t
            adata = adata[:, keep].copy()
            adata.uns[keys.PREDICTION] = prediction_uns(predictor, name, keep, whole_slide=info)
            measured = None
            image, image_scale = thumb, tscale
        else:
            t = time.perf_counter()
            sec = loaded.pop(name, None)     # features and patches already computed, if with the model's settings
            if sec is None or loaded_with[0] != predictor.image or \
                    predictor.patch_geometry not in (None, loaded_with[1]):
                sec = load_section(spec, predictor.image, device, predictor.patch_geometry)
            if predictor.patch_geometry and patch_too_coarse(sec.patch_side_px, predictor.patch_geometry["px"]):
                log.warning("section %s: a patch of %.1f spot diameters is only %.0f px of %s, upsampled to %d px for "
                            "the model's patch CNN; a full-resolution image ('image') would give it real detail.", name,
                            predictor.patch_geometry["scale"], sec.patch_side_px, sec.image_source,
                            predictor.patch_geometry["px"])
            seconds["features"] += time.perf_counter() - t
            t = time.perf_counter()
            adata, scores = predict_section(predictor, sec, keep, device)
            seconds["predict"] += time.perf_counter() - t
            measured = adata.layers[keys.MEASURED]
            per_section[name] = {**scores, "n_spots": sec.n, "seen_in_training": seen}
            log.info("section %s: %s", name, {k: round(v, 4) for k, v in scores.items()})
            image, image_scale = (sec.plot_entry["images"]["hires"],
                                  sec.plot_entry["scalefactors"]["tissue_hires_scalef"])
        n_pred_spots += adata.n_obs
        stages.save_h5ad(out / name / PREDICTED, adata, cfg)
        if stages.figures_off(cfg, out / name, [FIGURE]):
            continue
        plot_genes = asked_plot if pcfg.get("plot_genes") else \
            most_patterned_genes(adata.X, adata.obsm[keys.SPATIAL], list(keep))
        panels = {}
        for g in plot_genes:
            panels[f"{g} predicted"] = adata[:, g].X.ravel()
            if measured is not None:
                panels[f"{g} measured"] = measured[:, keep.index(g)]
        if panels:
            spot_maps(adata.obsm[keys.SPATIAL], panels, out / name / FIGURE, image=image,
                      image_scale=image_scale, ncols=2 if measured is not None else 3, title=f"{name}: log1p(CP10k)")
        else:
            no_gene_panels(out / name / FIGURE, "predict.plot_genes")

    if per_section:
        metrics["sections"] = per_section
        for k in ("pcc_all", "pcc_heg", "mse"):
            metrics[k] = float(np.mean([v[k] for v in per_section.values()]))
        metrics["n_genes"] = len(keep)
    metrics["n_predicted_spots"] = n_pred_spots
    n_all = n_train_spots + n_pred_spots
    metrics["seconds_per_1000_spots"] = {
        "features": 1000 * seconds["features"] / max(n_all, 1),
        "train": 1000 * seconds["train"] / max(n_train_spots, 1) if n_train_spots else None,
        "predict": 1000 * seconds["predict"] / max(n_pred_spots, 1)}
    metrics["peak_memory_gb"] = peak_memory_gb()
    stages.update_metrics(out, metrics, {f"{STAGE}_{k}": v for k, v in seconds.items()},
                          drop=() if per_section else ("sections", "pcc_all", "pcc_heg", "mse", "n_genes"), stage=STAGE,
                          section=STAGE)
    stages.write_stamp(out, STAGE, fp)
    if per_section:
        log.info("stage 5 done: %s", {k: round(metrics[k], 4) for k in ("pcc_all", "pcc_heg", "mse") if k in metrics})
    elif test_specs:
        log.info("stage 5 done: %d spots predicted over %d section(s), none with measured expression to score",
                 n_pred_spots, len(test_specs))
    else:
        log.info("stage 5 done: no test.sections to predict; the model is %s (predict with it later: --set "
                 "predict.model_file=%s --set 'train.sections=[]' and the sections in test.sections)",
                 out / MODEL_FILE, out / MODEL_FILE)
    return True


if __name__ == "__main__":
    from pipeline.demo import prepare_predict_demo
    stage_main(__doc__, run_stage, "configs/predict.yaml", demo=prepare_predict_demo, reads=("train", "test"))
