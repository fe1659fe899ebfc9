"""The pipeline from Python (a notebook, or a script of one's own): every stage on an AnnData in memory,
nothing written to disk. The stage scripts call the same library functions, so a slide gives the same
numbers here as through the scripts with the same settings (``tests/test_api.py`` checks it).

    import scanpy as sc
    from pipeline import api

    adata = api.read("/data/151673", truth="/data/151673/151673_truth.txt")   # anything data.path takes
    res = api.domains(adata, n_clusters=7)          # stages 1-3 -> obs['domain'], layers['denoised'], ...
    sc.pl.spatial(res, color="domain")
    res9 = api.recluster(res, n_clusters=9)         # the same network's embedding in 9 domains, in seconds
    res_b = api.match_domains(res_b, res)           # another slice's domains named after these (cluster.reference)
    both = api.joint_domains({"151673": api.enhance(adata), "151674": api.enhance(b)})   # one model, shared domains
    grid = api.super_resolve(adata, factor=2)       # stage 4 -> one observation per grid location
    sc.pl.spatial(grid, color="MOBP")
    model = api.train_expression_model({"A": a, "B": b})        # stage 5: HESpotEx on sections by name
    pred = api.predict_expression(model, c, name="C")           # a section with spots (scored)
    wsi = api.predict_whole_slide(model, "/data/TCGA-XX.svs")   # an H&E with no sequencing at all
    table = api.cross_validate_expression({"A": a, "B": b, "C": c})   # leave one section out, with the baseline

An AnnData made elsewhere (``sc.read_visium``, ``sc.read_h5ad``, squidpy's readers) is taken as it is:
raw counts in ``X`` (or ``layers['counts']``, or ``adata.raw``), spot centres in ``obsm['spatial']``
(full-resolution px) and images under ``uns['spatial'][library_id]``, checked as the readers check a
file (:func:`prepare`). Every stage function returns a new AnnData (:func:`train_expression_model`: the
trained model) and leaves the one it was given unchanged.

Settings are the scripts' config: ``config`` is a YAML file (as ``--config``), ``settings`` a mapping
of dotted keys to values (as ``--set``: ``{"enhance.alpha": 0.3, "seed": 1}``), merged over
``configs/defaults.yaml`` and checked the same way (an unknown key or a value of the wrong kind is
refused). Bad input raises :class:`data.errors.InputError` with the scripts' one-line message.
Progress goes to the ``stpipe`` logger (``logging.basicConfig(level=logging.INFO)`` shows it).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from data import keys
from data.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger("stpipe")

SOURCE = Path("adata")   # how an in-memory AnnData is named in error messages ("adata: obsm['spatial'] is missing")


def settings(config=None, settings: dict | None = None) -> dict:
    """The merged config: ``configs/defaults.yaml`` <- the YAML file ``config`` <- ``settings`` (dotted key
    -> value, values as Python objects), checked as the command line checks ``--config`` and ``--set``."""
    from pipeline.config import (absolute_input_paths, check_loss_terms, check_sampling_steps, deep_merge,
                                 load_config)

    defaults = load_config()
    cfg = load_config(config) if config else defaults
    for key, value in (settings or {}).items():
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"settings: {key!r} is not a config key; use dotted names, e.g. "
                             "{'model.n_clusters': 7}.")
        node: dict = {}
        cur = node
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = copy.deepcopy(value)
        cfg = deep_merge(cfg, node, strict=True, reference=defaults)
    check_loss_terms(cfg)
    check_sampling_steps(cfg)
    return absolute_input_paths(cfg)


# settings the stage functions do not read: they take the AnnData (a slide's data.* is api.read's) and sections
# as AnnData (train/test.sections are predict_expression.py's)
NOT_STAGE_SETTINGS = ("data.", "train.sections", "test.sections")


def _config(config, extra: dict | None, given: dict) -> dict:
    """:func:`settings` with the keyword arguments a function names (``given``: dotted key -> value, None
    = not given) over ``extra``; a setting no stage function reads (:data:`NOT_STAGE_SETTINGS`) is refused:
    ``settings={"data.truth": ...}`` was dropped without a word."""
    merged = dict(extra or {})
    merged.update({k: v for k, v in given.items() if v is not None})
    unread = [k for k in _flat(merged) if str(k).startswith(NOT_STAGE_SETTINGS)]
    if unread:
        raise InputError(f"settings: {', '.join(unread)} would not be used: the stage functions take the AnnData "
                         "and do not read data.* or train/test.sections. Give a slide's inputs to api.read(path, "
                         "truth=..., image=...) (api.prepare for an AnnData read elsewhere), and sections as "
                         "{name: AnnData}.")
    return settings(config, merged)


def _device(name: str) -> str:
    from pipeline.cli import resolve_device
    return resolve_device(name)


def read(path=None, **data) -> AnnData:
    """Read a slide as the scripts read ``data.*``: ``path`` (a Space Ranger folder: a Visium HD run's bins
    with ``bin_um``, or its cells as ``outs/segmented_outputs``; a GEO sample folder, HEST-1k folder,
    ``.h5ad``, AnnData ``.zarr``, SpatialData store) or ``counts=`` + ``spots=`` (a legacy ST section), with
    the other ``data`` keys as keywords (``image``, ``image_affine``, ``truth``, ``truth_column``,
    ``truth_missing``, ``name``, ``bin_um``). Returns the AnnData every stage reads:
    ``X`` raw counts (CSR float32), ``obs['total_counts']``, ``obsm['spatial']`` (x, y) full-resolution
    px, ``uns['spatial'][library_id]`` images and scale factors, ``obs['truth']`` with labels."""
    from data.readers import read_slide
    from pipeline.config import resolve_data_paths

    spec = {k: str(v) if isinstance(v, Path) else v for k, v in dict(data, path=path).items()}
    allowed = settings()["data"]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise InputError(f"read(): unknown data key(s) {unknown}; the keys are {sorted(allowed)}.")
    return read_slide(resolve_data_paths(settings(settings={f"data.{k}": v for k, v in spec.items()})["data"]))


def prepare(adata, library_id: str | None = None, image=None, image_affine=None,
            truth_column: str | None = None) -> AnnData:
    """A copy of an AnnData made elsewhere, checked and brought to what the readers return (see
    :func:`read`; :func:`data.readers.conform_anndata`): one library (``library_id`` picks one of several),
    raw counts in ``X``, spots under tissue (``obs['in_tissue']`` 0 left out), images as uint8 RGB. Optional
    ``image``: a full-resolution image file (``data.image``; ``image_affine`` as ``data.image_affine``);
    ``truth_column``: the ``obs`` column holding labels, copied to ``obs['truth']`` to score domains.
    The stage functions call it themselves; an AnnData it already prepared comes back as an equal copy."""
    import anndata as ad

    from data.readers import attach_fullres_image, conform_anndata, truth_from_obs

    if not isinstance(adata, ad.AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}; read a file with api.read(path).")
    if image_affine is not None and image is None:
        raise InputError("image_affine places image on the spots; give image too.")
    try:
        out = conform_anndata(adata.copy(), SOURCE, library_id)
    except InputError as exc:       # the readers name the config key; here it is the argument
        raise InputError(str(exc).replace("data.name", "library_id")) from None
    if image is not None:
        attach_fullres_image(out, image, image_affine)
    if truth_column is not None:
        out.obs[keys.TRUTH] = truth_from_obs(out, truth_column, SOURCE)
    return out


def image_features(adata, *, config=None, settings: dict | None = None, device: str = "auto") -> AnnData:
    """Stage 1: image features of every spot's patch (``image.*`` settings). Returns a prepared copy of
    ``adata`` with ``obsm['image_features']`` ((n_spots, d) float32; (n_spots, 0) without an image, the
    pipeline then going on with genes and coordinates) and ``uns['image_features']`` (which image, the
    spot diameter in its pixels, the encoder)."""
    from image_process.features import spot_image_features

    cfg = _config(config, settings, {})
    out = prepare(adata)
    feats, info = spot_image_features(out, cfg["image"], _device(device))
    out.obsm[keys.IMAGE_FEATURES] = feats
    out.uns[keys.IMAGE_FEATURES_INFO] = _plain(info)
    _record(out, "image_features", cfg)
    return out


def enhance(adata, *, config=None, settings: dict | None = None, device: str = "auto") -> AnnData:
    """Stage 2: the position-aware enhancement (``preprocess.*``, ``enhance.*``); runs stage 1 first when
    ``obsm['image_features']`` is missing. Returns a new AnnData of the modelled genes (the
    ``preprocess.n_top_genes`` most variable) with ``X`` raw counts, ``layers['lognorm']`` log1p(CP10k),
    ``layers['enhanced']``, ``obsm['image_features']``, ``obsm['image_enhanced']``,
    ``obsp['spatial_weights']`` (sparse, row-stochastic) and ``uns['spot_spacing_px']`` (full-resolution
    px), as ``02_enhanced.h5ad``."""
    from image_process.features import spot_diameter_fullres
    from image_process.patches import add_plot_image
    from positions_enhancement.run_enhancement import enhance_slide

    cfg = _config(config, settings, {})
    out = prepare(adata)
    if keys.ENHANCED in out.layers:
        raise InputError("adata: already enhanced (layers['enhanced']; its genes are the modelled subset): give "
                         "api.enhance the slide as read, or pass this one on to api.domains.")
    stale = _settings_differ(out, "image_features", cfg)
    if stale:
        log.info("adata: obsm['image_features'] was computed with other image settings (%s); computed again",
                 ", ".join(stale))
    if keys.IMAGE_FEATURES not in out.obsm or stale:
        out = image_features(out, config=config, settings=settings, device=device)
    sub = enhance_slide(out, out.obsm[keys.IMAGE_FEATURES], cfg)
    add_plot_image(sub, spot_diameter_fullres(sub, cfg["image"]), cfg["image"].get("use", "auto"))
    _record(sub, "enhance", cfg)
    return sub


def domains(adata, n_clusters: int | None = None, *, reference=None, config=None, settings: dict | None = None,
            device: str = "auto", progress: bool = True) -> AnnData:
    """Stage 3: M-STGCN domains and denoised expression (``model.*``, ``graph.*``, ``cluster.*``;
    ``n_clusters`` is ``model.n_clusters``, by default the number of labels in ``obs['truth']``). Runs
    stages 1 and 2 first when ``layers['enhanced']`` is missing (give a raw slide, or :func:`enhance`'s
    result). Returns the modelled-gene AnnData with ``obs['domain']`` (categorical),
    ``obs['domain_unrefined']``, ``obs['domain_uncertainty']`` (1 - the mixture's probability of the unrefined domain),
    ``obsm['embedding']`` (with ``plot.umap``: ``obsm['X_umap']``, its UMAP, and
    ``uns['paga']``, the domains' PAGA graph over it: ``pipeline.domains.paga_table(res)`` as a table),
    with ``cluster.sweep`` ``obs['domain_k5']``, ... (the domains for each number of domains it lists) and
    ``uns['sweep_stability']`` (each K's label-free stability, ``cluster.sweep_resamples``),
    ``var['morans_i']``, ``layers['denoised']`` (log1p(CP10k)), ``var['zinb_theta']`` (its dispersion per gene), with
    ``model.posterior_layer`` ``layers['denoised_posterior']`` (the decoder's fit updated by the spots' counts),
    ``uns['mstgcn']`` (graphs, attention, loss), ``uns['domain_colors']`` (with labels, each domain in the
    colour of the label it overlaps most, as ``03_domains.png``) and ``uns['rank_genes_groups']`` (each
    domain's marker genes, ``markers.method``; ``pipeline.domains.marker_table(res)`` as a table), as
    ``03_domains.h5ad``; with labels in ``obs['truth']`` score it with
    ``pipeline.metrics.clustering_scores(res.obs['domain'], res.obs['truth'])``, and without labels its spatial
    coherence (CHAOS, PAS) with ``pipeline.metrics.spatial_coherence(res.obs['domain'], res.obsm['spatial'])``.
    ``reference``: another
    slice's result (or ``cluster.reference``, its ``03_domains.h5ad``) whose domain names and colours the
    matching domains take (:func:`match_domains`)."""
    from pipeline.domains import check_n_clusters, find_domains
    from pipeline.stage_domains import annotate_domains, check_reference

    cfg = _config(config, settings, {"model.n_clusters": n_clusters})
    dev = _device(device)
    out = prepare(adata)
    if keys.ENHANCED not in out.layers:
        check_n_clusters(out, cfg)     # before stages 1 and 2, as the scripts do
        out = enhance(out, config=config, settings=settings, device=device)
    stale = _settings_differ(out, "enhance", cfg)
    if stale:
        raise InputError(f"adata: its layers['enhanced'] was made with other settings than these ({', '.join(stale)}), "
                         "and the genes it left out cannot be brought back: give api.domains the slide as read (it "
                         "then runs stages 1 and 2 with these settings), or the same settings api.enhance had.")
    reference = _reference(reference)           # a bad path refused before training
    check_reference(cfg, None)                  # cluster.reference in the settings, likewise
    out = find_domains(out, cfg, dev, progress=progress)
    annotate_domains(out, cfg, reference=reference)
    return out


def joint_domains(sections: dict, n_clusters: int | None = None, *, config=None, settings: dict | None = None,
                  device: str = "auto", progress: bool = True) -> AnnData:
    """Domains shared by several sections: one M-STGCN over the spots of them all (``python -m pipeline.joint``;
    :func:`pipeline.joint.joint_domains`). ``sections``: {name: a section's :func:`enhance` result, or its
    ``02_enhanced.h5ad`` read}. Returns every section's spots (named ``<barcode>-<name>``, ``obs['section']``) with
    :func:`domains`' keys over the genes modelled in every section;
    ``pipeline.joint.joint_metrics(res, 'cpu')`` scores each section (``sections``) and all together, and
    ``pipeline.joint.section_view(res, name)`` is one section as a slide of its own; :func:`recluster` clusters its
    embedding again (its spatial smoothing keeps to each section)."""
    from anndata import AnnData

    from pipeline.joint import joint_domains as train

    if not isinstance(sections, dict) or len(sections) < 2:
        raise InputError("sections: give {name: enhanced AnnData} for two or more sections (api.enhance's results).")
    for name, adata in sections.items():
        if not isinstance(adata, AnnData) or keys.ENHANCED not in adata.layers:
            raise InputError(f"sections[{name!r}]: expected a section's api.enhance result (an AnnData with "
                             "layers['enhanced']).")
    cfg = _config(config, settings, {"model.n_clusters": n_clusters})
    return train({str(k): v for k, v in sections.items()}, cfg, _device(device), progress=progress)


def recluster(adata, n_clusters: int | None = None, *, reference=None, config=None,
              settings: dict | None = None) -> AnnData:
    """Stage 3's domains again from a stage-3 result (:func:`domains`' or :func:`joint_domains`' AnnData, or a
    ``03_domains.h5ad``) with another ``n_clusters`` (``model.n_clusters``; by default the number of labels in
    ``obs['truth']``) or ``cluster.*``: its saved ``obsm['embedding']`` is clustered as stage 3 clusters it after
    training, so the labels are those a full rerun gives, in seconds, and the network's outputs (embedding,
    denoised expression) are kept. Rewrites ``obs['domain']``, ``obs['domain_unrefined']``,
    ``obs['domain_uncertainty']``, ``uns['mstgcn']['n_clusters']``, ``uns['domain_colors']`` and
    ``uns['rank_genes_groups']`` (``markers.method``) of a copy, as the scripts do when only these settings change.
    With several seeds (``model.n_seeds`` > 1) the consensus is taken again (and with ``cluster.seeds: together``
    every seed's embedding is clustered side by side); when it now keeps another seed, whose network is not in the
    AnnData, this is refused: run :func:`domains`.
    ``reference``: as for :func:`domains`."""
    import anndata as ad

    from pipeline.domains import recluster_domains
    from pipeline.stage_domains import annotate_domains

    cfg = _config(config, settings, {"model.n_clusters": n_clusters})
    if not isinstance(adata, ad.AnnData) or keys.EMBEDDING not in adata.obsm or keys.MSTGCN not in adata.uns:
        raise InputError("adata: not a stage-3 result (obsm['embedding'] and uns['mstgcn'] missing); give "
                         "api.domains' result or a 03_domains.h5ad.")
    reference = _reference(reference)
    out = adata.copy()
    if recluster_domains(out, cfg) is None:
        raise InputError("adata: with these clustering settings another seed's domains agree best with the others', "
                         "and its network is not in the AnnData: run api.domains with these settings.")
    annotate_domains(out, cfg, reference=reference)
    return out


def match_domains(adata, reference, *, config=None, settings: dict | None = None) -> AnnData:
    """A stage-3 result (:func:`domains`' AnnData, or ``03_domains.h5ad``) with its domains named after those
    of ``reference`` (another slice's stage-3 result, or the path of its ``03_domains.h5ad``), as stage 3 names
    them with ``cluster.reference``: each domain takes the name and colour of the reference domain whose
    expression profile (mean log1p(CP10k) against its own slide's mean, over the genes both model) it
    matches, one to one (:func:`pipeline.domains.match_domains`; no labels used). Rewrites a copy's
    ``obs['domain']``, ``obs['domain_unrefined']``, ``uns['domain_colors']``, ``uns['domain_matching']`` (the
    pairs and their correlations) and ``uns['rank_genes_groups']`` (ranked again under the new names,
    ``markers.method``)."""
    import anndata as ad

    from pipeline.stage_domains import annotate_domains

    cfg = _config(config, settings, {})
    if "markers.method" not in (settings or {}) and config is None:     # rank as the result was ranked
        ranked = adata.uns.get(keys.DOMAIN_MARKERS) if isinstance(adata, ad.AnnData) else None
        cfg["markers"]["method"] = str(ranked["params"]["method"]) if ranked else None
    if not isinstance(adata, ad.AnnData) or keys.DOMAIN not in adata.obs:
        raise InputError("adata: not a stage-3 result (obs['domain'] missing); give api.domains' result or a "
                         "03_domains.h5ad.")
    out = adata.copy()
    annotate_domains(out, cfg, reference=_reference(reference))
    return out


def _reference(reference):
    """A ``reference=`` argument as an AnnData: as given, or read from the path of a ``03_domains.h5ad``
    (None stays None)."""
    import anndata as ad

    from pipeline.stage_domains import read_reference

    if reference is None or isinstance(reference, ad.AnnData):
        return reference
    return read_reference({"cluster": {"reference": str(reference)}})[0]


def super_resolve(adata, factor: float | None = None, model: str | None = None, *, config=None,
                  settings: dict | None = None, device: str = "auto", progress: bool = True) -> AnnData:
    """Stage 4: expression on a grid ``factor`` times denser than the spots (``superres.*``; ``model``:
    ``trihrge`` (default) or ``diffusion``), trained on the slide itself (and on ``train.sections`` when
    set). Returns the grid AnnData of ``04_superres.h5ad``: ``X`` predicted log1p(CP10k),
    ``obsm['spatial']`` full-resolution px, ``uns['superres']`` (model, genes, factor, grid spacing) with the
    run's timings and settings under ``uns['superres']['metrics']``, and ``uns['spatial']`` for
    ``sc.pl.spatial``. ``eval.protocol`` is ignored here: see :func:`evaluate_superres`."""
    from train_superres import super_resolve as run

    cfg = _config(config, settings, {"superres.factor": factor, "model.name": model})
    cfg["eval"]["protocol"] = None
    res = run(_superres_slide(adata, cfg), cfg, _device(device), progress)
    grid = res["grid"]
    grid.uns[keys.SUPERRES][keys.METRICS] = _plain(res["metrics"])
    return grid


def evaluate_superres(adata, protocol: str = "recovery", model: str | None = None, *, config=None,
                      settings: dict | None = None, device: str = "auto", progress: bool = True) -> AnnData:
    """Stage 4's honest evaluation on a slide with measured spots: ``protocol`` ``recovery`` (a seeded half
    of the spots hidden, ``eval.seed``) or ``pooling`` (2x2 super-spots seen, every spot scored). Returns
    ``04_eval.h5ad``'s AnnData: ``X`` the predictions at the scored spots, ``layers['measured']`` their
    measured log1p(CP10k), ``uns['score_genes']``, and ``uns['metrics']`` (``pcc_all``, ``pcc_heg``,
    ``mse``, ``ssim``, ``n_genes``, ``seconds_train``, ``seconds_predict``, ...), as ``metrics.json``."""
    from train_superres import super_resolve as run

    cfg = _config(config, settings, {"eval.protocol": protocol, "model.name": model})
    res = run(_superres_slide(adata, cfg), cfg, _device(device), progress, grid=False)
    ev = res["eval"]
    ev.uns[keys.METRICS] = _plain(res["metrics"])
    return ev


def train_expression_model(sections: dict, *, config=None, settings: dict | None = None, device: str = "auto",
                           progress: bool = True):
    """Stage 5 training: HESpotEx on ``sections`` ({name: AnnData with counts and an H&E image}, ``predict.*``
    and ``image.*`` settings). Returns the trained :class:`pipeline.expression_prediction.Predictor`;
    ``model.save(path)`` writes it as ``05_model.pt`` (``predict.model_file`` of the script, or
    ``Predictor.load(path)``)."""
    from pipeline.expression_prediction import fit_predictor, patch_geometry

    cfg = _config(config, settings, {})
    dev = _device(device)
    train = [_section(name, a, cfg["image"], dev, patch_geometry(cfg["predict"])) for name, a in _named(sections)]
    predictor, _ = fit_predictor(train, cfg["predict"], cfg["image"], int(cfg.get("seed", 0)), dev, progress)
    return predictor


def predict_expression(model, adata, name: str = "section", genes=None, *, device: str = "auto") -> AnnData:
    """Stage 5 prediction: expression of ``model``'s genes (``genes``: some of them) from ``adata``'s H&E
    image, featurised with the settings the model was trained with. Returns ``05_predicted.h5ad``'s
    AnnData (``X`` predicted log1p(CP10k), ``layers['measured']``, ``obs['nuclei']``, ``uns['prediction']``
    with the scores against the measured expression under ``uns['prediction']['scores']``). ``model``: a
    :func:`train_expression_model` result or a saved ``05_model.pt`` path. A slide with no sequencing at
    all: :func:`predict_whole_slide`."""
    from pipeline.expression_prediction import predict_section, restrict_genes

    model = _predictor(model)
    dev = _device(device)
    if name in model.train_sections:
        log.warning("section %s was a training section of this model: its scores are not a test of it", name)
    sec = _section(name, adata, model.image, dev, model.patch_geometry)
    out, scores = predict_section(model, sec, restrict_genes(model.genes, genes), dev)
    out.uns[keys.PREDICTION][keys.SCORES] = scores
    return out


# the settings each stage's result depends on, recorded in uns['pipeline'][stage] (a JSON string) so that a later
# call with other settings does not build on it silently
STAGE_SETTINGS = {"image_features": ("image",), "enhance": ("image", "preprocess", "enhance", "seed")}


def _stage_settings(cfg: dict, stage: str) -> dict:
    return json.loads(json.dumps({k: cfg.get(k) for k in STAGE_SETTINGS[stage]}, sort_keys=True, default=str))


def _record(adata, stage: str, cfg: dict) -> None:
    """``uns['pipeline'][stage]``: the settings ``stage``'s outputs in ``adata`` were made with."""
    record = dict(adata.uns.get(keys.PIPELINE) or {})
    record[stage] = json.dumps(_stage_settings(cfg, stage), sort_keys=True)
    adata.uns[keys.PIPELINE] = record


def _settings_differ(adata, stage: str, cfg: dict) -> list:
    """The dotted keys whose value in ``cfg`` differs from the one ``stage``'s outputs in ``adata`` were made
    with (nothing when they were not made here: an AnnData read from a stage's file is taken as it is)."""
    saved = (adata.uns.get(keys.PIPELINE) or {}).get(stage)
    if saved is None:
        return []
    old, new = _flat(json.loads(saved)), _flat(_stage_settings(cfg, stage))
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cross_validate_expression(sections: dict, *, baseline: bool = True, config=None, settings: dict | None = None,
                              device: str = "auto", progress: bool = True):
    """Stage 5 scored by leaving one section out: for each section of ``sections`` ({name: AnnData with counts
    and an H&E image}, at least 2), HESpotEx trained on the others (their genes, scaling and every setting
    from them alone) predicts it, and is scored against its measured expression, as ``benchmarks/
    bench_predict.py`` scores her2st and MOB. Each section's image features are computed once.
    ``baseline``: also the issue's ridge baseline on the same folds (handcrafted features of the two smallest
    patch scales, alpha by leave-one-training-section-out CV; with another encoder, all its features).

    Returns a pandas DataFrame, one row per held-out section: ``pcc_all``, ``pcc_heg``, ``mse``, ``n_genes``,
    ``n_spots``, ``train_sections`` and, with ``baseline``, ``ridge_pcc_all``, ``ridge_pcc_heg``, ``ridge_mse``
    (``df.mean(numeric_only=True)`` gives the mean over folds)."""
    import pandas as pd

    from pipeline.expression_prediction import (fit_predictor, leave_one_out_folds, patch_geometry, predict_section,
                                                prediction_scores, ridge_fit_predict)

    cfg = _config(config, settings, {})
    dev = _device(device)
    named = _named(sections)
    if len(named) < 2:
        raise InputError("cross_validate_expression: give at least 2 sections (each is predicted by a model "
                         "trained on the others).")
    loaded = {name: _section(name, a, cfg["image"], dev, patch_geometry(cfg["predict"])) for name, a in named}
    rows = {}
    for train, test in leave_one_out_folds(list(loaded)):
        predictor, _ = fit_predictor([loaded[n] for n in train], cfg["predict"], cfg["image"],
                                     int(cfg.get("seed", 0)), dev, progress)
        assert test not in predictor.train_sections, "leave-one-out: the test section entered training"
        _, scores = predict_section(predictor, loaded[test], predictor.genes, dev)
        row = {**scores, "n_spots": loaded[test].n, "train_sections": ", ".join(predictor.train_sections)}
        if baseline:
            measured = loaded[test].expression(predictor.genes)
            (pred,), _ = ridge_fit_predict([loaded[n] for n in train], [loaded[test].features], predictor.genes,
                                           n_features=_ridge_columns(cfg["image"]))
            row.update({f"ridge_{k}": v for k, v in prediction_scores(pred, measured, predictor.genes).items()
                        if k != "n_genes"})
        rows[test] = row
        log.info("held out %s: %s", test, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    return pd.DataFrame.from_dict(rows, orient="index")


def _ridge_columns(image_cfg: dict) -> int | None:
    """The baseline's feature columns: the handcrafted encoder's two smallest scales (22 features a scale,
    listed smallest first), or every feature of another encoder."""
    from image_process.encoders import HandcraftedEncoder

    if (image_cfg.get("encoder") or "handcrafted") != "handcrafted":
        return None
    scales = HandcraftedEncoder(**(image_cfg.get("options") or {})).scales
    per_scale = HandcraftedEncoder.FEATURES_PER_SCALE
    return per_scale * min(2, len(scales)) if list(scales) == sorted(scales) else None


def predict_whole_slide(model, image, name: str | None = None, genes=None, *, mpp: float | None = None, config=None,
                        settings: dict | None = None, device: str = "auto", progress: bool = True) -> AnnData:
    """Stage 5 on a whole-slide image with no sequencing at all: tissue found, a spot grid laid over it
    (``wsi.*``: the training platform's spot size and spacing unless set) and ``model``'s genes (``genes``:
    some of them) predicted tile by tile. ``image``: the slide file (tiled TIFF, SVS, NDPI, OME-Zarr, ...,
    as ``predict_expression.py`` reads an image-only test section); ``mpp`` its microns per level-0 pixel
    (``wsi.mpp``; by default what the file states). Returns ``05_predicted.h5ad``'s AnnData: ``X`` predicted
    log1p(CP10k), ``obsm['spatial']`` level-0 px, ``uns['spatial'][name]`` a thumbnail, ``uns['prediction']``
    with the grid under ``whole_slide``."""
    from pipeline.expression_prediction import prediction_uns, restrict_genes
    from pipeline.wsi_prediction import predict_whole_slide as run

    model = _predictor(model)
    cfg = _config(config, settings, {"wsi.mpp": mpp})
    name = name or Path(str(image)).stem
    keep = restrict_genes(model.genes, genes)
    out, _, _, info = run(model, {"image": str(image), "name": name}, cfg["wsi"], _device(device), progress)
    out = out[:, keep].copy()
    out.uns[keys.PREDICTION] = prediction_uns(model, name, keep, whole_slide=info)
    return out


def _predictor(model):
    """A trained stage-5 model, or one loaded from its saved file."""
    from pipeline.expression_prediction import Predictor

    if isinstance(model, (str, Path)):
        from pipeline.config import resolve_path
        return Predictor.load(resolve_path(model))
    if not isinstance(model, Predictor):
        raise InputError(f"model: expected a trained model (api.train_expression_model) or the path of a saved "
                         f"05_model.pt, got {type(model).__name__}.")
    return model


def _slide_as_read(adata):
    """:func:`prepare`, with a warning when ``adata`` is a stage-2 or stage-3 result: it holds only the genes
    stage 2 modelled, among which stage 4 then chooses its own."""
    out = prepare(adata)
    if keys.ENHANCED in out.layers:
        log.warning("adata holds only the %d genes stages 2-3 modelled; stage 4 chooses its genes among them. Give "
                    "it the slide as read (api.read) to choose among all of them.", out.n_vars)
    return out


IMAGE_HOW = "with prepare(adata, image=PATH) (or images in uns['spatial'])"   # how a stage is given its H&E here


def _superres_slide(adata, cfg: dict):
    """:func:`_slide_as_read` for stage 4, refused when it has no image, in this module's terms (the script's
    message names the config key ``data.image``; here the image comes with ``prepare``)."""
    from image_process.patches import close_image
    from pipeline.sections import require_image_use, section_image
    from pipeline.superres import NEEDS_IMAGE

    slide = _slide_as_read(adata)
    require_image_use(cfg, "stage 4")
    close_image(section_image(slide, cfg["image"], NEEDS_IMAGE, IMAGE_HOW)[0])   # only to check that there is one
    return slide


def _named(sections) -> list:
    if not isinstance(sections, dict) or not sections:
        raise InputError("sections: give a mapping {name: AnnData} of one or more training sections.")
    return [(str(k), v) for k, v in sections.items()]


def _section(name: str, adata, image_cfg: dict, device: str, patch):
    """A stage-5 Section of an AnnData (:func:`prepare`, its image by ``image.use``)."""
    from pipeline.expression_prediction import NEEDS_IMAGE, section_from_slide
    from pipeline.sections import section_image

    try:
        slide = prepare(adata)
        image, diameter = section_image(slide, image_cfg, NEEDS_IMAGE, IMAGE_HOW)
    except InputError as exc:
        raise InputError(f"section {name}: {exc}") from None
    return section_from_slide(name, slide, image, diameter, image_cfg, device, patch)


def _plain(metrics: dict) -> dict:
    """``metrics`` with None values dropped (an AnnData cannot store None in ``uns``)."""
    if isinstance(metrics, dict):
        return {str(k): _plain(v) for k, v in metrics.items() if v is not None}
    if isinstance(metrics, (list, tuple)):
        return [_plain(v) for v in metrics]
    return metrics
