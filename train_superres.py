"""Stage 4: super-resolved expression maps guided by histology -> ``04_superres.h5ad``.

    python train_superres.py --config configs/superres.yaml --out runs/sr_151673
    python train_superres.py --config configs/superres.yaml --set model.name=diffusion --out runs/sr_diff
    python train_superres.py --config configs/superres.yaml --set eval.protocol=recovery --out runs/sr_eval

``model.name`` (older spelling ``superres.model``): ``trihrge`` (multi-scale image features + low-resolution expression, a light
network) or ``diffusion`` (Diff-ST: cross-modal conditional diffusion, DDIM sampling). Both train on
the slide itself: the measured map is coarsened 2x2 and the model learns to restore it; it then
predicts a grid ``superres.factor`` times denser than the spots, over the tissue. With
``train.sections`` (section specs as in stage 5: ``path``, or ``counts`` + ``spots``, plus ``image``
and ``name``) the model also learns from those sections, posed the same task at the same scale
(their spots from their 2x2 super-spots; under ``eval.protocol=recovery`` a hidden half from the
other half), and is applied to the slide in ``data``; ``superres.train_self: false`` learns from
those sections only:

    python train_superres.py --config configs/superres.yaml --set data.path=../shared/data/dlpfc/151673 \\
        --set 'train.sections=[{path: ../shared/data/dlpfc/151674}]' --out runs/sr_151673_from_151674

``superres.model_file`` (a ``04_model.pt`` another run wrote) predicts the slide with that model, without
training (:func:`load_model_file`): the slide needs the model's genes, and the task must be the model's
(a grid or pooling model, or a recovery model); the slide's own expression and image statistics are used
(:meth:`pipeline.superres.Restorer.adapt`).

Outputs: ``04_superres.h5ad`` (one observation per grid location: ``X`` predicted log1p(CP10k),
``obsm['spatial']`` full-resolution px, ``uns['superres']`` model, genes, factor, protocol,
``uns['spatial']`` the image at <= 2000 px with the grid spacing as spot size, for ``sc.pl.spatial``),
``04_superres.png`` (measured spots beside the predicted grid for ``superres.plot_genes``; none with ``plot.figures`` false),
``04_model.pt`` (the trained model, :meth:`pipeline.superres.Restorer.save`: a rerun where only
``superres.factor`` changed predicts the new grid with it, :func:`regrid`, and writes
``grid_from_saved_model: true`` in ``metrics.json``) and,
with ``eval.protocol`` set, ``04_eval.h5ad`` (scored spots: ``X`` predicted, ``layers['measured']``)
and ``metrics.json`` keys ``pcc_all``, ``pcc_heg``, ``mse``, ``ssim``, ``n_genes``,
``seconds_train``, ``seconds_predict`` (the scored spots), ``seconds_predict_grid``, ``n_grid``,
``seconds: {superres: ...}`` (the whole stage: reading, training, predicting, writing),
``training_pairs`` (pairs per section trained on),
``patch_cnn`` (whether the learned image candidate was used, ``superres.patch_cnn``) and
``patch_blend`` (its weight, shared by all genes, in the prior of the base's stack; null when off) and
``guided_kernel`` (the settings of the expression-guided kernel chosen by leave-one-out on the
context, when queries lie between measured spots as in ``recovery``; else null) and, for the
diffusion model, ``diffusion_residual_weight`` (the weight, in [0, 1], its sampled residual gets on
top of the low-res base, calibrated on held-out training pairs; at 0 nothing is sampled). All of them
are also under ``superres``, the stage's own copy that another stage writing into the same folder
(stage 5's ``pcc_all``) cannot replace, with ``n_genes_modelled`` (the genes modelled here; the top-level
key of that name is stage 2's).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd

from data import keys
from data.errors import InputError
from pipeline import stages
from pipeline.cli import stage_main
from pipeline.slide import data_inputs, data_without_truth, load_slide

log = logging.getLogger("stpipe")
STAGE = "superres"
OUTPUT = "04_superres.h5ad"
FIGURE = "04_superres.png"
MODEL_FILE = "04_model.pt"                 # the trained model (pipeline.superres.Restorer.save)
TRAINING_STAMP = f"{STAGE}.training"       # its fingerprint (training_fingerprint)
MAX_GRID_POINTS = 2_000_000     # superres.factor is refused beyond a grid this large (factor 100 on DLPFC: 36 million)
MIN_VISIBLE_SPOTS = 10          # fewer spots (or super-spots) for the model to see leave it nothing to learn from


def superres_model(cfg: dict) -> str:
    """``model.name`` (or its older spelling ``superres.model``): trihrge (default) or diffusion."""
    from pipeline.config import model_name
    from pipeline.superres import MODELS
    return model_name(cfg, MODELS, "trihrge", alias="superres.model")


def params_from_config(cfg: dict):
    from models.superres_training import SuperresParams
    sr = cfg["superres"]
    fields = SuperresParams.__dataclass_fields__
    return SuperresParams(**{k: sr[k] for k in fields if k in sr}, seed=int(cfg.get("seed", 0)))


def choose_genes(adata, ctx, sr: dict, n_score: int, protocol) -> tuple[list, list]:
    """(modelled genes, scored genes), both from what the model may see (the context)."""
    from pipeline.preprocess import match_gene_names, seurat_v3_top_genes
    from pipeline.superres import scoring_genes

    names = list(adata.var_names)
    if sr.get("genes"):
        genes, missing = match_gene_names(sr["genes"], names, "superres.genes")
        if missing:
            raise InputError(f"superres.genes: {len(missing)} gene(s) not in the slide: {', '.join(missing[:10])} "
                             f"(the slide has {adata.n_vars} genes, e.g. {', '.join(names[:5])}).")
    else:
        detected = np.asarray((ctx.counts > 0).sum(0)).ravel() > 0
        n_top = int(min(sr.get("n_top_genes", 300), detected.sum()))
        hv = seurat_v3_top_genes(ctx.counts[:, detected], n_top, "name the genes: --set 'superres.genes=[GENE1, GENE2]'")
        genes = [names[i] for i in np.flatnonzero(detected)[hv]]
    score = scoring_genes(ctx, names, n_score) if protocol else []
    genes = list(dict.fromkeys(genes + score))
    return genes, score


def model_file_path(cfg: dict, out: Path | None = None) -> Path | None:
    """``superres.model_file`` as a path (None when unset); refused when missing or ``out``'s own model."""
    from pipeline.config import input_file

    return input_file(cfg, "superres.model_file", f"a {MODEL_FILE} that train_superres.py wrote",
                      own=None if out is None else Path(out) / MODEL_FILE, own_name="model",
                      own_fix="unset superres.model_file (a rerun here reuses it by itself), or copy it elsewhere first.")


def load_model_file(cfg: dict, device: str):
    """``superres.model_file`` (a ``04_model.pt`` another run wrote), read: (the model, its genes), or None
    when the key is unset. Refused, naming the key: a missing or foreign file, a ``model.name`` other than the
    file's model, a model for another task than ``eval.protocol`` poses (:func:`check_model_task`), and
    ``train.sections`` (the file is a trained model; nothing is trained with it).
    ``superres.*`` training settings do not apply to it (it predicts as it was trained)."""
    from pipeline.sections import check_section_specs, refuse_training_sections_beside
    from pipeline.superres import PROTOCOL_TASKS, Restorer

    path = model_file_path(cfg)
    if path is None:
        return None
    given = cfg["superres"]["model_file"]
    try:
        restorer, genes = Restorer.load(path, device)
    except ValueError as exc:
        raise InputError(f"superres.model_file: {exc}; give a 04_model.pt that train_superres.py wrote.") from None
    asked = (cfg.get("model") or {}).get("name") or (cfg.get("superres") or {}).get("model")
    if asked and asked != restorer.name:
        raise InputError(f"superres.model_file={given} is a {restorer.name} model, but model.name={asked}: unset "
                         f"model.name or give a {asked} model.")
    protocol = (cfg.get("eval") or {}).get("protocol")
    check_model_task(restorer, PROTOCOL_TASKS[protocol], protocol, given)
    refuse_training_sections_beside("superres.model_file", given,
                                    check_section_specs((cfg.get("train") or {}).get("sections"), "train.sections"))
    return restorer, genes


def model_genes(adata, genes: list, cfg: dict) -> list:
    """The genes of ``superres.model_file``'s model, checked to be in the slide (their order is the model's);
    ``superres.genes`` / ``n_top_genes`` do not apply and a differing ``superres.genes`` is named in a warning."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise InputError(f"superres.model_file={cfg['superres']['model_file']}: the slide lacks {len(missing)} of the "
                         f"model's {len(genes)} genes ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); "
                         "a model predicts the genes it was trained on, so the slide needs them all (same gene names).")
    asked = cfg["superres"].get("genes")
    if asked and list(asked) != list(genes):
        log.warning("superres.genes is not used: superres.model_file predicts the %d genes it was trained on",
                    len(genes))
    return list(genes)


def modelled_scoring_genes(visible, names: list, genes: list, n_score: int, given: str) -> list:
    """The scored genes of a run with ``superres.model_file``: the protocol's own (top ``n_score`` by mean
    log-expression over what the model may see, ``visible``, among all the slide's genes ``names``), less those
    the model does not predict, which a warning counts, so that scores compare with a run that trains here on
    the genes they share. None left is refused."""
    from pipeline.superres import scoring_genes

    wanted = scoring_genes(visible, names, n_score)
    modelled = set(genes)
    score = [g for g in wanted if g in modelled]
    if not score:
        raise InputError(f"superres.model_file={given}: none of the {len(wanted)} genes the protocol scores (the "
                         "highest mean expression) is among the model's genes; train the model with superres.genes "
                         "holding them.")
    if len(score) < len(wanted):
        log.warning("superres.model_file: %d of the %d scored genes (top by mean expression) are not among the model's "
                    "genes and are not scored; pcc_all is over the other %d (train the model with superres.genes "
                    "holding them to score all)", len(wanted) - len(score), len(wanted), len(score))
    return score


TASKS = {"coarsen": ("restoring spots from 2x2 super-spots", "with no eval.protocol or with pooling"),
         "loo": ("predicting hidden spots from their visible neighbours", "with eval.protocol=recovery")}


def check_model_task(restorer, pairs: str, protocol, given: str) -> None:
    """Refuse a saved model trained for another task than this run poses (``pairs``: 'coarsen' for the grid and
    pooling, 'loo' for recovery): its low-resolution candidates and geometry are those of its task."""
    if restorer.pairs != pairs:
        raise InputError(f"superres.model_file={given} was trained for {TASKS[restorer.pairs][0]}; "
                         f"eval.protocol={protocol} asks for {TASKS[pairs][0]}: give a model trained "
                         f"{TASKS[pairs][1]}.")


def load_training_sections(cfg: dict, genes: list) -> list:
    """``train.sections`` as :class:`pipeline.superres.TrainingSection` over ``genes`` (the slide's
    modelled genes; one a section lacks is zero there, with a warning). The slide itself
    (``data``) may not be among them."""
    from image_process.patches import check_spots_on_image
    from pipeline.sections import check_disjoint, check_section_specs, read_section, section_name
    from pipeline.superres import NEEDS_IMAGE, SectionImage, TrainingSection, spots_as_locations

    specs = check_section_specs((cfg.get("train") or {}).get("sections"), "train.sections")
    if not specs:
        return []
    check_disjoint(specs, [dict(cfg["data"], name=section_name(cfg["data"], 0))], what="the slide (data)")
    out = []
    for s in specs:
        a, image, diameter = read_section(s, cfg["image"], "train.sections", NEEDS_IMAGE)
        if cfg["image"].get("check_tissue", True):
            try:
                check_spots_on_image(a.obsm[keys.SPATIAL], image, diameter)
            except InputError as exc:
                raise InputError(f"train.sections {s['name']}: {exc}") from None
        missing = [g for g in genes if g not in a.var_names]
        if len(missing) == len(genes):
            raise InputError(f"train.sections {s['name']}: none of the slide's {len(genes)} modelled genes (e.g. "
                             f"{', '.join(genes[:3])}) is in it (it has e.g. {', '.join(map(str, a.var_names[:3]))}); "
                             "are the gene identifiers of the same kind (symbols vs Ensembl ids) and the species the same?")
        if missing:
            log.warning("train.sections %s lacks %d of the %d modelled genes (%s...); they count as unmeasured there",
                        s["name"], len(missing), len(genes), ", ".join(missing[:5]))
        spots = spots_as_locations(a, genes, allow_missing=True)
        out.append(TrainingSection(s["name"], spots, SectionImage(image, diameter, spots.spacing)))
    return out


def warn_unmodelled_plot_genes(plot_genes, modelled) -> list:
    """Warn, before training, of ``superres.plot_genes`` that are not among the ``modelled`` genes
    (04_superres.png leaves them out after training); returns them."""
    from pipeline.preprocess import warn_genes_left_out

    return warn_genes_left_out(plot_genes, modelled, "superres.plot_genes", "modelled genes",
                               "04_superres.png will leave them out: add them to superres.genes (or check the spelling)")


def super_resolve(adata, cfg: dict, device: str = "cpu", progress: bool = True, grid: bool = True) -> dict:
    """Library entry: train on the slide (or on the protocol's context) and predict.

    Returns {'grid': AnnData (None with ``grid=False``: only the protocol's scored spots are
    predicted, as the benchmark does), 'eval': AnnData or None, 'metrics': dict}.
    """
    import anndata as ad

    from image_process.features import spot_diameter_fullres
    from image_process.patches import choose_image, close_image, scanpy_spatial_entry
    from pipeline.config import resolve_path
    from pipeline.sections import require_image_use
    from pipeline.superres import (PROTOCOL_TASKS, Restorer, make_split, require_slide_image, spots_as_locations,
                                  superres_scores)

    sr, ev = cfg["superres"], cfg.get("eval", {}) or {}
    saved = load_model_file(cfg, device)       # (Restorer, genes) of superres.model_file, or None
    name = saved[0].name if saved else superres_model(cfg)
    protocol = ev.get("protocol")
    library = library_name(adata, cfg)
    if grid:
        grid_factor(cfg, adata.n_obs)
    require_image_use(cfg, f"stage 4 ({name})")
    image = choose_image(adata, cfg["image"].get("use", "auto"))
    require_slide_image(image, name)
    # genes are chosen on counts alone (a full Space Ranger matrix has ~33,000), then only they are
    # log-normalised; the split depends on positions and the seed only, so both passes agree
    probe = spots_as_locations(adata, list(adata.var_names), with_expr=False)
    visible = make_split(probe, protocol, int(ev.get("seed", 0))).context if protocol else probe
    if len(visible.xy) < MIN_VISIBLE_SPOTS:
        unit = ("super-spot" if protocol == "pooling" else "spot") + ("s" if len(visible.xy) != 1 else "")
        seen = (f"{len(visible.xy)} {unit} visible under the "
                f"{protocol} protocol, of {adata.n_obs}" if protocol else f"{adata.n_obs} spots")
        raise InputError(f"stage 4 learns the map from the spots it may see, coarsened further, and this slide gives "
                         f"it {seen}: at least {MIN_VISIBLE_SPOTS} are needed. Give a larger slide"
                         f"{' or another eval.protocol' if protocol else ''}.")
    if saved:
        genes = model_genes(adata, saved[1], cfg)
        score = modelled_scoring_genes(visible, list(adata.var_names), genes, int(ev.get("n_score_genes", 250)),
                                       sr["model_file"]) if protocol else []
    else:
        genes, score = choose_genes(adata, visible, sr, int(ev.get("n_score_genes", 250)), protocol)
    del probe, visible
    if grid:
        warn_unmodelled_plot_genes(sr.get("plot_genes"), genes)
    spots = spots_as_locations(adata, genes)
    if grid:
        warn_grid_finer_than_pixels(cfg, spots, image)
    if protocol:
        split = make_split(spots, protocol, int(ev.get("seed", 0)))
        ctx, pairs = split.context, split.pairs
    else:
        split, ctx, pairs = None, spots, PROTOCOL_TASKS[None]
    log.info("stage 4 (%s): %d genes modelled%s, %d spots%s", name, len(genes),
             f" ({len(score)} scored)" if protocol else "", len(ctx.xy), f" visible under the {protocol} protocol"
             if protocol else "")
    diameter = spot_diameter_fullres(adata, cfg["image"])
    if cfg["image"].get("check_tissue", True):
        from image_process.patches import check_spots_on_image
        check_spots_on_image(spots.xy, image, diameter)

    t0 = time.perf_counter()
    if saved:
        restorer = saved[0]
        restorer.adapt(ctx, image, diameter, spots.spacing)
        log.info("stage 4 (%s): predicting with %s (trained on %s), not training", name, sr["model_file"],
                 ", ".join("its own slide" if k == "self" else k for k in restorer.n_pairs))
    else:
        restorer = Restorer(name, ctx, image, diameter, spots.spacing, params_from_config(cfg), device)
        others = load_training_sections(cfg, genes)
        restorer.fit(pairs, progress=progress, others=others, train_self=bool(sr.get("train_self", True)))
        for section in others:       # their images are read in training only
            close_image(section.image.image)
        del others
    t_train = time.perf_counter() - t0
    metrics = {"model": name, "protocol": protocol, "seconds_train": t_train, "n_genes_modelled": len(genes),
               "training_pairs": dict(restorer.n_pairs), "patch_cnn": restorer.patch_cnn is not None,
               "patch_blend": restorer.patch_blend, "guided_kernel": _guided_record(restorer)}
    if saved:
        metrics["model_file"] = str(Path(resolve_path(sr["model_file"])).resolve())
    if name == "diffusion":
        from models.superres_training import residual_weight
        metrics["diffusion_residual_weight"] = residual_weight(restorer.model)
        if metrics["diffusion_residual_weight"] == 0.0:
            log.info("stage 4 (diffusion): the sampled residual did not help on held-out training pairs "
                     "(calibrated weight 0): predictions are the low-resolution base, so no sampling is done")
    eval_ad = None
    if split is not None:
        t1 = time.perf_counter()
        pred = restorer.predict(split.queries_xy, spots.spacing, progress)
        metrics["seconds_predict"] = time.perf_counter() - t1
        truth = split.truth
        arr = spots.array[split.query_index] if spots.array is not None else None
        metrics.update(superres_scores(pred, truth, genes, score, arr))
        eval_ad = ad.AnnData(X=pred, obs=pd.DataFrame(index=adata.obs_names[split.query_index]),
                             var=pd.DataFrame(index=genes))
        eval_ad.layers[keys.MEASURED] = truth
        eval_ad.obsm[keys.SPATIAL] = split.queries_xy
        eval_ad.uns[keys.SCORE_GENES] = score
        eval_ad.uns[keys.SPATIAL_UNS] = {library: scanpy_spatial_entry(image, diameter)}

    if not grid:
        close_image(image)           # a streamed image holds its file open; the returned restorer reads it no more
        return {"grid": None, "eval": eval_ad, "metrics": metrics, "spots": spots, "genes": genes}
    grid_ad, grid_metrics = predict_grid(restorer, cfg, spots, genes, image, library, progress)
    close_image(image)
    metrics.update(grid_metrics)
    return {"grid": grid_ad, "eval": eval_ad, "metrics": metrics, "spots": spots, "genes": genes,
            "restorer": restorer}


def library_name(adata, cfg: dict) -> str:
    """The library id the outputs' ``uns['spatial']`` entry is written under."""
    return keys.library_id(adata) or cfg["data"].get("name") or "slide"


def grid_factor(cfg: dict, n_spots: int) -> float:
    """``superres.factor``, checked: at least 1, and a grid of at most :data:`MAX_GRID_POINTS` locations."""
    factor = (cfg.get("superres") or {}).get("factor", 2)
    if factor is None or factor < 1:
        raise InputError(f"superres.factor={factor}: must be >= 1 (how many times denser than the spots).")
    if n_spots * factor ** 2 > MAX_GRID_POINTS:
        raise InputError(f"superres.factor={factor:g}: the grid would hold ~{n_spots * factor ** 2:,.0f} locations "
                         f"({n_spots} spots x {factor:g}^2), more than {MAX_GRID_POINTS:,}; at most "
                         f"{(MAX_GRID_POINTS / n_spots) ** 0.5:.0f} for this slide.")
    return factor


def warn_grid_finer_than_pixels(cfg: dict, spots, image) -> None:
    """Say so when the grid's locations would lie closer than the image's pixels (before training)."""
    factor = grid_factor(cfg, len(spots.xy))
    if image is not None and spots.spacing / factor * image.scale < 1:
        log.warning("superres.factor=%g: grid locations %.2f px apart in %s, finer than its pixels; the image "
                    "cannot guide the map at that scale", factor, spots.spacing / factor * image.scale, image.source)


def predict_grid(restorer, cfg: dict, spots, genes: list, image, library: str, progress: bool = True) -> tuple:
    """The trained ``restorer``'s prediction on the grid ``superres.factor`` times denser than ``spots``
    (the slide's spots over the modelled ``genes``), over the tissue of ``image``: (the AnnData of
    ``04_superres.h5ad``, metrics ``seconds_predict_grid`` and ``n_grid``)."""
    import anndata as ad

    from image_process.patches import scanpy_spatial_entry, tissue_mask
    from pipeline.superres import superres_grid

    factor = grid_factor(cfg, len(spots.xy))
    mask, mscale = tissue_mask(image.pixels)
    grid_xy = superres_grid(spots.xy, spots.spacing, factor, (mask, mscale * image.scale), array=spots.array)
    log.info("stage 4 (%s): predicting the x%g grid, %d locations over the tissue", restorer.name, factor, len(grid_xy))
    t0 = time.perf_counter()
    grid_pred = restorer.predict(grid_xy, spots.spacing / factor, progress)
    metrics = {"seconds_predict_grid": time.perf_counter() - t0, "n_grid": len(grid_xy)}
    grid_ad = ad.AnnData(X=grid_pred, obs=pd.DataFrame(index=[f"g{i}" for i in range(len(grid_xy))]),
                         var=pd.DataFrame(index=genes))
    grid_ad.obsm[keys.SPATIAL] = grid_xy
    protocol = (cfg.get("eval") or {}).get("protocol")
    grid_ad.uns[keys.SUPERRES] = {"model": restorer.name, "genes": genes, "factor": float(factor),
                                  "protocol": protocol or "none", "image": image.source,
                                  "training_pairs": dict(restorer.n_pairs),
                                  "patch_cnn": restorer.patch_cnn is not None,
                                  "patch_blend": float("nan") if restorer.patch_blend is None else restorer.patch_blend,
                                  "grid_spacing_px": float(spots.spacing / factor)}
    grid_ad.uns[keys.SPATIAL_UNS] = {library: scanpy_spatial_entry(image, spots.spacing / factor)}
    return grid_ad, metrics


def _guided_record(restorer) -> dict | None:
    """The guided kernel's settings on the slide's own context (recovery), for metrics.json."""
    from dataclasses import asdict
    settings = restorer.guided_settings
    return None if settings is None else asdict(settings)


def training_fingerprint(cfg: dict, device: str) -> str:
    """What the trained model (``04_model.pt``) and ``04_eval.h5ad`` depend on: every setting but
    ``superres.factor`` (the grid) and ``superres.plot_genes`` (the figure: :func:`plot_settings`), the
    slide and training sections' files, the device; not the domain labels ``data.truth``, which stage 4
    does not use."""
    from pipeline.sections import check_section_specs, section_inputs
    train = check_section_specs((cfg.get("train") or {}).get("sections"), "train.sections")   # before any work
    parts = {k: cfg.get(k) for k in ("image", "eval", "seed", "train")} | {"data": data_without_truth(cfg)}
    parts["superres"] = {k: v for k, v in (cfg.get("superres") or {}).items() if k not in ("plot_genes", "factor")}
    model_file = (cfg.get("superres") or {}).get("model_file")
    return stages.fingerprint(parts | {"device": device, "model": superres_model(cfg)},
                              data_inputs(cfg) + section_inputs(train) + ([model_file] if model_file else []))


def fingerprint(cfg: dict, device: str) -> str:
    """The stage's fingerprint: the trained model's (:func:`training_fingerprint`) and ``superres.factor``;
    a change of the factor alone predicts the new grid with the saved model (:func:`regrid`)."""
    return stages.fingerprint({"factor": (cfg.get("superres") or {}).get("factor", 2)},
                              upstream=training_fingerprint(cfg, device))


def plot_settings(cfg: dict) -> dict:
    """What only the figure uses (``superres.plot_genes``, ``plot.figures``): changing it redraws
    ``04_superres.png`` from ``04_superres.h5ad`` and the slide (or removes it), without retraining."""
    return {"plot_genes": (cfg.get("superres") or {}).get("plot_genes"), "figures": stages.figures_wanted(cfg)}


# metrics.json keys written only under an evaluation protocol or by the diffusion model: dropped before a
# rerun writes its own, also in a folder written before stages recorded their keys (stages.update_metrics)
OPTIONAL_METRICS = ("seconds_predict", "pcc_all", "pcc_heg", "mse", "ssim", "n_genes", "diffusion_residual_weight")


def run_stage(cfg: dict, out: Path, device: str = "cpu", force: bool = False, progress: bool = True) -> bool:
    from pipeline.sections import require_image_use
    from pipeline.superres_patches import PatchCandidateSettings

    PatchCandidateSettings.from_config((cfg.get("superres") or {}).get("patch_cnn"))  # its errors before any reading
    require_image_use(cfg, f"stage 4 ({superres_model(cfg)})")
    model_file_path(cfg, out)
    fp = fingerprint(cfg, device)
    outputs = [OUTPUT] + (["04_eval.h5ad"] if (cfg.get("eval") or {}).get("protocol") else [])
    if not force and stages.is_fresh(out, STAGE, fp, outputs):
        def redraw():
            import anndata as ad

            from pipeline.superres import spots_as_locations
            grid = ad.read_h5ad(out / OUTPUT)
            draw_figure(cfg, out, spots_as_locations(load_slide(cfg), list(grid.var_names)), grid)
        stages.figures_fresh_or_redrawn(out, STAGE, fp, cfg, plot_settings(cfg), [FIGURE], redraw,
                                        "stage 4 (super-resolution)", "figure redrawn for the plot settings")
        return False
    tfp = training_fingerprint(cfg, device)
    # regrid keeps the training's and the protocol's scores from metrics.json: with them gone, train again
    if not force and stages.is_fresh(out, TRAINING_STAMP, tfp, outputs + [MODEL_FILE]) and \
            stages.metrics_kept(out, STAGE) and regrid(cfg, out, fp, device, progress):
        return True
    t0 = time.perf_counter()
    adata = load_slide(cfg)
    res = super_resolve(adata, cfg, device, progress)
    stages.save_h5ad(out / OUTPUT, res["grid"], cfg)
    res["restorer"].save(out / MODEL_FILE, res["genes"])
    if res["eval"] is not None:
        stages.save_h5ad(out / "04_eval.h5ad", res["eval"], cfg)
    elif (out / "04_eval.h5ad").exists():        # a previous run's evaluation, which this run's grid does not match
        (out / "04_eval.h5ad").unlink()
        log.info("removed %s: written by an earlier run with eval.protocol set; this run has none", out / "04_eval.h5ad")
    draw_figure(cfg, out, res["spots"], res["grid"], warned=True)
    m = _rounded(res["metrics"])
    stages.update_metrics(out, m, {STAGE: time.perf_counter() - t0}, drop=OPTIONAL_METRICS,   # the whole stage, as 1-3
                          stage=STAGE, section=STAGE, section_only=("n_genes_modelled",))
    stages.write_stamp(out, TRAINING_STAMP, tfp)
    stages.write_stamp(out, STAGE, fp)
    stages.write_figures_stamp(out, STAGE, fp, plot_settings(cfg))
    log.info("stage 4 (%s): %s", res["metrics"]["model"],
             {k: m[k] for k in ("pcc_all", "pcc_heg", "mse", "ssim", "seconds_train", "seconds_predict", "n_grid") if k in m})
    return True


def _rounded(metrics: dict) -> dict:
    """``metrics`` with floats to 4 decimals, as ``metrics.json`` holds them."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def regrid(cfg: dict, out: Path, fp: str, device: str, progress: bool = True) -> bool:
    """A finished run whose settings changed only in ``superres.factor``: the grid is predicted again by
    the saved model (``04_model.pt``) on the slide it was trained on, as a full rerun would predict it,
    without retraining. Rewrites ``04_superres.h5ad``, the figure, the stage's stamps and its metrics
    (``n_grid``, ``seconds_predict_grid``, ``seconds.superres`` this run's, ``grid_from_saved_model``: true;
    the training's and the protocol's scores, which the factor does not change, are kept).
    ``04_eval.h5ad`` is left as it is. Returns False (nothing written) when the model file cannot be
    loaded, so that the caller retrains."""
    from image_process.features import spot_diameter_fullres
    from image_process.patches import choose_image, close_image
    from pipeline.superres import Restorer, make_split, spots_as_locations

    t0 = time.perf_counter()
    try:
        restorer, genes = Restorer.load(out / MODEL_FILE, device)
    except ValueError as exc:
        log.warning("%s; retraining stage 4", exc)
        return False
    adata = load_slide(cfg)
    image = choose_image(adata, cfg["image"].get("use", "auto"))
    spots = spots_as_locations(adata, genes)
    warn_grid_finer_than_pixels(cfg, spots, image)
    ev = cfg.get("eval") or {}
    ctx = make_split(spots, ev["protocol"], int(ev.get("seed", 0))).context if ev.get("protocol") else spots
    restorer.attach(ctx, image, spot_diameter_fullres(adata, cfg["image"]), spots.spacing)
    log.info("stage 4 (%s): only superres.factor changed; predicting the new grid with the saved model %s",
             restorer.name, out / MODEL_FILE)
    library = library_name(adata, cfg)
    grid, grid_metrics = predict_grid(restorer, cfg, spots, genes, image, library, progress)
    close_image(image)
    stages.save_h5ad(out / OUTPUT, grid, cfg)
    draw_figure(cfg, out, spots, grid)
    previous = stages.read_metrics(out).get(STAGE)
    m = {**(previous if isinstance(previous, dict) else {}), "grid_from_saved_model": True,
         **_rounded(grid_metrics)}
    stages.update_metrics(out, m, {STAGE: time.perf_counter() - t0}, stage=STAGE, section=STAGE,
                          section_only=("n_genes_modelled",))
    stages.write_stamp(out, STAGE, fp)
    stages.write_figures_stamp(out, STAGE, fp, plot_settings(cfg))
    log.info("stage 4 (%s): x%g grid, %d locations, in %.1fs from the saved model", restorer.name,
             grid.uns[keys.SUPERRES]["factor"], grid_metrics["n_grid"], time.perf_counter() - t0)
    return True


def draw_figure(cfg: dict, out: Path, spots, grid, warned: bool = False) -> None:
    """``04_superres.png``: for each of ``superres.plot_genes`` (default: the 3 modelled genes with the
    highest Moran's I on the measured spots) the measured spots beside the predicted grid.
    ``spots``: the slide's spots over the grid's genes (:func:`pipeline.superres.spots_as_locations`);
    ``grid``: the AnnData of ``04_superres.h5ad``; ``warned``: the run warned before training of the genes it
    leaves out (:func:`warn_unmodelled_plot_genes`), so they are not named again (debug level only). With
    ``plot.figures`` false nothing is drawn and an earlier run's figure is removed."""
    from pipeline.metrics import most_patterned_genes
    from pipeline.plotting import no_gene_panels, spot_maps
    from pipeline.preprocess import match_gene_names

    if stages.figures_off(cfg, out, [FIGURE]):
        return

    modelled = list(grid.var_names)
    panels = {}
    genes, missing = match_gene_names(cfg["superres"].get("plot_genes")
                                      or most_patterned_genes(spots.expr, spots.xy, modelled), modelled,
                                      "superres.plot_genes")
    if missing:
        (log.debug if warned else log.warning)("superres.plot_genes not modelled, skipped: %s (superres.genes lists "
                                              "the genes to model)", ", ".join(missing))
    for g in genes:
        panels[f"{g} measured (spots)"] = spots.expr[:, modelled.index(g)]
        panels[f"{g} predicted (x{grid.uns[keys.SUPERRES]['factor']:g} grid)"] = (
            grid.obsm[keys.SPATIAL], grid[:, g].X.ravel())
    if panels:
        model = grid.uns[keys.SUPERRES]["model"]
        spot_maps(spots.xy, panels, out / FIGURE, ncols=2, title=f"{model}: log1p(CP10k), each panel its own scale")
    else:
        no_gene_panels(out / FIGURE, "superres.plot_genes")


if __name__ == "__main__":
    from pipeline.demo import prepare_superres_demo
    stage_main(__doc__, run_stage, "configs/superres.yaml", demo=prepare_superres_demo, reads=("data", "train"))
