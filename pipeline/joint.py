"""Domains shared by several sections: one M-STGCN trained on the spots of them all.

    python -m pipeline.joint runs/151673 runs/151674 --out runs/joint
    python -m pipeline.joint runs/MOB1 runs/MOB2 runs/MOB3 --out runs/mob --set model.n_clusters=7

Each RUN folder holds one section's finished stage 2 (``02_enhanced.h5ad``: ``run_dlpfc.py`` /
``run_breast_cancer.py``, or stages 1-2 alone), made with that section's own ``data.*``; the section is named
after its folder. Trained one section at a time, each section's domains are numbered and placed on their own;
trained together, a domain is the same domain in every section (the same layer of cortex, say), with no naming
step (``cluster.reference``) between them. The sections are put together as they are (:func:`joint_slide`):

* genes: those modelled in every section (each run's ``preprocess.n_top_genes``), at least
  ``pipeline.domains.MIN_SHARED_GENES``; their enhanced expression (stage 2, each section's own spatial weights)
  is the model's input, as in a single-section run;
* graphs: the spatial graph joins spots of one section only, each at its own spacing; the gene-similarity graph
  (and the image graph) join spots across sections, which is what ties a domain across them;
* image features (where every section has them, of one width): standardised per section (staining and scanning
  differ between sections), then one PCA over all spots and each section's own enhancement;
* batches: by default none is corrected for (the sections should be of one tissue, processed alike). Two options
  do: ``joint.gene_scaling: per_section`` standardises each gene within each section before the input PCs (a
  section's shift and scale in every gene removed, with any real difference in the sections' make-up;
  :func:`pipeline.domains.input_pcs`), and ``joint.section_covariate: true`` has the network's decoders read each
  spot's section (:func:`pipeline.domains.section_codes`), so that the embedding need not carry it.

Writes to ``--out``: ``03_domains.h5ad`` (every section's spots, named ``<barcode>-<section>``, with
``obs['section']`` and everything of a stage-3 result: ``obs['domain']``, ``obsm['embedding']``,
``layers['denoised']``, ``uns['rank_genes_groups']``, ...; ``uns['spatial'][<section>]`` each section's images,
so ``sc.pl.spatial(adata[adata.obs['section'] == '151673'], library_id='151673', color='domain')`` draws one;
``uns['sections']`` each section's spacing and run folder), per section ``03_domains.<section>.csv`` (its
barcodes as read, for Loupe Browser) and ``03_domains.<section>.png`` (its domains beside its truth and H&E, in
colours shared by all sections), ``03_domain_markers.csv`` / ``.png`` (each domain's markers over every section),
with ``plot.umap`` ``03_embedding.png`` (the embedding's UMAP by domain, truth and section: sections that mix in
it share their domains), and ``metrics.json`` (``n_sections``, ``n_spots``, ``n_clusters``, ``n_genes_modelled``,
``domain_sizes``; ``section_mixing``: ``other_section_neighbours``, the share of a spot's 15 nearest spots in the
embedding that are of other sections, beside ``if_mixed_at_random``; ``single_section_domains``, {domain: section}
for domains with 95% of their spots in one section, with a warning; over all annotated spots ``ari``, ``nmi``,
``n_annotated``; ``sections``: each section's ``n_spots``, ``domain_sizes``, ``chaos``, ``pas`` and with labels
``ari``, ``nmi``, ``n_annotated``, ``chaos_truth``, ``pas_truth``; with ``cluster.sweep`` its ``by_k``, and
``most_stable_k`` with its ``most_stable_k_band``). With ``cluster.sweep=[5, 7, 9]`` the embedding is also
clustered into each K (``obs['domain_k5']``, ...; the stability of each K's clustering of every section's spots
together in ``uns['sweep_stability']`` and in each section's ``by_k``), drawn per section in
``03_domains_by_k.<section>.png`` (coloured by the truth where there is one, else by that section's domains). With
``model.n_seeds`` > 1, ``03_seed_networks.pt`` keeps every seed's network. A rerun with the same runs and settings
is skipped; one whose trained network is up to date but whose clustering (``model.n_clusters``, ``cluster.*``,
``markers.*``, ``plot.umap``) or sections' labels changed (a section's run rerun with another ``data.truth``: the
network depends on its stage 2 apart from the labels) clusters the saved embedding again in seconds and scores it
against the labels as they are now, without training; ``--force`` redoes it all.
"""
from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from data import keys
from data.errors import InputError
from pipeline import stages
from pipeline.stage_domains import (EMBEDDING_FIGURE, MARKERS_CSV, MARKERS_FIGURE,   # a stage-3 result's names,
                                    OPTIONAL_METRICS, OUTPUT, SWEEP_FIGURE)          # and keys written only at times

log = logging.getLogger("stpipe")

STAGE = "joint_domains"
TRAINING_STAMP = f"{STAGE}.training"     # the trained network's fingerprint (training_fingerprint)


def section_file(name: str, suffix: str) -> str:
    """A section's own output: ``03_domains.<section>.csv`` / ``.png``."""
    return f"03_domains.{name}.{suffix}"


def sweep_figure(name: str) -> str:
    """A section's ``cluster.sweep`` figure: ``03_domains_by_k.<section>.png``."""
    return f"{Path(SWEEP_FIGURE).stem}.{name}.png"


def section_names(runs: list) -> list[str]:
    """Each run folder's name, the name its section goes by; refused for fewer than two runs or two names alike."""
    names = [Path(r).resolve().name for r in runs]
    if len(runs) < 2:
        raise InputError(f"{len(runs)} run folder given: joint domains need two or more sections' runs, e.g. "
                         "runs/151673 runs/151674")
    alike = sorted({n for n in names if names.count(n) > 1})
    if alike:
        raise InputError(f"two runs are named {alike[0]!r}: each section goes by its folder's name; give each "
                         "section's run a folder of its own name")
    return names


def read_sections(runs: list) -> dict:
    """{section name: its stage-2 AnnData} from each run folder's ``02_enhanced.h5ad``; a folder without one is
    refused with the fix."""
    import anndata as ad

    return {name: ad.read_h5ad(stage2_file(run)) for name, run in zip(section_names(runs), runs)}


def stage2_file(run) -> Path:
    """A run folder's ``02_enhanced.h5ad``, refused with the fix when it is missing or cannot be read."""
    from positions_enhancement.run_enhancement import OUTPUT as STAGE2

    path = Path(run) / STAGE2
    if not stages.readable(path):          # a missing file is not readable either
        raise InputError(f"{path}: not found or not readable; run stages 1-2 of that section there first "
                         "(run_dlpfc.py / run_breast_cancer.py with that --out)")
    return path


def _image_inputs(sections: dict, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(raw image features, their enhanced PCs) of every spot, in order (:func:`joint_slide`): standardised per
    section, one PCA over all, each section's own enhancement (its ``obsp['spatial_weights']``). (n, 0) for both
    when a section has none, or the sections' feature widths differ (a warning)."""
    from pipeline.preprocess import pca, standardise_within
    from positions_enhancement.spatial_weights import enhance

    n = sum(a.n_obs for a in sections.values())
    widths = {name: a.obsm[keys.IMAGE_FEATURES].shape[1] if keys.IMAGE_FEATURES in a.obsm else 0
              for name, a in sections.items()}
    if len(set(widths.values())) > 1 or 0 in widths.values():
        if any(widths.values()):
            log.warning("image features: %s; the image graph is left out of the joint run (every section needs "
                        "features of one width: the same image.* settings)",
                        ", ".join(f"{k} {w}" for k, w in widths.items()))
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32)
    raw = [np.asarray(a.obsm[keys.IMAGE_FEATURES], np.float64) for a in sections.values()]
    groups = np.repeat(np.arange(len(raw)), [len(f) for f in raw])
    pcs = pca(standardise_within(np.vstack(raw), groups).astype(np.float32), cfg["enhance"].get("image_pcs", 30),
              seed=cfg.get("seed", 0))
    bounds = np.cumsum([0] + [a.n_obs for a in sections.values()])
    enhanced = [enhance(pcs[lo:hi], a.obsp[keys.SPATIAL_WEIGHTS], cfg["enhance"]["alpha"])
                for a, lo, hi in zip(sections.values(), bounds[:-1], bounds[1:])]
    return np.vstack(raw).astype(np.float32), np.vstack(enhanced).astype(np.float32)


def joint_slide(sections: dict, cfg: dict):
    """Several sections' stage-2 AnnDatas (``02_enhanced.h5ad``; {name: AnnData}) as one, which
    :func:`pipeline.domains.find_domains` trains on as it would one slide (module doc for what is put together how).

    Returns an AnnData of every spot (named ``<barcode>-<section>``), the genes modelled in every section (in the
    first's order) with ``X`` counts, ``layers['lognorm']``, ``layers['enhanced']``; ``obs['section']``
    (categorical, the given order), ``obs['total_counts']``, ``obs['truth']`` (NaN for a section without labels;
    absent when none has any); ``obsm['spatial']`` (each section's own full-resolution px), ``obsm['image_features']``
    and ``obsm['image_enhanced']`` (joint, :func:`_image_inputs`); ``obsp['spatial_weights']`` (each section's, none
    between sections); ``uns['spatial']`` ({section: its library's images and scale factors}), ``uns['sections']``
    ({section: {'spot_spacing_px'}}) and ``uns['spot_spacing_px']`` (their median)."""
    import anndata as ad
    import scipy.sparse as sp

    from pipeline.domains import MIN_SHARED_GENES

    names = list(sections)
    genes = [g for g in sections[names[0]].var_names if all(g in a.var_names for a in sections.values())]
    if len(genes) < MIN_SHARED_GENES:
        raise InputError(f"sections {', '.join(names)}: only {len(genes)} modelled genes are shared (at least "
                         f"{MIN_SHARED_GENES} are needed); rerun their stage 2 with more genes "
                         "(--set preprocess.n_top_genes=null models every detected gene)")
    log.info("joint domains: %s; %d genes modelled in every section (of %s)", ", ".join(
        f"{k} {a.n_obs} spots" for k, a in sections.items()), len(genes),
        " / ".join(str(a.n_vars) for a in sections.values()))
    annotated = any(keys.TRUTH in a.obs for a in sections.values())
    parts = []
    for name, a in sections.items():
        missing = [k for k, where in ((keys.SPATIAL, a.obsm), (keys.SPOT_SPACING, a.uns)) if k not in where]
        if missing:
            raise InputError(f"section {name}: its 02_enhanced.h5ad has no {missing[0]}; rerun its stage 2")
        obs = pd.DataFrame({keys.TOTAL_COUNTS: a.obs[keys.TOTAL_COUNTS].to_numpy(float)}, index=a.obs_names)
        if annotated:
            obs[keys.TRUTH] = a.obs[keys.TRUTH].astype(object).to_numpy() if keys.TRUTH in a.obs else np.nan
        part = ad.AnnData(sp.csr_matrix(a[:, genes].X), obs=obs, var=pd.DataFrame(index=pd.Index(genes)),
                          layers={k: np.asarray(a[:, genes].layers[k], np.float32)
                                  for k in (keys.LOGNORM, keys.ENHANCED)},
                          obsm={keys.SPATIAL: np.asarray(a.obsm[keys.SPATIAL], float)},
                          obsp={keys.SPATIAL_WEIGHTS: sp.csr_matrix(a.obsp[keys.SPATIAL_WEIGHTS])})
        parts.append(part)
    joint = ad.concat(parts, label=keys.SECTION, keys=names, index_unique="-", pairwise=True)
    joint.obs[keys.SECTION] = pd.Categorical(joint.obs[keys.SECTION].astype(str), categories=names)
    if annotated:
        joint.obs[keys.TRUTH] = pd.Categorical(joint.obs[keys.TRUTH])      # NaN: not annotated
    joint.obsm[keys.IMAGE_FEATURES], joint.obsm[keys.IMAGE_ENHANCED] = _image_inputs(sections, cfg)
    joint.uns[keys.SPATIAL_UNS] = {name: a.uns[keys.SPATIAL_UNS][keys.library_id(a)] for name, a in sections.items()
                                   if keys.library_id(a) is not None}
    spacings = {name: float(a.uns[keys.SPOT_SPACING]) for name, a in sections.items()}
    joint.uns[keys.SECTIONS] = {name: {keys.SPOT_SPACING: s} for name, s in spacings.items()}
    joint.uns[keys.SPOT_SPACING] = float(np.median(list(spacings.values())))
    return joint


def section_view(joint, name: str):
    """One section of a joint result as a single slide's AnnData (a copy): its spots, its ``uns['spatial']`` entry
    and spacing (no ``uns['sections']``), for its metrics and figures."""
    view = joint[(joint.obs[keys.SECTION] == name).to_numpy()].copy()
    view.uns[keys.SPATIAL_UNS] = {name: joint.uns[keys.SPATIAL_UNS][name]} if name in joint.uns.get(
        keys.SPATIAL_UNS, {}) else {}
    view.uns[keys.SPOT_SPACING] = float(joint.uns[keys.SECTIONS][name][keys.SPOT_SPACING])
    del view.uns[keys.SECTIONS]
    return view


def barcodes(view, name: str) -> list[str]:
    """A section's barcodes as read (the joint names without their ``-<section>`` suffix)."""
    return [b[: -len(name) - 1] for b in view.obs_names]


def joint_domains(sections: dict, cfg: dict, device: str = "cpu", progress: bool = True,
                  networks: list | None = None):
    """M-STGCN trained once on every spot of ``sections`` ({name: stage-2 AnnData}) and its embedding clustered
    into domains shared by them: :func:`joint_slide`, then :func:`pipeline.domains.find_domains` (``model.*``,
    ``graph.*``, ``cluster.*``, ``seed``) and :func:`pipeline.stage_domains.annotate_domains` (markers, colours,
    with ``plot.umap`` the UMAP and PAGA, with ``cluster.reference`` the names of a reference's domains, with
    ``cluster.sweep`` the domains for each K, ``obs['domain_k5']``, ...). Writes what each writes
    (``obs['domain']``, ``obsm['embedding']``, ``layers['denoised']``, ...) into the joint AnnData and returns it.
    ``model.n_clusters`` null counts the labels of every section. ``networks``: as for
    :func:`pipeline.domains.find_domains` (each seed's trained network appended)."""
    from pipeline.domains import find_domains
    from pipeline.stage_domains import annotate_domains, check_reference

    check_reference(cfg, None)
    joint = joint_slide(sections, cfg)
    find_domains(joint, cfg, device, progress=progress, networks=networks)
    annotate_domains(joint, cfg)
    return joint


def joint_metrics(joint, device: str) -> dict:
    """``metrics.json``'s values of a joint result (module doc): stage 3's over every spot
    (:func:`pipeline.stage_domains.domain_metrics`, the labels pooled, no spatial coherence: the sections'
    coordinates overlap), ``n_sections``, ``n_genes_modelled``, and each section's own under ``sections`` (with
    ``cluster.sweep`` its ``by_k``: :func:`pipeline.stage_domains.sweep_metrics`)."""
    from pipeline.domains import domain_embedding, sweep_columns
    from pipeline.metrics import section_mixing
    from pipeline.stage_domains import coherence, domain_metrics, domain_sizes, label_scores, sweep_metrics

    values = domain_metrics(joint, device, spatial=False)
    values.update(n_sections=len(joint.uns[keys.SECTIONS]), n_genes_modelled=int(joint.n_vars),
                  section_mixing=section_mixing(domain_embedding(joint)[0], joint.obs[keys.SECTION]),
                  single_section_domains=single_section_domains(joint), sections={})
    for name in joint.uns[keys.SECTIONS]:
        view = section_view(joint, name)
        values["sections"][name] = {"n_spots": int(view.n_obs), "domain_sizes": domain_sizes(view),
                                    **coherence(view), **label_scores(view)}
        if sweep_columns(view):
            values["sections"][name]["by_k"] = sweep_metrics(view)
    return values


SINGLE_SECTION_SHARE = 0.95     # a domain with this share of its spots in one section is that section's own


def single_section_domains(joint) -> dict:
    """{domain: section} for each domain with at least :data:`SINGLE_SECTION_SHARE` of its spots in one section
    (no labels): with sections of one tissue, a sign that they differ as batches, each finding domains of its own."""
    table = pd.crosstab(joint.obs[keys.DOMAIN].astype(str), joint.obs[keys.SECTION].astype(str))
    share = table.max(axis=1) / table.sum(axis=1)
    return {str(d): str(table.columns[table.loc[d].to_numpy().argmax()])
            for d in share.index[share >= SINGLE_SECTION_SHARE]}


def warn_if_apart(values: dict) -> None:
    """A warning when the joint domains are sections' own (:func:`single_section_domains`), with the mixing in
    the embedding and the options that correct for differences between sections."""
    own, mixing = values["single_section_domains"], values["section_mixing"]
    if own:
        log.warning("joint domains: %d of %d domains lie in one section only (%s); %.0f%% of a spot's nearest spots in "
                    "the embedding are of other sections, %.0f%% if they mixed at random. If the sections are of one "
                    "tissue, they differ as batches: try --set joint.gene_scaling=per_section --set "
                    "joint.section_covariate=true (README: Several sections with one set of domains)", len(own),
                    values["n_clusters"], ", ".join(f"{d} in {s}" for d, s in own.items()),
                    100 * mixing["other_section_neighbours"], 100 * mixing["if_mixed_at_random"])


def draw_joint_figures(joint, cfg: dict, out: Path, metrics: dict) -> None:
    """Each section's ``03_domains.<section>.png`` (its domains beside its truth, uncertainty and H&E, every section
    in the same colours: a domain's colour is the truth label it overlaps most over all sections), with
    ``cluster.sweep`` its ``03_domains_by_k.<section>.png`` (:func:`pipeline.stage_domains.draw_sweep`; removed
    without), ``03_domain_markers.png`` and, with ``plot.umap``, ``03_embedding.png`` (domains, truth and section
    over the UMAP); with ``plot.figures`` false none, and those of an earlier run are removed."""
    from pipeline.stage_domains import draw_domain_maps, draw_embedding, draw_markers, draw_sweep, label_colors

    names = list(metrics["sections"])
    if stages.figures_off(cfg, out, [section_file(n, "png") for n in names] + [sweep_figure(n) for n in names]
                          + [EMBEDDING_FIGURE, MARKERS_FIGURE]):
        return
    colors = label_colors(joint)
    for name, scores in metrics["sections"].items():
        view = section_view(joint, name)
        panels = {"M-STGCN domains": view.obs[keys.DOMAIN].astype(str).to_numpy()}
        title = f"{name}: PAS {scores['pas']:.3f}"
        if "ari" in scores:
            panels["ground truth"] = view.obs[keys.TRUTH].astype(object).to_numpy()
            title = f"{name}: ARI {scores['ari']:.3f}; PAS {scores['pas']:.3f} (truth {scores['pas_truth']:.3f})"
        draw_domain_maps(view, panels, title, colors, out / section_file(name, "png"))
        draw_sweep(view, out / sweep_figure(name))
    panels = {"M-STGCN domains": joint.obs[keys.DOMAIN].astype(str).to_numpy()}
    if keys.TRUTH in joint.obs:
        panels["ground truth"] = joint.obs[keys.TRUTH].astype(object).to_numpy()
    panels["section"] = joint.obs[keys.SECTION].astype(str).to_numpy()
    draw_embedding(joint, panels, colors, out / EMBEDDING_FIGURE)
    draw_markers(joint, cfg, out / MARKERS_FIGURE)


def _stage2_stamp(run, stamp: str) -> list:
    """[the run folder, its stamp ``stamp``] (one written with its ``02_enhanced.h5ad``), or, for a file written without
    it (by :mod:`pipeline.api`) or a missing file, the file's path, size and time."""
    from positions_enhancement.run_enhancement import OUTPUT as STAGE2

    run = Path(run).resolve()
    value = stages.read_stamp(run, stamp)
    return [str(run), value] if value and (run / STAGE2).exists() else stages.file_signature(run / STAGE2)


def stage2_identity(run) -> list:
    """What a section's ``02_enhanced.h5ad`` holds apart from its labels: the fingerprint of the settings and inputs
    its stage 2 was made from (its run's stamp), so that labels given to the section later (a rerun with another
    ``data.truth`` rewrites the file) do not retrain the joint network (:func:`_stage2_stamp`)."""
    from positions_enhancement.run_enhancement import STAGE as STAGE2_NAME

    return _stage2_stamp(run, STAGE2_NAME)


def labels_identity(run) -> list:
    """Which labels a section's ``02_enhanced.h5ad`` holds (its run's ``enhancement.truth`` stamp:
    :func:`_stage2_stamp`)."""
    from positions_enhancement.run_enhancement import TRUTH_STAMP as TRUTH_IN_STAGE2

    return _stage2_stamp(run, TRUTH_IN_STAGE2)


def training_fingerprint(runs: list, cfg: dict, device: str) -> str:
    """What the trained network (embedding, denoised expression) depends on: the runs' stage 2 apart from their
    labels (:func:`stage2_identity`) and names, the model's settings except ``n_clusters`` and the posterior
    layer's (:func:`pipeline.stage_domains.training_model_settings`), the graphs', ``enhance.*`` (the joint image
    PCs), ``joint.*``, the seed and the device."""
    from pipeline.stage_domains import training_model_settings

    model = training_model_settings(cfg)
    parts = {"model": model, "graph": cfg.get("graph"), "enhance": cfg.get("enhance"), "joint": cfg.get("joint"),
             "seed": cfg.get("seed"), "stage2": [stage2_identity(r) for r in runs]}
    return stages.fingerprint(parts | {"device": device, "sections": section_names(runs)})


def fingerprint(runs: list, cfg: dict, device: str) -> str:
    """A joint result's fingerprint: the trained network's (:func:`training_fingerprint`), the sections' labels
    (:func:`labels_identity`) and the clustering's (``model.n_clusters``, ``cluster.*``, the file
    ``cluster.reference`` names), the markers' (``markers.*``), ``plot.umap`` and the posterior layer's
    (``model.posterior_*``), and ``plot.figures`` when false; a change of these alone re-clusters the saved
    embedding, brings the posterior layer up to date from the saved network and scores it against the sections'
    labels as they are now (:func:`recluster_joint`)."""
    from pipeline.domains import posterior_settings
    from pipeline.stage_domains import reference_path, umap_wanted

    return stages.fingerprint({"n_clusters": (cfg.get("model") or {}).get("n_clusters"), "cluster": cfg.get("cluster"),
                               "markers": cfg.get("markers"), "umap": umap_wanted(cfg),
                               "posterior": posterior_settings(cfg),
                               "labels": [labels_identity(r) for r in runs]}
                              | ({} if stages.figures_wanted(cfg) else {"figures": False}),
                              inputs=[p for p in [reference_path(cfg)] if p is not None],
                              upstream=training_fingerprint(runs, cfg, device))


def refresh_labels(joint, runs: list) -> None:
    """``obs['truth']`` of a joint result read again from its sections' ``02_enhanced.h5ad`` (only their ``obs``):
    labels given to a section, changed or removed since the joint run trained. NaN for the spots of a section
    without labels; removed when no section has any (with the colours drawn for the old labels)."""
    import anndata as ad

    from pipeline.stage_domains import replace_labels

    parts = []
    for name, run in zip(section_names(runs), runs):
        stage2 = ad.read_h5ad(stage2_file(run), backed="r")
        if keys.TRUTH in stage2.obs:
            truth = stage2.obs[keys.TRUTH].astype(object)
            parts.append(pd.Series(truth.to_numpy(), index=[f"{b}-{name}" for b in stage2.obs_names]))
        stage2.file.close()
    replace_labels(joint, pd.Series(pd.Categorical(pd.concat(parts).reindex(joint.obs_names)), index=joint.obs_names)
                   if parts else None)


def recluster_joint(out: Path, runs: list, cfg: dict, tfp: str, device: str):
    """A finished joint result (``out``'s ``03_domains.h5ad``) with the sections' labels as they are now
    (:func:`refresh_labels`) and its domains clustered again from its saved embedding for this config's
    ``model.n_clusters`` / ``cluster.*`` and annotated again (markers, UMAP, sweep, names), as stage 3 re-clusters
    one slide (:func:`pipeline.domains.recluster_domains`): the domains a full rerun gives, without training. With
    several seeds, one that is now kept comes from its saved network (``03_seed_networks.pt``, of the training
    ``tfp``), and so does the posterior layer when ``model.posterior_*`` changed
    (:func:`pipeline.domains.refresh_posterior`). None when that is missing: the caller retrains."""
    import anndata as ad

    from pipeline.domains import recluster_domains, refresh_posterior
    from pipeline.stage_domains import annotate_domains, read_seed_networks

    joint = ad.read_h5ad(out / OUTPUT)
    refresh_labels(joint, runs)
    saved = partial(read_seed_networks, out, tfp)       # read only when needed
    if recluster_domains(joint, cfg, saved, device) is None or not refresh_posterior(joint, cfg, saved, device):
        return None
    annotate_domains(joint, cfg)
    return joint


def outputs(names: list) -> list:
    """The files a finished joint run has besides its figures (a missing one redoes it)."""
    return [OUTPUT] + [section_file(n, "csv") for n in names]


def run_joint(runs: list, cfg: dict, out: Path, device: str = "cpu", force: bool = False,
              progress: bool = True) -> bool:
    """Joint domains of the sections of ``runs`` (their folders) into ``out`` (module doc), unless up to date; a
    result whose trained network is up to date but whose clustering (``model.n_clusters``, ``cluster.*``,
    ``markers.*``, ``plot.umap``) or sections' labels changed is re-clustered from its embedding and scored again
    (:func:`recluster_joint`), not retrained. Returns True when it ran (or re-clustered)."""
    from pipeline.stage_domains import check_reference, save_domains_csv, save_markers_csv, save_seed_networks

    names = section_names(runs)
    if any(Path(r).resolve() == Path(out).resolve() for r in runs):
        raise InputError(f"--out {out}: one of the runs; give the joint result a folder of its own")
    check_reference(cfg, out)
    fp, tfp = fingerprint(runs, cfg, device), training_fingerprint(runs, cfg, device)
    if not force and stages.is_fresh(out, STAGE, fp, outputs(names)):
        log.info("joint domains: up to date, skipped (use --force to redo)")
        return False
    t0 = time.perf_counter()
    joint = None
    if not force and stages.is_fresh(out, TRAINING_STAMP, tfp, [OUTPUT]):
        joint = recluster_joint(out, runs, cfg, tfp, device)
    trained = joint is None
    if trained:
        networks = []
        joint = joint_domains(read_sections(runs), cfg, device, progress=progress, networks=networks)
        save_seed_networks(out, networks, tfp)
        for name, run in zip(names, runs):
            joint.uns[keys.SECTIONS][name]["run"] = str(Path(run).resolve())
    stages.save_h5ad(out / OUTPUT, joint, cfg)
    for name in names:
        view = section_view(joint, name)
        view.obs_names = barcodes(view, name)
        save_domains_csv(out / section_file(name, "csv"), view)
    save_markers_csv(out / MARKERS_CSV, joint)
    seconds = time.perf_counter() - t0
    values = joint_metrics(joint, device)
    warn_if_apart(values)
    draw_joint_figures(joint, cfg, out, values)
    stages.update_metrics(out, values, {STAGE: seconds} if trained else None, drop=OPTIONAL_METRICS, stage=STAGE)
    stages.write_stamp(out, STAGE, fp)
    stages.write_stamp(out, TRAINING_STAMP, tfp)
    how = "" if trained else " (clustered again from the saved embedding, not retrained)"
    log.info("joint domains: %d domains over %d sections in %.1fs on %s%s%s", values["n_clusters"], len(names),
             seconds, device, how,
             "".join(f"; {n} ARI {s['ari']:.3f}" for n, s in values["sections"].items() if "ari" in s))
    return True


def main(argv: list | None = None) -> None:
    from pipeline.cli import build_parser, output_lock, run_log, save_run_config, setup

    p = build_parser(__doc__)
    p.add_argument("runs", nargs="+", help="each section's run folder (with its stage 2, 02_enhanced.h5ad)")
    args = p.parse_args(argv)
    if args.out is None and not args.show_config:
        raise InputError("--out is not given: name the folder for the joint domains, e.g. --out runs/joint")
    cfg, out, device = setup(args, reads=())
    with output_lock(out), run_log(out, device):
        save_run_config(cfg, out, device)
        run_joint(args.runs, cfg, out, device, args.force)


if __name__ == "__main__":
    from pipeline.cli import run_main

    run_main(lambda: main())
