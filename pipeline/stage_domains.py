"""Stage 3: M-STGCN domains and denoising -> ``03_domains.h5ad``, ``03_domains.csv``, ``metrics.json``, PNG figures.

``03_domains.h5ad`` = stage 2's AnnData plus ``obs['domain']``, ``obs['domain_unrefined']``,
``obs['domain_uncertainty']``, ``obsm['embedding']``, ``layers['denoised']`` (log1p(CP10k), every gene in var_names),
``var['zinb_theta']``, with ``model.posterior_layer`` ``layers['denoised_posterior']``,
``uns['mstgcn']`` and ``uns['rank_genes_groups']`` (each domain's marker genes, ``markers.method``); with
``plot.umap`` ``obsm['X_umap']`` and the domains' PAGA graph ``uns['paga']``, ``uns['domain_sizes']``; with
``cluster.sweep`` the domains for other numbers of domains, ``obs['domain_k5']``, ..., their label-free stability
``uns['sweep_stability']`` and ``03_domains_by_k.png``; with
``cluster.reference`` (another slice's ``03_domains.h5ad``) the domains carry the names of the reference's
domains they match, and ``uns['domain_matching']`` the pairs (:func:`pipeline.domains.match_domains`).
``03_domains.csv``: ``Barcode,M-STGCN domain`` per spot (Loupe Browser's import layout).
``03_domain_markers.csv``: every modelled gene ranked for every domain against the other spots
(:func:`pipeline.domains.marker_table`); ``03_domain_markers.png`` a dot plot of the first few.
``metrics.json`` gains ``ari``, ``nmi`` (annotated spots, when truth is given), ``n_clusters``, ``device``
and ``seconds.domains``. With ``plot.figures`` false no PNG is drawn (:func:`draw_figures`).

    python pipeline/stage_domains.py --config configs/dlpfc.yaml --out runs/151673
"""
from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import scipy.sparse as sp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import keys
from data.errors import InputError
from pipeline import stages
from pipeline.cli import stage_main

log = logging.getLogger("stpipe")
STAGE = "domains"
OUTPUT = "03_domains.h5ad"
DOMAINS_CSV = "03_domains.csv"  # Barcode,M-STGCN domain: for Loupe Browser, R, spreadsheets
FIGURE = "03_domains.png"
MARKERS_CSV = "03_domain_markers.csv"    # each domain's genes ranked against the rest (markers.method)
MARKERS_FIGURE = "03_domain_markers.png"
SWEEP_FIGURE = "03_domains_by_k.png"     # cluster.sweep: the domains for each K side by side
EMBEDDING_FIGURE = "03_embedding.png"    # the embedding's UMAP (obsm['X_umap']) coloured by domain (and truth)
DENOISED_FIGURE = "03_denoised.png"      # chosen genes measured beside denoised
FIGURES = (FIGURE, DENOISED_FIGURE, MARKERS_FIGURE, SWEEP_FIGURE, EMBEDDING_FIGURE)   # all that stage 3 may draw
SEED_NETWORKS = "03_seed_networks.pt"   # every seed's trained network (re-clustering, the posterior layer)
SEED_NETWORKS_FORMAT = "stpipe-mstgcn-seeds-1"


def check_model(cfg: dict) -> str:
    """Stage 3 runs M-STGCN: ``model.name`` may be null or ``mstgcn``. With neither ``model.n_clusters``
    nor labels to count (``data.truth``, ``data.truth_column``, or an ``.h5ad`` that may hold
    ``obs['truth']``) the number of domains is unknown: refused here, before stages 1 and 2 run, not
    when stage 3 starts."""
    from pipeline.config import model_name
    name = model_name(cfg, ("mstgcn",), "mstgcn")
    data = cfg.get("data") or {}
    may_hold_truth = data.get("truth") or data.get("truth_column") or str(data.get("path") or "").endswith(".h5ad")
    if (cfg.get("model") or {}).get("n_clusters") is None and not may_hold_truth:
        raise InputError("model.n_clusters is not set and there is no truth to count labels from: "
                         "set it, e.g. --set model.n_clusters=7")
    return name


def training_model_settings(cfg: dict) -> dict:
    """``model.*`` as far as training depends on it: without ``n_clusters`` (clustering) and the posterior
    layer's keys (:data:`pipeline.domains.POSTERIOR_KEYS`, computed after training)."""
    from pipeline.domains import POSTERIOR_KEYS
    return {k: v for k, v in (cfg.get("model") or {}).items() if k != "n_clusters" and k not in POSTERIOR_KEYS}


def training_fingerprint(cfg: dict, device: str) -> str:
    """What the trained network (embedding, denoised expression) depends on: stage 2's output, the graphs,
    the model's settings except ``n_clusters`` and the posterior layer's (:func:`training_model_settings`), the
    seed and the device."""
    from positions_enhancement.run_enhancement import fingerprint as fp2
    model = training_model_settings(cfg)
    return stages.fingerprint({"graph": cfg["graph"], "model": model, "seed": cfg.get("seed")} | {"device": device},
                              upstream=fp2(cfg))


def fingerprint(cfg: dict, device: str) -> str:
    """Stage 3's fingerprint: the trained network's (:func:`training_fingerprint`) and the clustering's
    settings (``model.n_clusters``, ``cluster.*``, the file ``cluster.reference`` names), the markers'
    (``markers.*``), ``plot.umap`` and the posterior layer's (``model.posterior_*``); a change of these alone
    re-clusters the saved embedding and brings the posterior layer up to date from the saved network
    (:func:`update_finished_run`). The labels (``data.truth``) are part of it
    only when they set the number of domains (``model.n_clusters`` null); otherwise they only score, and a
    change re-scores."""
    from pipeline.domains import posterior_settings
    from pipeline.slide import truth_fingerprint
    n_clusters = (cfg.get("model") or {}).get("n_clusters")
    labels = {"truth": truth_fingerprint(cfg)} if n_clusters is None else {}
    return stages.fingerprint({"n_clusters": n_clusters, "cluster": cfg["cluster"], "markers": cfg.get("markers"),
                               "umap": umap_wanted(cfg), "posterior": posterior_settings(cfg)}
                              | labels, inputs=[p for p in [reference_path(cfg)] if p is not None],
                              upstream=training_fingerprint(cfg, device))


def plot_settings(cfg: dict) -> dict:
    """What only the figures use (``plot.genes``, ``plot.figures``): changing it redraws them from
    ``03_domains.h5ad`` (or removes them)."""
    return {"plot": cfg.get("plot")}


# metrics.json keys written only with truth or several seeds: dropped before a rerun writes its own, also
# in a folder written before stages recorded their keys (stages.update_metrics)
OPTIONAL_METRICS = ("ari", "nmi", "n_annotated", "ari_unrefined", "nmi_unrefined", "chaos_truth", "pas_truth",
                    "seed_kept", "seed_agreement", "reference", "reference_correlation", "by_k", "most_stable_k",
                    "most_stable_k_band")


# stamp of which labels (pipeline.slide.truth_fingerprint) obs['truth'] holds in 03_domains.h5ad (02_enhanced.h5ad's:
# positions_enhancement.run_enhancement.TRUTH_STAMP)
TRUTH_IN_STAGE3 = f"{STAGE}.truth"
TRAINING_STAMP = f"{STAGE}.training"     # the trained network's fingerprint (training_fingerprint)


def outputs(cfg: dict) -> list:
    """The files a finished stage 3 has besides its figures (a damaged or missing one redoes the stage)."""
    return [OUTPUT, DOMAINS_CSV] + ([MARKERS_CSV] if marker_method(cfg) else [])


def marker_method(cfg: dict) -> str | None:
    """``markers.method``: the test ranking each domain's genes, or None for none."""
    return (cfg.get("markers") or {}).get("method")


def run_stage(cfg: dict, out: Path, device: str = "cpu", force: bool = False, progress: bool = True,
              slide=None) -> bool:
    """Stage 3 unless up to date. Returns True if it ran (or re-clustered). A run whose outputs are up to
    date but whose labels changed (``data.truth``, ``truth_column``, ``truth_missing``) is re-scored, and
    one whose trained network is up to date but whose clustering changed (``model.n_clusters``,
    ``cluster.*``) is re-clustered from its embedding (:func:`update_finished_run`), neither retrained;
    ``slide``: a function returning the slide's AnnData, called only when the labels must be read."""
    import anndata as ad

    from pipeline.domains import find_domains
    from positions_enhancement.run_enhancement import OUTPUT as STAGE2
    from positions_enhancement.run_enhancement import TRUTH_STAMP as TRUTH_IN_STAGE2

    check_model(cfg)
    check_reference(cfg, out)
    refresh_truth(cfg, out, slide)
    fp = fingerprint(cfg, device)
    if not force and stages.is_fresh(out, STAGE, fp, outputs(cfg)):
        if stages.read_stamp(out, TRUTH_IN_STAGE3) != stages.read_stamp(out, TRUTH_IN_STAGE2):
            update_finished_run(cfg, out, fp, device, recluster=False)
            return False
        stages.figures_fresh_or_redrawn(out, STAGE, fp, cfg, plot_settings(cfg), FIGURES,
                                        lambda: draw_figures(ad.read_h5ad(out / OUTPUT), cfg, out),
                                        "stage 3 (M-STGCN domains)", "figures redrawn for the plot settings")
        return False
    if not force and stages.is_fresh(out, TRAINING_STAMP, training_fingerprint(cfg, device), [OUTPUT]) and \
            update_finished_run(cfg, out, fp, device, recluster=True):   # the saved embedding(s), clustered again
        return True
    src = out / STAGE2
    if not src.exists():
        raise InputError(f"{src}: stage 2 output not found; run positions_enhancement/run_enhancement.py "
                         "with the same --out first.")
    from positions_enhancement.run_enhancement import STAGE as STAGE2_NAME
    from positions_enhancement.run_enhancement import fingerprint as fp2
    stages.check_upstream(out, STAGE2_NAME, fp2(cfg), src, "positions_enhancement/run_enhancement.py")
    t0 = time.perf_counter()
    adata = ad.read_h5ad(src)
    networks = []
    adata = find_domains(adata, cfg, device, progress=progress, networks=networks)
    tfp = training_fingerprint(cfg, device)
    save_seed_networks(out, networks, tfp)
    values, seconds = _write_outputs(adata, cfg, out, fp, device, t0=t0)
    stages.write_stamp(out, TRAINING_STAMP, tfp)
    log.info("stage 3 (M-STGCN domains): %d domains in %.1fs on %s", values["n_clusters"], seconds, device)
    return True


def _write_outputs(adata, cfg: dict, out: Path, fp: str, device: str, t0: float | None = None,
                   with_csv: bool = True) -> tuple[dict, float | None]:
    """Write what stage 3 leaves in ``out`` for ``adata`` (its domains and labels final): label colours,
    ``03_domains.h5ad``, with ``with_csv`` (new domains) their marker genes (``uns['rank_genes_groups']``,
    ``03_domain_markers.csv``) and ``03_domains.csv``, ``metrics.json`` (with ``seconds.domains``
    counted from ``t0`` to the files written, when given), the figures, and the stamps of the run (``fp``),
    its figures and its labels. Returns (metrics values, seconds or None)."""
    from positions_enhancement.run_enhancement import TRUTH_STAMP as TRUTH_IN_STAGE2

    if with_csv:
        annotate_domains(adata, cfg)
    else:                       # the same domains, other labels: their colours only
        store_label_colors(adata)
    stages.save_h5ad(out / OUTPUT, adata, cfg)
    if with_csv:
        save_domains_csv(out / DOMAINS_CSV, adata)
        save_markers_csv(out / MARKERS_CSV, adata)
    seconds = None if t0 is None else time.perf_counter() - t0
    values = domain_metrics(adata, device)
    draw_figures(adata, cfg, out)
    stages.update_metrics(out, values, None if seconds is None else {STAGE: seconds}, drop=OPTIONAL_METRICS,
                          stage=STAGE)
    stages.write_stamp(out, STAGE, fp)
    stages.write_figures_stamp(out, STAGE, fp, plot_settings(cfg))
    _copy_stamp(out, TRUTH_IN_STAGE2, TRUTH_IN_STAGE3)
    return values, seconds


def annotate_domains(adata, cfg: dict, reference=None) -> None:
    """What new domains of ``adata`` are given besides their labels: with ``plot.umap`` the embedding's UMAP
    (``obsm['X_umap']``, :func:`pipeline.domains.embedding_umap`; made once per embedding) and the domains' PAGA
    graph (``uns['paga']``, ``uns['domain_sizes']``: :func:`pipeline.domains.domain_paga`, after naming); with
    ``cluster.reference`` (or ``reference``, an AnnData) the names and colours of the reference's domains they
    match (:func:`pipeline.domains.match_domains`); with ``cluster.sweep`` the domains for other numbers of domains
    (``obs['domain_k5']``, ...: :func:`pipeline.domains.domains_by_k`); the figure's colours
    (:func:`store_label_colors`) and their marker genes (``markers.method``: :func:`pipeline.domains.domain_markers`).
    Stage 3 after training or re-clustering, and ``pipeline.api``."""
    from pipeline.domains import (domain_embedding, domain_markers, domain_paga, domains_by_k, drop_paga,
                                  embedding_umap, match_domains)

    if not umap_wanted(cfg):
        adata.obsm.pop(keys.UMAP, None)
    elif keys.UMAP not in adata.obsm:         # kept while the embedding is (a new seed's drops it)
        adata.obsm[keys.UMAP] = embedding_umap(*domain_embedding(adata))
    adata.uns.pop(keys.DOMAIN_MATCHING, None)
    named = (reference, "the reference") if reference is not None else read_reference(cfg)
    if named is not None:
        match_domains(adata, *named)
    if umap_wanted(cfg):
        domain_paga(adata)
    else:
        drop_paga(adata)
    domains_by_k(adata, cfg)
    store_label_colors(adata)
    domain_markers(adata, marker_method(cfg))


def umap_wanted(cfg: dict) -> bool:
    """``plot.umap``: whether stage 3 makes the embedding's UMAP and ``03_embedding.png``."""
    return bool((cfg.get("plot") or {}).get("umap"))


def reference_path(cfg: dict) -> Path | None:
    """``cluster.reference`` as a path (looked for as every input path is), or None when unset."""
    from pipeline.config import resolve_path

    given = (cfg.get("cluster") or {}).get("reference")
    return Path(resolve_path(given)) if given else None


def check_reference(cfg: dict, out: Path | None) -> None:
    """Refuse a ``cluster.reference`` that is ``out``'s own ``03_domains.h5ad`` (which the run rewrites; no
    ``out``: in memory), missing, or not an HDF5 file (an ``.h5ad``), before any stage runs."""
    import h5py

    from pipeline.config import input_file

    path = input_file(cfg, "cluster.reference", f"another slice's {OUTPUT}, written by stage 3",
                      own=None if out is None else Path(out) / OUTPUT, own_name=OUTPUT,
                      own_fix="give another slice's run (copy this one elsewhere first to name another run's domains "
                              "after it).")
    if path is None:
        return
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an .h5ad file; cluster.reference takes another slice's {OUTPUT}.")


def read_reference(cfg: dict) -> tuple | None:
    """(AnnData, its file name) of ``cluster.reference``, or None when unset; a file :func:`check_reference`
    refuses, or one that is no AnnData, is refused, naming the key."""
    import anndata as ad

    path = reference_path(cfg)
    if path is None:
        return None
    check_reference(cfg, None)
    try:
        reference = ad.read_h5ad(path, backed="r")     # obs, layers and uns; X (the counts) left on disk
    except Exception as exc:           # h5py / anndata raise many kinds for a file that is not an AnnData
        raise InputError(f"{path}: cannot be read as an .h5ad ({type(exc).__name__}); cluster.reference takes "
                         f"another slice's {OUTPUT}.") from None
    reference.file.close()
    return reference, str(path)


def replace_labels(adata, labels) -> None:
    """``obs['truth']`` of ``adata`` replaced by ``labels`` (a Series by spot name; None: removed), and the
    colours drawn for the old labels dropped."""
    if keys.TRUTH in adata.obs:
        del adata.obs[keys.TRUTH]
    adata.uns.pop(f"{keys.TRUTH}_colors", None)
    if labels is not None:
        adata.obs[keys.TRUTH] = labels.reindex(adata.obs_names)


def domain_metrics(adata, device: str, spatial: bool = True) -> dict:
    """Stage 3's ``metrics.json`` values for ``03_domains.h5ad``'s AnnData: ``n_spots``, ``n_clusters``,
    ``device``, ``graphs``, ``attention_mean`` (``seed_kept``, ``seed_agreement`` with several seeds;
    ``reference`` and ``reference_correlation``, each domain's profile correlation, with ``cluster.reference``) and,
    with labels in ``obs['truth']``, ``ari``, ``nmi``, ``n_annotated``, ``ari_unrefined``, ``nmi_unrefined``. Without
    labels too: ``domain_sizes`` (spots per domain) and, with ``spatial`` (one slide's coordinates: a joint run's
    sections overlap), the domains' spatial coherence (:func:`coherence`) and with ``cluster.sweep`` ``by_k``
    (:func:`sweep_metrics`), and with its stability ``most_stable_k`` and ``most_stable_k_band``
    (:func:`pipeline.domains.most_stable_k`, :func:`pipeline.domains.most_stable_k_band`: 'poor' when no K is stable;
    with or without ``spatial``)."""
    from pipeline.domains import most_stable_k, most_stable_k_band, sweep_columns

    info = adata.uns[keys.MSTGCN]
    values = {"n_spots": int(adata.n_obs), "n_clusters": int(info["n_clusters"]), "device": device,
              "graphs": list(info["graphs"]), "attention_mean": [round(float(a), 4) for a in info["attention_mean"]]}
    values["domain_sizes"] = domain_sizes(adata)
    if spatial:
        values.update(coherence(adata))
    if spatial and sweep_columns(adata):
        values["by_k"] = sweep_metrics(adata)
    if most_stable_k(adata) is not None:
        values.update(most_stable_k=most_stable_k(adata), most_stable_k_band=most_stable_k_band(adata))
    if "seed_agreement" in info:
        values.update(seed_kept=int(info["seed_kept"]), seed_agreement=[float(a) for a in info["seed_agreement"]])
    matching = adata.uns.get(keys.DOMAIN_MATCHING)
    if matching is not None:            # each domain's name and the correlation it was named by (NaN: new)
        values["reference"] = str(matching["reference"])
        values["reference_correlation"] = {str(n): float(r) for n, r in zip(matching["name"], matching["correlation"])
                                           if str(n) in set(adata.obs[keys.DOMAIN].astype(str))}
    values.update(label_scores(adata))
    if "ari" in values:
        log.info("ARI %.3f, NMI %.3f on %d annotated spots", values["ari"], values["nmi"], values["n_annotated"])
    return values


def domain_sizes(adata) -> dict:
    """{domain: spots} of ``obs['domain']``, in its order."""
    return {str(d): int(n) for d, n in adata.obs[keys.DOMAIN].value_counts(sort=False).items()}


def label_scores(adata) -> dict:
    """``ari``, ``nmi``, ``n_annotated`` of ``obs['domain']`` and ``ari_unrefined``, ``nmi_unrefined`` of
    ``obs['domain_unrefined']`` against ``obs['truth']`` on its annotated spots; {} without labels."""
    from pipeline.metrics import clustering_scores

    if not _annotated(adata):
        return {}
    s = clustering_scores(adata.obs[keys.DOMAIN], adata.obs[keys.TRUTH])
    s0 = clustering_scores(adata.obs[keys.DOMAIN_UNREFINED], adata.obs[keys.TRUTH])
    return {"ari": s["ari"], "nmi": s["nmi"], "n_annotated": s["n_annotated"],
            "ari_unrefined": s0["ari"], "nmi_unrefined": s0["nmi"]}


def sweep_metrics(adata) -> dict:
    """``metrics.json``'s ``by_k``: for each number of domains K of ``cluster.sweep`` (``obs['domain_k5']``, ...),
    ``{'K': {'chaos', 'pas'}}`` (their spatial coherence, no labels; more domains mean more boundaries, so PAS tends
    to rise with K), with ``cluster.sweep_resamples`` ``stability`` and ``stability_sd`` (``uns['sweep_stability']``:
    how alike the mixture's partitions of resampled spots are, no labels; for a joint run, of every section's spots
    together), with ``model.n_seeds`` > 1 ``seed_agreement`` (the mean ARI between the seeds' domains at K), and with
    labels ``ari``, ``nmi`` on the annotated spots (a score, never a way to choose K)."""
    from pipeline.domains import sweep_columns
    from pipeline.metrics import clustering_scores, spatial_coherence

    xy = np.asarray(adata.obsm[keys.SPATIAL])
    stability = adata.uns.get(keys.SWEEP_STABILITY) or {}
    values = {}
    for k, column in sweep_columns(adata).items():
        row = dict(spatial_coherence(adata.obs[column], xy))
        row.update({name: float(v) for name, v in (stability.get(str(k)) or {}).items()})
        if _annotated(adata):
            s = clustering_scores(adata.obs[column], adata.obs[keys.TRUTH])
            row.update(ari=s["ari"], nmi=s["nmi"])
        values[str(k)] = row
    return values


def coherence(adata) -> dict:
    """The spatial coherence (:func:`pipeline.metrics.spatial_coherence`) of ``obs['domain']`` (``chaos``, ``pas``)
    and of ``obs['domain_unrefined']`` (``chaos_unrefined``, ``pas_unrefined``), and with labels of the truth on its
    annotated spots (``chaos_truth``, ``pas_truth``), the yardstick: ``metrics.json``'s values and the figure's."""
    from pipeline.metrics import spatial_coherence

    xy = np.asarray(adata.obsm[keys.SPATIAL])
    values = dict(spatial_coherence(adata.obs[keys.DOMAIN], xy))
    values.update({f"{k}_unrefined": v for k, v in spatial_coherence(adata.obs[keys.DOMAIN_UNREFINED], xy).items()})
    if _annotated(adata):
        annotated = adata.obs[keys.TRUTH].notna().to_numpy()
        values.update({f"{k}_truth": v for k, v in
                       spatial_coherence(adata.obs[keys.TRUTH][annotated], xy[annotated]).items()})
    return values


def refresh_truth(cfg: dict, out: Path, slide=None) -> bool:
    """Give ``02_enhanced.h5ad`` this config's labels when it was written with others (stamp
    ``enhancement.truth``; stages 1 and 2 do not depend on them, so they are not redone): the slide is
    read again (``slide()``, or from ``cfg``) and its ``obs['truth']`` replaces the file's, or is removed
    when the config has none. Nothing is done when stage 2's output is missing or not this config's
    (stage 3 then refuses it). Returns True when the labels were replaced."""
    import anndata as ad

    from pipeline.domains import check_n_clusters
    from pipeline.slide import load_slide, truth_fingerprint
    from positions_enhancement.run_enhancement import OUTPUT as STAGE2
    from positions_enhancement.run_enhancement import STAGE as STAGE2_NAME
    from positions_enhancement.run_enhancement import TRUTH_STAMP as TRUTH_IN_STAGE2
    from positions_enhancement.run_enhancement import fingerprint as fp2

    tfp = truth_fingerprint(cfg)
    src = out / STAGE2
    if stages.read_stamp(out, TRUTH_IN_STAGE2) == tfp or not src.exists() \
            or stages.read_stamp(out, STAGE2_NAME) != fp2(cfg):
        return False
    if slide is None:
        labelled = load_slide(cfg)
        check_n_clusters(labelled, cfg)     # as run_dlpfc.py checks the slide it reads
    else:
        labelled = slide()
    adata = ad.read_h5ad(src)
    replace_labels(adata, labelled.obs.get(keys.TRUTH))
    stages.save_h5ad(src, adata, cfg)
    stages.write_stamp(out, TRUTH_IN_STAGE2, tfp)
    n = int(adata.obs[keys.TRUTH].notna().sum()) if keys.TRUTH in adata.obs else 0
    log.info("labels changed (data.truth): %s now holds %s; stages 1 and 2 kept", src.name,
             f"{n} annotated spots" if n else "none")
    return True


def update_finished_run(cfg: dict, out: Path, fp: str, device: str, recluster: bool) -> bool:
    """Bring a finished run up to date without training: its labels (``obs['truth']``, from
    ``02_enhanced.h5ad`` as :func:`refresh_truth` left them) and, with ``recluster``, its domains, clustered
    again from the saved embedding for this config's ``model.n_clusters`` / ``cluster.*``
    (:func:`pipeline.domains.recluster_domains`: the labels a full rerun gives). ``03_domains.h5ad`` (and with
    ``recluster`` ``03_domains.csv``), label colours, ``metrics.json`` (``ari``, ``nmi``, ...; dropped without
    labels) and the figures are rewritten; the network, embedding, denoised expression and ``seconds`` kept.
    With several seeds, a consensus that now keeps another seed takes its outputs from its saved network
    (``03_seed_networks.pt``); new ``model.posterior_*`` settings take the posterior layer from the kept seed's
    (:func:`pipeline.domains.refresh_posterior`). Returns False, with nothing written, when that file is missing
    or from another training (:func:`pipeline.domains.recluster_domains`): the caller retrains."""
    import anndata as ad

    from pipeline.domains import recluster_domains, refresh_posterior
    from positions_enhancement.run_enhancement import OUTPUT as STAGE2

    t0 = time.perf_counter()
    stage2 = ad.read_h5ad(out / STAGE2, backed="r")      # its obs only
    labels = stage2.obs[keys.TRUTH].copy() if keys.TRUTH in stage2.obs else None
    stage2.file.close()
    adata = ad.read_h5ad(out / OUTPUT)
    replace_labels(adata, labels)
    saved = partial(read_seed_networks, out, training_fingerprint(cfg, device))     # read only when needed
    if recluster and (recluster_domains(adata, cfg, saved, device) is None
                      or not refresh_posterior(adata, cfg, saved, device)):
        return False
    _write_outputs(adata, cfg, out, fp, device, with_csv=recluster)
    if recluster:
        log.info("stage 3 (M-STGCN domains): the trained network is up to date; %d domains clustered again from its "
                 "embedding in %.1fs (for model.n_clusters / cluster.* / markers.* / model.posterior_*, or a damaged "
                 "03_domains.csv, or metrics.json without its values), not retrained",
                 adata.uns[keys.MSTGCN]["n_clusters"], time.perf_counter() - t0)
    else:
        log.info("stage 3 (M-STGCN domains): up to date; re-scored against the changed labels, not retrained")
    return True


def save_seed_networks(out: Path, networks: list, tfp: str) -> None:
    """Write every seed's trained network (weights and loss history) to ``03_seed_networks.pt`` with the
    training's fingerprint, so that new clustering settings that keep another seed take its outputs from its
    network, and new posterior settings (``model.posterior_*``) the kept seed's decoder, instead of retraining;
    with none, remove an older run's file."""
    path = out / SEED_NETWORKS
    if not networks:
        path.unlink(missing_ok=True)
        return
    stages.save_tagged(path, SEED_NETWORKS_FORMAT, {"training": tfp, "networks": networks})


def read_seed_networks(out: Path, tfp: str) -> list | None:
    """The networks :func:`save_seed_networks` wrote for the training ``tfp``; None when the file is missing,
    damaged or from another training (the caller then retrains)."""
    path = out / SEED_NETWORKS
    if not path.exists():
        return None
    try:                      # weights and loss lists only: read without unpickling objects
        payload = stages.load_tagged(path, SEED_NETWORKS_FORMAT)
    except ValueError as why:          # a damaged or foreign file: retrain rather than fail
        log.warning("%s: cannot be read (%s); retraining stage 3", path, why)
        return None
    return payload["networks"] if payload.get("training") == tfp else None


def _copy_stamp(out: Path, src: str, dst: str) -> None:
    """Record under ``dst`` the fingerprint stamp ``src`` holds (no stamp: ``dst`` removed)."""
    fp = stages.read_stamp(out, src)
    if fp is None:
        (out / stages.STAMP_DIR / f"{dst}.json").unlink(missing_ok=True)
    else:
        stages.write_stamp(out, dst, fp)


def save_domains_csv(path: Path, adata) -> None:
    """The domains as a two-column CSV, ``Barcode,M-STGCN domain`` (one row per spot, the spot names as
    read): the layout 10x Loupe Browser imports as a clustering, and easy to join in R or pandas."""
    table = adata.obs[[keys.DOMAIN]].rename(columns={keys.DOMAIN: "M-STGCN domain"})
    table.index.name = "Barcode"
    stages.atomic_write(path, lambda tmp: table.to_csv(tmp))


def save_markers_csv(path: Path, adata) -> None:
    """:func:`pipeline.domains.marker_table` as a CSV (every modelled gene for every domain, best first); an
    earlier run's file is removed when there are no markers (``markers.method`` null)."""
    from pipeline.domains import marker_table

    table = marker_table(adata)
    if table.empty:
        path.unlink(missing_ok=True)
        return
    stages.atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))


def label_colors(adata) -> dict | None:
    """The figure's colours, {'M-STGCN domains': {domain: colour}, 'ground truth': {label: colour}}: each
    domain in the colour of the truth label it overlaps most (:func:`pipeline.plotting.matched_label_colors`);
    with domains named after a reference (``uns['domain_matching']``) the domains keep the reference's
    colours (``uns['domain_colors']``) and each truth label takes its matched domain's. None without truth
    or reference (the default palette)."""
    from pipeline.plotting import matched_label_colors

    domains = adata.obs[keys.DOMAIN]
    saved = adata.uns.get(f"{keys.DOMAIN}_colors")
    named = keys.DOMAIN_MATCHING in adata.uns and saved is not None and len(saved) == len(domains.cat.categories)
    fixed = dict(zip(domains.cat.categories.astype(str), saved)) if named else None
    if not _annotated(adata):
        return None if fixed is None else {"M-STGCN domains": fixed}
    return dict(zip(("M-STGCN domains", "ground truth"),
                    matched_label_colors(domains.astype(str).to_numpy(),
                                         adata.obs[keys.TRUTH].astype(object).to_numpy(), domain_colors=fixed)))


def store_label_colors(adata) -> None:
    """Write ``uns['domain_colors']`` (and ``uns['truth_colors']`` when the truth is categorical): the
    colours of ``03_domains.png``, where ``sc.pl.spatial(adata, color='domain')`` and squidpy look, so
    their plots match the pipeline's figure."""
    import pandas as pd

    from pipeline.plotting import scanpy_colors

    colors = label_colors(adata) or {}
    adata.uns[f"{keys.DOMAIN}_colors"] = scanpy_colors(adata.obs[keys.DOMAIN].cat.categories,
                                                       colors.get("M-STGCN domains"))
    truth = adata.obs.get(keys.TRUTH)
    if "ground truth" in colors and isinstance(truth.dtype, pd.CategoricalDtype):
        adata.uns[f"{keys.TRUTH}_colors"] = scanpy_colors(truth.cat.categories, colors["ground truth"])


def _annotated(adata) -> bool:
    return keys.TRUTH in adata.obs and bool(adata.obs[keys.TRUTH].notna().any())


def background_image(adata) -> tuple:
    """(image (H, W, 3) uint8, its px per full-resolution px) of the slide's ``uns['spatial']`` entry,
    hires before lowres (a legacy ST slide's <= 2000 px copy of ``data.image`` is its hires); (None, 1.0)
    when it holds none."""
    lib = keys.library_id(adata)
    entry = adata.uns[keys.SPATIAL_UNS][lib] if lib is not None else {}
    images, sf = entry.get("images") or {}, entry.get("scalefactors") or {}
    for kind in ("hires", "lowres"):
        if kind in images and sf.get(f"tissue_{kind}_scalef"):
            return np.asarray(images[kind]), float(sf[f"tissue_{kind}_scalef"])
    return None, 1.0


def draw_sweep(adata, path: Path) -> None:
    """``03_domains_by_k.png``: the domains for each number of domains of ``cluster.sweep`` (``obs['domain_k5']``,
    ...) side by side, each panel titled with its K, PAS, stability and, with several seeds, their agreement (and
    with labels its ARI; the most stable K marked, with its :func:`pipeline.domains.ari_band`), each domain coloured
    as the truth label it overlaps most (with labels) or else as the ``obs['domain']`` domain it overlaps most, so a
    domain that stays keeps its colour from panel to panel; removed without a sweep."""
    from pipeline.domains import most_stable_k, most_stable_k_band, sweep_columns
    from pipeline.plotting import matched_label_colors, spot_maps

    sweep = sweep_columns(adata)
    if not sweep:
        path.unlink(missing_ok=True)
        return
    scores, best, band = sweep_metrics(adata), most_stable_k(adata), most_stable_k_band(adata)
    main = adata.obs[keys.DOMAIN].astype(str).to_numpy()
    fixed = (label_colors(adata) or {}).get("M-STGCN domains")
    panels, colors = {}, {}
    for k, column in sweep.items():
        labels = adata.obs[column].astype(str).to_numpy()
        row = scores[str(k)]
        name = (f"K = {k}{f' (most stable, {band})' if k == best else ''}: PAS {row['pas']:.3f}"
                + (f", stability {row['stability']:.2f}" if "stability" in row else "")
                + (f", seeds agree {row['seed_agreement']:.2f}" if "seed_agreement" in row else "")
                + (f", ARI {row['ari']:.3f}" if "ari" in row else ""))
        panels[name] = labels
        if _annotated(adata):
            colors[name] = matched_label_colors(labels, adata.obs[keys.TRUTH].astype(object).to_numpy())[0]
        elif fixed is not None:        # domains named after a reference keep its colours
            colors[name] = matched_label_colors(main, labels, domain_colors=fixed)[1]
        else:
            colors[name] = matched_label_colors(labels, main)[0]
    spot_maps(adata.obsm[keys.SPATIAL], panels, path, ncols=min(4, len(panels)), colors=colors,
              title="cluster.sweep: the same embedding clustered into K domains")


def draw_embedding(adata, panels: dict, colors: dict | None, path: Path) -> None:
    """``03_embedding.png``: ``panels`` (name -> a label per spot) over the embedding's UMAP (``obsm['X_umap']``,
    ``plot.umap``), with the domains' PAGA graph (``uns['paga']``) as a last panel; removed without a UMAP."""
    from pipeline.plotting import embedding_scatter

    if keys.UMAP not in adata.obsm:
        path.unlink(missing_ok=True)
        return
    paga = adata.uns.get(keys.PAGA)
    graph = None if paga is None else ("M-STGCN domains", adata.obs[keys.DOMAIN].cat.categories,
                                       sp.csr_matrix(paga["connectivities"]).toarray())
    embedding_scatter(adata.obsm[keys.UMAP], panels, path, colors=colors, title="M-STGCN embedding (UMAP)", graph=graph)


def draw_markers(adata, cfg: dict, path: Path) -> None:
    """``03_domain_markers.png``: a dot plot of each domain's first ``plot.marker_genes`` marker genes
    (``uns['rank_genes_groups']``) in the domains' colours; removed when none were ranked."""
    from pipeline.domains import marker_table
    from pipeline.plotting import marker_dotplot

    table = marker_table(adata)
    if table.empty:
        path.unlink(missing_ok=True)
        return
    top = table[table["rank"] <= int((cfg.get("plot") or {}).get("marker_genes", 3))]
    domains = adata.obs[keys.DOMAIN]
    colors = dict(zip(domains.cat.categories.astype(str), adata.uns.get(f"{keys.DOMAIN}_colors", [])))
    marker_dotplot(adata.layers[keys.LOGNORM], list(adata.var_names), domains.astype(str).to_numpy(),
                   top.groupby("domain", sort=False)["gene"].apply(list).to_dict(), path, colors=colors)


UNCERTAINTY_PANEL = "uncertainty (1 - mixture probability)"    # 03_domains.png's obs['domain_uncertainty']


def uncertainty_panel(adata) -> tuple[dict, dict]:
    """The domains figure's ``obs['domain_uncertainty']`` panel and its colour bar's range: ({name: values (n,)
    float32}, {name: (0, 1 - 1/K)}), K the mixture's number of domains, so that the colours read the same on every
    slide and a mixture sure of every spot (uncertainties of 1e-6) is drawn as sure, not stretched over the whole
    scale; ({}, {}) for a file written before it existed."""
    if keys.DOMAIN_UNCERTAINTY not in adata.obs:
        return {}, {}
    values = adata.obs[keys.DOMAIN_UNCERTAINTY].to_numpy(np.float32)
    column = adata.obs[keys.DOMAIN_UNREFINED if keys.DOMAIN_UNREFINED in adata.obs else keys.DOMAIN]
    n_domains = len(column.cat.categories) if hasattr(column, "cat") else column.nunique()
    top = max(1.0 - 1.0 / max(n_domains, 1), float(np.nanmax(values)) if len(values) else 0.0, 1e-6)
    return {UNCERTAINTY_PANEL: values}, {UNCERTAINTY_PANEL: (0.0, top)}


def draw_domain_maps(adata, labels: dict, title: str, colors: dict, path: Path) -> None:
    """The domains figure of one slide or section (``03_domains.png``, a joint run's ``03_domains.<section>.png``):
    the ``labels`` panels (name -> labels per spot: the domains, the truth) in ``colors``, then each spot's
    ``obs['domain_uncertainty']`` (:func:`uncertainty_panel`) and the slide's H&E beside them when it has one,
    over the same area, in one row of up to 4."""
    from pipeline.plotting import spot_maps

    uncertainty, ranges = uncertainty_panel(adata)
    panels = {**labels, **uncertainty}
    image, scale = background_image(adata)
    if image is not None:
        panels["H&E"] = None            # the tissue beside the domains, over the same area
    spot_maps(adata.obsm[keys.SPATIAL], panels, path, title=title, colors=colors, image=image, image_scale=scale,
              under_spots=False, ncols=min(4, len(panels)), value_ranges=ranges)


def draw_figures(adata, cfg: dict, out: Path) -> None:
    """``03_domains.png`` (domains beside the truth when there is one, coloured to match, the PAS of both and
    the ARI in the title, each spot's ``obs['domain_uncertainty']``, and beside the slide's H&E when it has one),
    ``03_embedding.png`` (the same labels over the embedding's UMAP, ``obsm['X_umap']``, with ``plot.umap``; removed
    without), ``03_denoised.png``
    (``plot.genes``, else the 3 most spatially patterned genes: measured beside denoised, and beside
    ``layers['denoised_posterior']`` when there is one) and
    ``03_domain_markers.png`` (each domain's first ``plot.marker_genes`` markers; removed when there are none) and
    ``03_domains_by_k.png`` (:func:`draw_sweep`) from stage 3's AnnData; with ``plot.figures`` false none, and
    those of an earlier run are removed."""
    from pipeline.metrics import clustering_scores, most_patterned_genes
    from pipeline.plotting import no_gene_panels, spot_maps
    from pipeline.preprocess import match_gene_names

    if stages.figures_off(cfg, out, FIGURES):
        return

    panels = {"M-STGCN domains": adata.obs[keys.DOMAIN].astype(str).to_numpy()}
    scores = coherence(adata)
    pas = scores["pas"]
    title = f"PAS {pas:.3f}: share of spots whose nearest spots are mostly in other domains"   # no labels needed
    colors = label_colors(adata)       # each domain drawn in the colour of the layer it overlaps most
    if _annotated(adata):
        panels["ground truth"] = adata.obs[keys.TRUTH].astype(object).to_numpy()
        title = (f"ARI {clustering_scores(adata.obs[keys.DOMAIN], adata.obs[keys.TRUTH])['ari']:.3f}; "
                 f"PAS {pas:.3f} (truth {scores['pas_truth']:.3f})")
    draw_domain_maps(adata, panels, title, colors, out / FIGURE)
    draw_embedding(adata, panels, colors, out / EMBEDDING_FIGURE)       # the label panels over the embedding too
    draw_sweep(adata, out / SWEEP_FIGURE)
    draw_markers(adata, cfg, out / MARKERS_FIGURE)
    genes = (cfg.get("plot") or {}).get("genes") or most_patterned_genes(
        adata.layers[keys.LOGNORM], adata.obsm[keys.SPATIAL], list(adata.var_names),
        scores=adata.var.get(keys.MORANS_I))
    genes, missing = match_gene_names(genes, adata.var_names, "plot.genes")
    if missing:
        log.warning("plot.genes not among the modelled genes, skipped: %s", ", ".join(missing))
    panels = {}
    posterior = adata.layers.get(keys.DENOISED_POSTERIOR)          # model.posterior_layer: a third column
    for gname in genes:
        j = adata.var_names.get_loc(gname)
        panels[f"{gname} measured"] = adata.layers[keys.LOGNORM][:, j]
        panels[f"{gname} denoised"] = adata.layers[keys.DENOISED][:, j]
        if posterior is not None:
            panels[f"{gname} denoised, posterior"] = posterior[:, j]
    if panels:
        spot_maps(adata.obsm[keys.SPATIAL], panels, out / DENOISED_FIGURE, ncols=2 if posterior is None else 3)
    else:
        no_gene_panels(out / DENOISED_FIGURE, "plot.genes")


if __name__ == "__main__":
    stage_main(__doc__, run_stage)
