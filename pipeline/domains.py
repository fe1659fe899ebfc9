"""Stage 3 library: M-STGCN domains and denoised expression on the stage-2 AnnData."""
from __future__ import annotations

import importlib.util
import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data import keys
from data.errors import InputError
from pipeline.clustering import check_covariance, gaussian_mixture_fit, mixture_stability, smooth_labels
from pipeline.graphs import KNNGraph, nearest_with_ties, spot_neighbours, within_groups
from pipeline.preprocess import expected_lognorm_nb, pca

log = logging.getLogger("stpipe")


def _edge_index(A: sp.spmatrix):
    """(2, m) int64 tensor of the graph's edges."""
    import torch
    A = A.tocoo()
    return torch.from_numpy(np.vstack([A.row, A.col]).astype(np.int64))


def _adjacency(A: sp.spmatrix):
    """Symmetric binary graph as a torch sparse CSR tensor (GCNConv's fast CPU path)."""
    import torch
    A = sp.csr_matrix(A, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.from_numpy(A.indptr.astype(np.int64)),
                                   torch.from_numpy(A.indices.astype(np.int64)),
                                   torch.from_numpy(A.data), size=A.shape)


GENE_SCALINGS = ("together", "per_section")     # joint.gene_scaling


def input_pcs(adata, cfg: dict, seed: int) -> np.ndarray:
    """The network's input (n, ``model.input_pcs``): PCs of the enhanced genes (``layers['enhanced']``), each gene
    standardised over every spot. For several sections (``obs['section']``, a joint run) with
    ``joint.gene_scaling: per_section``, each gene is first standardised within each section
    (:func:`pipeline.preprocess.standardise_within`), which removes a section's shift and scale in every gene."""
    from pipeline.preprocess import standardise_within

    scaling = (cfg.get("joint") or {}).get("gene_scaling", "together")
    if scaling not in GENE_SCALINGS:
        raise InputError(f"joint.gene_scaling={scaling!r}: choose one of {', '.join(GENE_SCALINGS)}.")
    x = adata.layers[keys.ENHANCED]
    if scaling == "per_section" and keys.SECTION in adata.obs:
        x = standardise_within(np.asarray(x, np.float32), adata.obs[keys.SECTION].astype(str).to_numpy())
    return pca(x, cfg["model"]["input_pcs"], seed=seed)


def build_graphs(adata, cfg: dict, gene_pcs: np.ndarray) -> dict:
    """Spatial radius graph, gene-similarity kNN graph and (with an image) image-similarity kNN graph."""
    g = cfg["graph"]
    graphs = {"spatial": spatial_graph(adata, cfg),
              "gene": KNNGraph(g["gene_k"], "cosine").build(gene_pcs[:, :g["gene_pcs"]])}
    img = adata.obsm.get(keys.IMAGE_ENHANCED)
    if img is not None and img.shape[1] > 0 and g.get("use_image", True):
        graphs["image"] = KNNGraph(g["image_k"], "euclidean").build(img)
    return graphs


def spatial_graph(adata, cfg: dict):
    """The spatial radius graph (sparse, spots x spots): spots within ``graph.spatial_radius`` spot
    spacings (``uns['spot_spacing_px']``) of each other, measured between their array sites where
    ``obs['array_col'/'array_row']`` are a lattice of ``obsm['spatial']`` (:func:`pipeline.graphs.spot_neighbours`;
    legacy ST positions stray from the grid, DEVLOG 342). The spots of several sections (a joint run,
    :mod:`pipeline.joint`: ``obs['section']``, ``uns['sections']``) are joined only within their section, each at its
    own spacing and lattice: their pixel coordinates overlap, and no spot neighbours another section's."""
    radius = cfg["graph"]["spatial_radius"] * (1 + 1e-6)
    xy = np.asarray(adata.obsm[keys.SPATIAL])
    arr = adata.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy(float) \
        if keys.ARRAY_COL in adata.obs and keys.ARRAY_ROW in adata.obs else None
    sections = adata.uns.get(keys.SECTIONS)
    if keys.SECTION not in adata.obs or not sections:
        return spot_neighbours(xy, radius * adata.uns[keys.SPOT_SPACING], arr)
    return within_groups(adata.obs[keys.SECTION].astype(str).to_numpy(), lambda name, rows: spot_neighbours(
        xy[rows], radius * float(sections[name][keys.SPOT_SPACING]), None if arr is None else arr[rows]))


def cluster_embedding(embedding: np.ndarray, spatial, n_clusters: int, cfg: dict, seed: int) -> tuple:
    """(raw, refined, uncertainty): integer domain labels (n,) of a Gaussian mixture with ``n_clusters`` components
    on the embedding's first ``cluster.n_pcs`` PCs, their neighbour-majority smoothing over the ``spatial`` graph
    (``cluster.refine``; without it the raw labels again), and each spot's uncertainty (n,) float32, 1 - the
    mixture's posterior probability of its raw label (:func:`pipeline.clustering.gaussian_mixture_fit`)."""
    c = cfg["cluster"]
    raw, uncertainty = gaussian_mixture_fit(embedding, n_clusters, c["n_pcs"], c["covariance"], seed,
                                            c.get("n_init", 10))
    return raw, (smooth_labels(raw, spatial) if c.get("refine", True) else raw), uncertainty


def sweep_columns(adata) -> dict[int, str]:
    """The ``obs`` keys of ``cluster.sweep``'s domains in ``adata`` (:func:`domains_by_k`): {number of domains asked
    for: key}, in increasing number."""
    import re

    found = {c: re.fullmatch(keys.DOMAIN_FOR_K_PATTERN, str(c)) for c in adata.obs.columns}
    return dict(sorted((int(m.group(1)), c) for c, m in found.items() if m))


def domains_by_k(adata, cfg: dict) -> None:
    """``cluster.sweep``: the saved embedding the domains come from (:func:`domain_embedding`: the kept seed's
    ``obsm['embedding']``, or with ``cluster.seeds: together`` every seed's side by side) clustered into each number
    of domains the list gives, exactly as :func:`cluster_embedding` clusters it for ``model.n_clusters`` (the same
    mixture, seed and smoothing; the entry equal to ``model.n_clusters`` groups the spots as ``obs['domain']``), so
    that the domains for several K can be looked at side by side without training. Writes ``obs['domain_k5']``,
    ... (categorical, :func:`data.keys.domain_for_k`) and, unless ``cluster.sweep_resamples`` is 0, each K's
    label-free stability (:func:`pipeline.clustering.mixture_stability` over that many 80% subsets of the spots, at
    most 4,000 spots each): ``uns['sweep_stability']`` = {'K': {'stability', 'stability_sd'}}; with ``model.n_seeds``
    > 1 also each K's ``seed_agreement`` there, the mean ARI between the seeds' domains when every seed's embedding
    (``obsm['embedding_seeds']``) is clustered into K the same way (the training's spread, which resampling the
    spots of one embedding does not see); after removing those of an earlier sweep. Seconds per K (and per
    resample and seed)."""
    from pipeline.config import as_number_list

    for column in sweep_columns(adata).values():
        del adata.obs[column]
    adata.uns.pop(keys.SWEEP_STABILITY, None)
    c = cfg.get("cluster") or {}
    ks = c.get("sweep")
    if ks is None:
        return
    ks = as_number_list("cluster.sweep", ks)
    if ks[-1] > adata.n_obs:
        raise InputError(f"cluster.sweep={ks}: {ks[-1]} domains but the slide has {adata.n_obs} spots.")
    resamples = int(c.get("sweep_resamples", 0) or 0)     # 1 is refused with the config (pipeline.config.EXCLUDED)
    embedding, seed = domain_embedding(adata)
    together = adata.uns[keys.MSTGCN].get("domains_from") == "together"
    spatial = spatial_graph(adata, cfg)
    others = _other_seeds(adata)
    stability = {}
    for k in ks:
        labels = cluster_embedding(embedding, spatial, k, cfg, seed)[1]
        adata.obs[keys.domain_for_k(k)] = domain_categorical(labels)
        row = stability.setdefault(str(k), {})
        if resamples:
            mean, sd = mixture_stability(embedding, k, c["n_pcs"], c["covariance"], seed, c.get("n_init", 10),
                                         resamples)
            row.update(stability=mean, stability_sd=sd)
        if others:      # every seed's embedding clustered as the kept one's: how alike the trainings' domains are
            kept = (cluster_embedding(np.asarray(adata.obsm[keys.EMBEDDING]), spatial, k, cfg,
                                      int(adata.uns[keys.MSTGCN]["seed_kept"]))[1] if together else labels)
            labelings = [kept] + [cluster_embedding(e, spatial, k, cfg, s)[1] for s, e in others]
            row["seed_agreement"] = float(np.mean(consensus_run(labelings)[1]))
    stability = {k: v for k, v in stability.items() if v}
    if stability:
        adata.uns[keys.SWEEP_STABILITY] = stability
    log.info("cluster.sweep: the embedding clustered into %s domains (obs['%s'], ...)%s%s", ", ".join(map(str, ks)),
             keys.domain_for_k(ks[0]), _stability_note(stability, most_stable_k(adata)) if resamples else "",
             _seed_note(stability) if others else "")


def trained_seeds(adata) -> list[int]:
    """The seeds stage 3 trained (``uns['mstgcn']['seeds']``; the kept one alone for a run without that list)."""
    info = adata.uns[keys.MSTGCN]
    return [int(s) for s in np.atleast_1d(info.get("seeds", [info["seed_kept"]]))]


def seed_embeddings(adata) -> list:
    """[(seed, embedding (n, d)), ...] for every seed trained (``model.n_seeds`` > 1), split from
    ``obsm['embedding_seeds']`` in training order; [] with one seed, or when that key was not written."""
    seeds = trained_seeds(adata)
    if len(seeds) < 2 or keys.EMBEDDING_SEEDS not in adata.obsm:
        return []
    return list(zip(seeds, np.split(np.asarray(adata.obsm[keys.EMBEDDING_SEEDS]), len(seeds), axis=1)))


SEED_DOMAINS = ("medoid", "together")     # cluster.seeds: how several seeds' trainings give one set of domains


def seeds_together(adata, cfg: dict) -> bool:
    """Whether ``cfg`` asks for the domains of every seed's embedding side by side (``cluster.seeds: together``)
    and ``adata`` has them (several seeds trained, ``obsm['embedding_seeds']``); null means ``medoid``."""
    wanted = ((cfg.get("cluster") or {}).get("seeds") or "medoid") == "together"
    return wanted and len(trained_seeds(adata)) > 1 and keys.EMBEDDING_SEEDS in adata.obsm


def domain_embedding(adata) -> tuple[np.ndarray, int]:
    """(what ``obs['domain']`` was clustered from, the mixture's seed): with ``uns['mstgcn']['domains_from']`` =
    'together' (``cluster.seeds: together``) every seed's embedding side by side (``obsm['embedding_seeds']``, (n,
    seeds x ``model.embedding``)) and the first seed trained; else the kept seed's ``obsm['embedding']`` (n,
    ``model.embedding``) and that seed. What the sweep, the UMAP and the PAGA graph read, so that they describe the
    embedding the domains come from."""
    info = adata.uns.get(keys.MSTGCN) or {}        # an AnnData given its embedding by hand has no record: seed 0
    if info.get("domains_from") == "together":
        return np.asarray(adata.obsm[keys.EMBEDDING_SEEDS]), trained_seeds(adata)[0]
    return np.asarray(adata.obsm[keys.EMBEDDING]), int(info.get("seed_kept", 0))


def _cluster_seeds_together(adata, cfg: dict, n_clusters: int, spatial) -> None:
    """``cluster.seeds``: with ``together`` (and several seeds), ``obs['domain']`` and ``obs['domain_unrefined']``
    from every seed's embedding side by side (:func:`domain_embedding`), recorded as ``uns['mstgcn']['domains_from']``
    = 'together' (with their ``obs['domain_uncertainty']``); otherwise that record is removed (the kept seed's
    domains stand). Drops a UMAP of the other embedding."""
    info = adata.uns[keys.MSTGCN]
    before = info.pop("domains_from", None)
    if seeds_together(adata, cfg):
        info["domains_from"] = "together"
        embedding, seed = domain_embedding(adata)
        _store_domains(adata, *cluster_embedding(embedding, spatial, n_clusters, cfg, seed))
        log.info("M-STGCN: the domains cluster the %d seeds' embeddings side by side (cluster.seeds=together)",
                 len(trained_seeds(adata)))
    if info.get("domains_from") != before:
        adata.obsm.pop(keys.UMAP, None)


def _other_seeds(adata) -> list:
    """:func:`seed_embeddings` without the kept seed."""
    kept = int(adata.uns[keys.MSTGCN]["seed_kept"])
    return [(s, e) for s, e in seed_embeddings(adata) if s != kept]


def _seed_note(stability: dict) -> str:
    ks = sorted(int(k) for k in stability)
    best = ks[int(np.argmax([stability[str(k)]["seed_agreement"] for k in ks]))]
    return (f"; the seeds' domains agree best at K = {best} (mean ARI between seeds "
            f"{stability[str(best)]['seed_agreement']:.2f})")


# Steinley (2004, Psychological Methods 9:386-396): an ARI above 0.90 is excellent agreement, above 0.80 good, above
# 0.65 moderate, and below that poor; read here for the sweep's stability: the paper's bands, not fitted to any slide
ARI_BANDS = ((0.90, "excellent"), (0.80, "good"), (0.65, "moderate"))


def ari_band(value: float) -> str:
    """Steinley's band for an ARI (:data:`ARI_BANDS`): 'excellent' (> 0.90), 'good' (> 0.80), 'moderate' (> 0.65)
    or 'poor'."""
    return next((name for bound, name in ARI_BANDS if value > bound), "poor")


def _stability_note(stability: dict, best: int) -> str:
    value = stability[str(best)]["stability"]
    band = ari_band(value)
    lead = "; no K is stable: even the most stable" if band == "poor" else "; the most stable"
    return (f"{lead}, K = {best}, gives partitions of resampled spots alike at ARI {value:.2f} ({band}, by Steinley's "
            f"bands for ARI: > 0.90 excellent, > 0.80 good, > 0.65 moderate, else poor)")


def most_stable_k(adata) -> int | None:
    """The K of ``cluster.sweep`` whose clustering is the most stable (``uns['sweep_stability']``'s highest mean;
    the smaller K on a tie), or None without a stability: a label-free suggestion, never applied by itself."""
    stability = {k: v for k, v in (adata.uns.get(keys.SWEEP_STABILITY) or {}).items() if "stability" in v}
    if not stability:
        return None
    ks = sorted(int(k) for k in stability)
    return ks[int(np.argmax([float(stability[str(k)]["stability"]) for k in ks]))]


def most_stable_k_band(adata) -> str | None:
    """:func:`ari_band` of the :func:`most_stable_k`'s stability ('poor': no K of the sweep is stable), or None
    without a stability."""
    best = most_stable_k(adata)
    return None if best is None else ari_band(float(adata.uns[keys.SWEEP_STABILITY][str(best)]["stability"]))


def recluster_domains(adata, cfg: dict, networks=None, device: str = "cpu"):
    """Domains of a finished run (``03_domains.h5ad``'s AnnData) clustered again from its saved embedding
    with this config's ``model.n_clusters`` (or the number of labels in ``obs['truth']``) and ``cluster.*``, as
    :func:`find_domains` clusters after training: the same labels a full rerun gives, without training.
    With several seeds, each seed's embedding (``obsm['embedding_seeds']``) is clustered and the
    consensus taken again; when it now keeps another seed, that seed's outputs (embedding, denoised
    expression, attention, loss) come from its saved network: ``networks`` is a function returning the
    list :func:`find_domains` filled (or None when none was saved). Without it nothing changes and None is
    returned: the caller retrains. Rewrites ``obs['domain']``, ``obs['domain_unrefined']``,
    ``obs['domain_uncertainty']``, ``uns['mstgcn']['n_clusters']`` (and ``['seed_agreement']``, and with another
    seed its outputs; with ``cluster.seeds: together`` the domains cluster every seed's embedding side by side,
    ``['domains_from']``).
    Returns ``adata``, or None."""
    n_clusters = _n_clusters(adata, cfg)
    check_covariance(cfg["cluster"]["covariance"])
    info = adata.uns[keys.MSTGCN]
    kept = int(info["seed_kept"])
    seeds = trained_seeds(adata)
    spatial = spatial_graph(adata, cfg)
    if len(seeds) == 1:
        raw, labels, uncertainty = cluster_embedding(np.asarray(adata.obsm[keys.EMBEDDING]), spatial, n_clusters,
                                                     cfg, kept)
    else:
        per_seed = seed_embeddings(adata)
        if not per_seed:                                  # written before every seed's embedding was kept
            return None
        runs = [cluster_embedding(e, spatial, n_clusters, cfg, s) for s, e in per_seed]
        best, agreement = consensus_run([labels for _, labels, _ in runs])
        raw, labels, uncertainty = runs[best]
        if seeds[best] != kept:
            net = saved_seed_network(networks, len(seeds), best)
            if net is None:
                log.info("M-STGCN: with these clustering settings seed %d's domains agree best with the others' "
                         "(was seed %d), whose network was not saved; retraining", seeds[best], kept)
                return None
            out = saved_network_outputs(adata, cfg, net["state"], device)
            _store_run(adata, {**out, "raw": raw, "labels": labels, "uncertainty": uncertainty, "loss": net["loss"]},
                       seeds[best], cfg)
            log.info("M-STGCN: with these clustering settings seed %d's domains agree best with the others' (was "
                     "seed %d); its outputs come from its saved network", seeds[best], kept)
        info["seed_agreement"] = agreement
    _store_domains(adata, raw, labels, uncertainty)
    _cluster_seeds_together(adata, cfg, n_clusters, spatial)
    adata.uns[keys.MSTGCN]["n_clusters"] = int(n_clusters)
    return adata


def find_domains(adata, cfg: dict, device: str = "cpu", progress: bool = True, networks: list | None = None):
    """Train M-STGCN on ``adata`` (from stage 2) and cluster its embedding into domains.

    With ``model.n_seeds`` = K > 1, K models are trained (seeds ``seed`` .. ``seed + K - 1``), each
    clustered, and the run whose domains agree best with the others' (highest mean pairwise ARI
    between the K labelings, no truth involved: the medoid) supplies every output below. The input
    PCs and graphs are computed once (with ``seed``). A seed whose training lands in a different
    solution is outvoted only when the others agree with each other (on 151673, seeds 3-5 kept the
    odd one out: benchmarks/RESULTS.md); K times the training time. With ``cluster.seeds: together`` the domains
    (``obs['domain']``, ``obs['domain_unrefined']``) instead cluster every seed's embedding side by side
    (``obsm['embedding_seeds']``; :func:`domain_embedding`), recorded as ``uns['mstgcn']['domains_from']`` =
    'together'; the kept seed still gives every other output (DEVLOG 351-352 and 403: two such runs' domains are
    more alike than two single seeds' on 6 of 9 slides, less on her2st B1-D1). With ``model.decoder_start: genes``
    (the default) each network's ZINB decoder starts from every gene's null fit, computed once
    (:func:`decoder_start`, DEVLOG 390-391).

    Writes ``obsm['embedding']`` (n, model.embedding; with K > 1 also ``obsm['embedding_seeds']``, (n, K x
    model.embedding), every seed's side by side), ``obs['domain']`` (categorical; after the
    optional neighbour-majority smoothing), ``obs['domain_unrefined']``, ``obs['domain_uncertainty']`` (float32, 1 -
    the mixture's posterior probability of the unrefined domain, mclust's uncertainty), ``layers['denoised']``
    (E[log1p(CP10k)] of a measurement under the decoder's ZINB for every gene in var_names, same units as
    ``layers['lognorm']``; :func:`expected_lognorm_zinb`), ``layers['denoised_mean']`` (log1p of the NB mean),
    ``var['zinb_theta']`` (each gene's dispersion, refit: :func:`refit_dispersion`), with ``model.posterior_layer``
    ``layers['denoised_posterior']`` (the decoder's ZINB updated by the counts of the spot and its
    ``model.posterior_neighbours`` nearest spots: :func:`posterior_lognorm`), ``uns['mstgcn']`` (branch
    names, mean attention, loss history, and with K > 1 the seeds tried, the seed kept and the mean pairwise
    agreement). Returns ``adata``.
    ``networks``: a list to which each seed's trained network is appended ({'state': its weights on the
    CPU, 'loss': its loss history}), for :func:`recluster_domains` to use another seed without training.
    """
    n_clusters = _n_clusters(adata, cfg)
    seed = int(cfg.get("seed", 0))
    n_seeds = cfg["model"].get("n_seeds")
    n_seeds = 1 if n_seeds is None else int(n_seeds)
    if n_seeds < 1:
        raise InputError(f"model.n_seeds={n_seeds}: must be 1 or more.")
    check_covariance(cfg["cluster"]["covariance"])      # before training, not after it
    if n_seeds == 1 and cfg["cluster"].get("seeds") == "together":
        log.warning("cluster.seeds=together combines several seeds' embeddings, but model.n_seeds is 1: the domains "
                    "are the one seed's (set model.n_seeds=3, say, to combine three)")
    posterior_neighbours(cfg)
    feats = input_pcs(adata, cfg, seed)
    graphs = build_graphs(adata, cfg, feats)
    start = decoder_start(adata, cfg, seed)
    runs = [_train_and_cluster(adata, cfg, feats, graphs, n_clusters, s, device, progress, start)
            for s in range(seed, seed + n_seeds)]
    best, agreement = consensus_run([r["labels"] for r in runs])
    if networks is not None:
        networks.extend({"state": r.pop("state"), "loss": r["loss"]} for r in runs)
    adata.uns[keys.MSTGCN] = {"graphs": list(graphs), "n_clusters": int(n_clusters),
                              "graph_edges": {k: int(v.nnz) for k, v in graphs.items()},
                              "seeds": list(range(seed, seed + n_seeds))}
    _store_run(adata, runs[best], seed + best, cfg)
    if n_seeds > 1:      # every seed's embedding, so that new clustering settings re-cluster without training
        adata.obsm[keys.EMBEDDING_SEEDS] = np.concatenate([r["embedding"] for r in runs], axis=1).astype(np.float32)
        adata.uns[keys.MSTGCN]["seed_agreement"] = agreement
        log.info("M-STGCN: %d seeds, kept seed %d (mean ARI with the other seeds' domains %.3f; all pairs %.3f)",
                 n_seeds, seed + best, agreement[best], float(np.mean(agreement)))
        _cluster_seeds_together(adata, cfg, n_clusters, graphs["spatial"])
    return adata


RATE_ROWS = 4096       # spots per chunk where the decoder's rates pass through float64 (memory, not results)


def decoder_rates(log_rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rate, log1p(rate)), both (n, genes) float32, from the decoder's log rate per 10k UMIs (n, genes): each
    exponentiated in float64 and rounded once to float32, :data:`RATE_ROWS` spots at a time, so that no full
    float64 copy is held (two of them were most of stage 3's peak memory on large slides)."""
    log_rate = np.asarray(log_rate)
    rate = np.empty(log_rate.shape, np.float32)
    mean = np.empty(log_rate.shape, np.float32)
    for s in range(0, len(log_rate), RATE_ROWS):
        r = np.exp(log_rate[s:s + RATE_ROWS].astype(np.float64))
        rate[s:s + RATE_ROWS] = r
        mean[s:s + RATE_ROWS] = np.log1p(r)
    return rate, mean


DISPERSION_RANGE = (0.01, 1000.0)   # bounds of the refit inverse dispersion (DEVLOG 306)
DISPERSION_GRID = 12                # log-spaced starting points over that range (1.05 apart in log theta)
DISPERSION_STEPS = 10               # golden-section steps in the bracket of 2.1: log(theta) to ~0.02
DISPERSION_ROWS = 2048              # spots per chunk of a likelihood pass (memory, not results)
DISPERSION_MAX_SPOTS = 5000         # the fit uses at most this many spots, a seeded random subset (time; DEVLOG 311)


def dispersion_spots(n_spots: int, seed: int) -> np.ndarray | None:
    """The spots a dispersion fit uses: at most :data:`DISPERSION_MAX_SPOTS` of ``n_spots``, a random subset drawn
    with ``seed`` in the slide's order; None for all of them."""
    if n_spots <= DISPERSION_MAX_SPOTS:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_spots, DISPERSION_MAX_SPOTS, replace=False))


NULL_PI = 0.01        # the zero-inflation the decoder starts at with model.decoder_start: genes (DEVLOG 390)


def gene_null_fit(counts, total_counts: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's fit with one rate for every spot: (log rate per 10k UMIs (g,), the sum of its counts over the
    sum of the spots' depths x 1e4, at least exp(-15), the decoder's floor; its NB inverse dispersion at that rate
    (g,), by maximum likelihood with no zero-inflation, :func:`refit_dispersion`), both float64, from the raw
    ``counts`` (n, g; sparse or dense) and each spot's ``total_counts`` (n,). Where
    ``model.decoder_start`` is 'genes', the decoder starts from it."""
    counts, total_counts = sp.csr_matrix(counts), np.asarray(total_counts, np.float64)
    rate = np.asarray(counts.sum(0), np.float64).ravel() / max(float(np.maximum(total_counts, 1.0).sum()), 1.0) * 1e4
    log_rate = np.log(np.maximum(rate, np.exp(-15.0)))
    spots = dispersion_spots(counts.shape[0], seed)
    if spots is not None:
        counts, total_counts = counts[spots], total_counts[spots]
    shape = counts.shape
    theta = refit_dispersion(counts, np.broadcast_to(np.exp(log_rate).astype(np.float32), shape).copy(),
                             np.full(shape, -30.0, np.float32), total_counts, seed)
    return log_rate, theta


def refit_dispersion(counts, rate_cp10k: np.ndarray, pi_logits: np.ndarray, total_counts: np.ndarray,
                     seed: int = 0) -> np.ndarray:
    """Each gene's NB inverse dispersion theta (g,) float64 that maximises the ZINB log-likelihood of the raw
    ``counts`` (n, g; sparse or dense) with the decoder's mean (``rate_cp10k`` (n, g) x ``total_counts`` / 1e4)
    and zero-inflation logits (``pi_logits`` (n, g)) held fixed, within :data:`DISPERSION_RANGE`.

    Training moves a gene's theta little from where it starts (200 Adam steps, at most ~0.2 each parameter; from
    softplus(0) = 0.69 for every gene with ``model.decoder_start: zero``, DEVLOG 305; from the gene's null fit,
    :func:`gene_null_fit`, with 'genes'), so it is fitted here, after training, against the trained mean, for the
    denoised expression; the network, embedding and domains do not depend on it. Also the null fit itself. A grid of
    :data:`DISPERSION_GRID` values of log(theta), then golden-section steps in the bracket around the best, all genes
    at once (one pass over the spots per step, :data:`DISPERSION_ROWS` at a time), on at most
    :data:`DISPERSION_MAX_SPOTS` spots (a random subset drawn with ``seed``, in the slide's order; all of them on
    a smaller slide). What no theta changes is computed once for the 24 passes
    (:class:`models.losses.ZINBGeneLikelihood`: ~21 bytes per spot used and gene, 0.3 GB at 5,000 spots x 3,000
    genes; 2.3x faster than recomputing it, the same thetas to the bit, DEVLOG 451).
    """
    import torch

    from models.losses import ZINBGeneLikelihood

    counts, total_counts = sp.csr_matrix(counts), np.asarray(total_counts, np.float32)
    spots = dispersion_spots(counts.shape[0], seed)
    if spots is not None:
        counts, rate_cp10k, pi_logits, total_counts = (counts[spots], rate_cp10k[spots], pi_logits[spots],
                                                       total_counts[spots])
    rate = torch.from_numpy(np.asarray(rate_cp10k, np.float32))
    logits = torch.from_numpy(np.asarray(pi_logits, np.float32))
    depth = torch.from_numpy(np.maximum(total_counts, 1.0) / 1e4)
    chunks = [ZINBGeneLikelihood(torch.from_numpy(counts[s:s + DISPERSION_ROWS].toarray().astype(np.float32)),
                                 rate[s:s + DISPERSION_ROWS] * depth[s:s + DISPERSION_ROWS, None],
                                 logits[s:s + DISPERSION_ROWS])
              for s in range(0, counts.shape[0], DISPERSION_ROWS)]      # the parts no theta changes, made once

    def loglik(log_theta: np.ndarray) -> np.ndarray:
        theta = torch.from_numpy(np.exp(log_theta).astype(np.float32))
        total = torch.zeros(counts.shape[1], dtype=torch.float64)
        for chunk in chunks:
            total += chunk(theta)
        return total.numpy()

    g = counts.shape[1]
    grid = np.linspace(np.log(DISPERSION_RANGE[0]), np.log(DISPERSION_RANGE[1]), DISPERSION_GRID)
    ll = np.stack([loglik(np.full(g, v)) for v in grid])                          # (grid, g)
    best = ll.argmax(0)
    a, b = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, len(grid) - 1)]
    x_best, f_best = grid[best], ll[best, np.arange(g)]
    r = (np.sqrt(5.0) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = loglik(c), loglik(d)
    for _ in range(DISPERSION_STEPS):
        left = fc >= fd                                   # the maximum lies in [a, d]
        a, b = np.where(left, a, c), np.where(left, d, b)
        new = np.where(left, b - r * (b - a), a + r * (b - a))
        f_new = loglik(new)
        c, d, fc, fd = (np.where(left, new, d), np.where(left, c, new),
                        np.where(left, f_new, fd), np.where(left, fc, f_new))
    for x_try, f_try in ((c, fc), (d, fd)):
        better = f_try > f_best
        x_best, f_best = np.where(better, x_try, x_best), np.where(better, f_try, f_best)
    return np.exp(x_best)


def expected_lognorm_zinb(rate_cp10k: np.ndarray, theta: np.ndarray, pi_logits: np.ndarray,
                          total_counts: np.ndarray) -> np.ndarray:
    """E[log1p(1e4 X / L)] (n, g) float32 for X ~ ZINB(mean L rate / 1e4, theta, pi = sigmoid(pi_logits)): the
    log-normalised value a measurement of the spot at its own depth would have on average under the decoder's
    model, zero-inflation included, so that it compares with ``layers['lognorm']``: (1 - pi) times
    :func:`pipeline.preprocess.expected_lognorm_nb` (a structural zero has log1p(0) = 0). ``theta``: (g,), or (n, g)
    for a posterior's shape per entry (:func:`posterior_lognorm`)."""
    from scipy.special import expit

    out = expected_lognorm_nb(rate_cp10k, theta, total_counts)
    logits = np.asarray(pi_logits)
    for s in range(0, len(out), RATE_ROWS):               # expit(-logit) = 1 - pi, a chunk at a time
        out[s:s + RATE_ROWS] *= expit(-logits[s:s + RATE_ROWS].astype(np.float32))
    return out


def posterior_neighbours(cfg: dict) -> int:
    """``model.posterior_neighbours``: how many nearest spots beside the spot itself count as evidence in
    ``layers['denoised_posterior']`` (an integer, 0 or more)."""
    k = (cfg.get("model") or {}).get("posterior_neighbours", 6)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise InputError(f"model.posterior_neighbours={k!r}: give a whole number of nearest spots, 0 or more (0: "
                         "the spot's own counts only; 6 was measured).")
    return int(k)


POSTERIOR_KEYS = ("posterior_layer", "posterior_neighbours")   # model.* keys that training does not depend on


def posterior_settings(cfg: dict) -> int | None:
    """The posterior layer this config asks for: its :func:`posterior_neighbours` with ``model.posterior_layer``,
    else None (no layer). Part of stage 3's fingerprint, not of its training's (:data:`POSTERIOR_KEYS`): a change
    brings a finished run up to date from its saved network (:func:`refresh_posterior`)."""
    if not (cfg.get("model") or {}).get("posterior_layer"):
        return None
    return posterior_neighbours(cfg)


def refresh_posterior(adata, cfg: dict, networks=None, device: str = "cpu") -> bool:
    """A finished run's (``03_domains.h5ad``'s AnnData) ``layers['denoised_posterior']`` brought to this config's
    :func:`posterior_settings` without training: dropped when no longer asked for; computed when asked for and
    missing or made with another ``model.posterior_neighbours``, from the kept seed's saved network (its
    decoder's rates and zero-inflation on the run's embedding, :func:`saved_decoder_outputs`; ``networks`` as for
    :func:`recluster_domains`) and the run's refit dispersion (``var['zinb_theta']``): the layer a full rerun
    writes. Rewrites that layer and ``uns['mstgcn']['posterior_neighbours']``. Returns False, with nothing
    changed, when the layer needs a network that was not saved (the caller retrains), else True. The scripts'
    reruns call it after :func:`recluster_domains`; ``api.recluster`` does not (it keeps the result's layers)."""
    info = adata.uns[keys.MSTGCN]
    want = posterior_settings(cfg)
    have = info.get("posterior_neighbours") if keys.DENOISED_POSTERIOR in adata.layers else None
    if want == (None if have is None else int(have)):
        return True
    if want is None:
        _store_posterior(adata, None)
        return True
    seeds = trained_seeds(adata)
    net = saved_seed_network(networks, len(seeds), seeds.index(int(info["seed_kept"])))
    if net is None:
        log.info("M-STGCN: model.posterior_layer asks for layers['denoised_posterior'] and the trained network was "
                 "not saved; retraining")
        return False
    out = saved_decoder_outputs(adata, cfg, net["state"], device)
    rate, _ = decoder_rates(out.pop("log_rate"))
    _store_posterior(adata, want, rate, adata.var[keys.ZINB_THETA].to_numpy(), out.pop("pi_logits"))
    log.info("M-STGCN: layers['denoised_posterior'] (%d nearest spots) computed from the saved network, not "
             "retrained", want)
    return True


def _store_posterior(adata, k: int | None, rate=None, theta=None, pi_logits=None) -> None:
    """``layers['denoised_posterior']`` (:func:`posterior_lognorm` with ``k`` nearest spots, from the decoder's
    ``rate`` (n, g) CP10k, ``theta`` (g,) and ``pi_logits`` (n, g)) and ``uns['mstgcn']['posterior_neighbours']``
    (how it was made) written into ``adata``; both removed for ``k`` None."""
    info = adata.uns[keys.MSTGCN]
    if k is None:
        adata.layers.pop(keys.DENOISED_POSTERIOR, None)
        info.pop("posterior_neighbours", None)
        return
    info["posterior_neighbours"] = int(k)
    adata.layers[keys.DENOISED_POSTERIOR] = posterior_lognorm(
        adata.X, rate, theta, pi_logits, adata.obs[keys.TOTAL_COUNTS].to_numpy(), nearest_spots(adata, k))


POSTERIOR_ROWS = 512    # spots per chunk of the posterior layer (memory, not results)


def nearest_spots(adata, k: int) -> sp.csr_matrix:
    """(n, n) sparse 0/1: row i marks spot i's ``k`` nearest other spots by ``obsm['spatial']`` and every other
    spot tied with the k-th (:func:`pipeline.graphs.nearest_with_ties`; on an exact square grid k = 6 gives the 4
    adjacent and all 4 diagonal spots, not 2 diagonals picked by the search order; a hex grid's ring of 6 is
    the same either way; DEVLOG 330); directed, not symmetrised; fewer where its section has fewer spots;
    within its own section in a joint run (``obs['section']``): the sections' pixel coordinates overlap."""
    xy = np.asarray(adata.obsm[keys.SPATIAL], float)

    def build(_, rows) -> sp.csr_matrix:
        return nearest_with_ties(xy[rows], min(int(k), len(rows) - 1))

    groups = adata.obs[keys.SECTION].astype(str).to_numpy() if keys.SECTION in adata.obs else np.zeros(adata.n_obs)
    return within_groups(groups, build)


def posterior_lognorm(counts, rate_cp10k: np.ndarray, theta: np.ndarray, pi_logits: np.ndarray,
                      total_counts: np.ndarray, neighbours: sp.spmatrix) -> np.ndarray:
    """Each spot's expression (n, g) float32, log1p(CP10k), from the decoder's ZINB as an empirical-Bayes prior
    updated by the raw ``counts`` (n, g) of the spot and of its ``neighbours`` ((n, n) sparse, row i marking spot
    i's: :func:`nearest_spots`); SAVER's idea, on the fitted model (DEVLOG 320-321).

    Prior of spot i's rate of gene g (counts per 10k): Gamma of shape theta_g (``theta``, the refit dispersion) and
    mean rho_ig (``rate_cp10k``, the decoder's NB rate). Each counted spot k (i and its neighbours) adds its count
    x_kg to the shape and r_kg L_k / 1e4 to the rate, L its depth (``total_counts``) and r_kg = 1 for a non-zero
    count, else the chance that a zero is a sampling zero and not a structural one under the decoder's pi and mu
    at k, (1 - pi) NB(0) / (pi + (1 - pi) NB(0)) (one EM step's weight, not the exact mixture). Reported as (1 -
    pi_ig) E[log1p(1e4 X / L_i)] for X ~ NB(shape a, mean L_i a / (1e4 b)), the posterior predictive of a new
    measurement at the spot's own depth (``layers['denoised']``'s footing; :func:`expected_lognorm_zinb`). A gene
    the decoder fits tightly (large theta) keeps the decoder's value; one it fits loosely follows the counts.
    :data:`POSTERIOR_ROWS` spots at a time (each with the rows of its neighbours)."""
    from scipy.special import expit

    counts = sp.csr_matrix(counts, dtype=np.float32)
    n = counts.shape[0]
    depth = np.maximum(np.asarray(total_counts, np.float32), 1.0)
    theta = np.asarray(theta, np.float32)[None, :]
    weights = (sp.identity(n, dtype=np.float32, format="csr") + sp.csr_matrix(neighbours, dtype=np.float32)).tocsr()
    out = np.empty(counts.shape, np.float32)
    for s in range(0, n, POSTERIOR_ROWS):
        e = min(s + POSTERIOR_ROWS, n)
        rows = weights[s:e]
        used = np.unique(rows.indices)                    # the chunk's spots and their neighbours
        x = counts[used].toarray()
        d = depth[used, None] / 1e4
        mu = np.asarray(rate_cp10k[used], np.float32) * d
        pi = expit(np.asarray(pi_logits[used], np.float32))
        nb_zero = np.exp(theta * (np.log(theta) - np.log(theta + mu)))
        sampling = np.where(x > 0, 1.0, (1 - pi) * nb_zero / np.maximum(pi + (1 - pi) * nb_zero, 1e-30))
        w = rows[:, used]
        shape = theta + w @ x
        rate = theta / np.maximum(np.asarray(rate_cp10k[s:e], np.float32), 1e-12) + w @ (sampling * d)
        out[s:e] = expected_lognorm_zinb((shape / rate).astype(np.float32), shape.astype(np.float32),
                                         np.asarray(pi_logits[s:e], np.float32), depth[s:e])
    return out


def _store_domains(adata, raw: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray) -> None:
    """The one place the domains are written: ``obs['domain_unrefined']`` (the mixture's labels, categorical),
    ``obs['domain']`` (after smoothing) and ``obs['domain_uncertainty']`` (float32, 1 - the mixture's posterior
    probability of the unrefined domain: :func:`cluster_embedding`)."""
    adata.obs[keys.DOMAIN_UNREFINED] = domain_categorical(raw)
    adata.obs[keys.DOMAIN] = domain_categorical(labels)
    adata.obs[keys.DOMAIN_UNCERTAINTY] = np.asarray(uncertainty, np.float32)


def _store_run(adata, run: dict, seed: int, cfg: dict) -> None:
    """Write one seeded run's outputs (see :func:`find_domains`) into ``adata``: its embedding, domains,
    denoised expression (with each gene's dispersion refit, ``var['zinb_theta']``; with ``model.posterior_layer``
    also ``layers['denoised_posterior']``, :func:`posterior_lognorm`, and ``uns['mstgcn']['posterior_neighbours']``),
    attention, loss history and seed (``uns['mstgcn']['seed_kept']``). Takes ``log_rate`` and ``pi_logits`` out of
    ``run`` (popped, so that on a large slide each (n, genes) array is held once)."""
    adata.obsm[keys.EMBEDDING] = run["embedding"].astype(np.float32)
    adata.obsm.pop(keys.UMAP, None)          # a view of another embedding (annotate_domains makes this one's)
    _store_domains(adata, run["raw"], run["labels"], run["uncertainty"])
    rate, mean = decoder_rates(run.pop("log_rate"))      # popped: each (n, genes) array is held once (memory)
    totals = adata.obs[keys.TOTAL_COUNTS].to_numpy()
    pi_logits = run.pop("pi_logits")
    theta = refit_dispersion(adata.X, rate, pi_logits, totals, seed)
    adata.layers[keys.DENOISED_MEAN] = mean
    adata.layers[keys.DENOISED] = expected_lognorm_zinb(rate, theta, pi_logits, totals)
    adata.var[keys.ZINB_THETA] = theta.astype(np.float32)
    _store_posterior(adata, posterior_settings(cfg), rate, theta, pi_logits)
    adata.uns[keys.MSTGCN].update(attention_mean=run["attention"].mean(0).tolist(), loss=list(run["loss"]),
                                  seed_kept=int(seed))


UMAP_NEIGHBOURS = 15     # scanpy's default
GRAPH_MIN_SPOTS = UMAP_NEIGHBOURS + 2   # fewer spots: no neighbour graph, so no UMAP (the first two PCs) and no PAGA


def embedding_neighbours(embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each spot's :data:`UMAP_NEIGHBOURS` nearest spots in ``embedding`` (n, d), itself first: (indices, distances),
    both (n, UMAP_NEIGHBOURS), exact (scikit-learn), in the embedding's units. The graph of the UMAP
    (:func:`embedding_umap`) and of the domains' PAGA (:func:`domain_paga`). scanpy's own neighbour search
    (``sc.pp.neighbors``) is not used: above 4,096 spots it fails with scipy 1.17's sparse arrays."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(embedding, np.float32)
    dist, idx = NearestNeighbors(n_neighbors=UMAP_NEIGHBOURS).fit(x).kneighbors(x)
    return idx, dist


def embedding_umap(embedding: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) float32 UMAP of ``embedding`` (n, d): umap-learn's fuzzy graph of the nearest spots
    (:func:`embedding_neighbours`) and scanpy's ``sc.tl.umap``, seeded with ``seed`` (umap-learn then runs in
    one thread, so the same seed gives the same view). For looking at the embedding only: distances between
    far-apart groups in a UMAP mean little."""
    import anndata as ad
    import scanpy as sc
    from umap.umap_ import fuzzy_simplicial_set

    x = np.asarray(embedding, np.float32)
    if len(x) < GRAPH_MIN_SPOTS:       # too few spots for a neighbour graph: the first two PCs
        pcs = pca(x, 2, seed=seed)
        return np.pad(pcs, ((0, 0), (0, 2 - pcs.shape[1]))).astype(np.float32)
    idx, dist = embedding_neighbours(x)
    graph = fuzzy_simplicial_set(x, UMAP_NEIGHBOURS, np.random.RandomState(seed), "euclidean", knn_indices=idx,
                                 knn_dists=dist)[0]
    tmp = ad.AnnData(np.zeros((len(x), 0), np.float32), obsm={"embedding": x})
    tmp.obsp["connectivities"] = sp.csr_matrix(graph)
    tmp.uns["neighbors"] = {"connectivities_key": "connectivities", "params": {
        "n_neighbors": UMAP_NEIGHBOURS, "method": "umap", "metric": "euclidean", "use_rep": "embedding",
        "random_state": seed}}
    sc.tl.umap(tmp, random_state=seed)
    return np.asarray(tmp.obsm["X_umap"], np.float32)


def paga_connectivities(representation: np.ndarray, groups) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """PAGA (partition-based graph abstraction; Wolf et al., Genome Biology 2019) of ``groups`` (n labels, a
    categorical: one node per category, each with spots) over the nearest-spot graph of ``representation``
    (n, d): each spot to its 14 nearest others (:func:`embedding_neighbours`), by scanpy's ``sc.tl.paga`` (its
    model v1.2): the edges running between two groups over those expected if the graph's edges were placed at
    random, capped at 1. Returns (connectivities, groups x groups, sparse, symmetric, 0-1, in the categories'
    order; its maximum spanning tree, each edge once; spots per group). Needs at least :data:`GRAPH_MIN_SPOTS`
    spots."""
    import anndata as ad
    import scanpy as sc

    if importlib.util.find_spec("igraph") is None:          # scanpy's PAGA builds its graphs with it
        raise InputError("plot.umap: the domains' PAGA graph needs the igraph package, which requirements.txt "
                         "lists: pip install -r requirements.txt (or pip install igraph)")
    groups = pd.Categorical(groups)
    n = len(groups)
    if (groups.codes < 0).any() or len(np.unique(groups.codes)) < len(groups.categories):
        raise ValueError("PAGA: every spot needs a group and every group a spot (leave out unlabelled spots and "
                         "drop unused categories)")
    idx, dist = embedding_neighbours(representation)
    # each spot's 14 nearest others: itself left out (not always first where spots share a position)
    others = np.argsort(idx == np.arange(n)[:, None], axis=1, kind="stable")[:, :UMAP_NEIGHBOURS - 1]
    rows = np.repeat(np.arange(n), UMAP_NEIGHBOURS - 1)
    distances = sp.csr_matrix((np.maximum(np.take_along_axis(dist, others, 1).ravel(), 1e-12),
                               (rows, np.take_along_axis(idx, others, 1).ravel())), shape=(n, n))
    tmp = ad.AnnData(np.zeros((n, 0), np.float32), obs=pd.DataFrame(
        {"group": pd.Categorical(np.asarray(groups).astype(str), categories=groups.categories.astype(str))},
        index=np.arange(n).astype(str)))
    tmp.obsp["distances"] = distances
    tmp.obsp["connectivities"] = distances.astype(bool).astype(np.float32)
    tmp.uns["neighbors"] = {"distances_key": "distances", "connectivities_key": "connectivities",
                            "params": {"n_neighbors": UMAP_NEIGHBOURS, "method": "umap", "metric": "euclidean"}}
    sc.tl.paga(tmp, groups="group")
    return (sp.csr_matrix(tmp.uns["paga"]["connectivities"]), sp.csr_matrix(tmp.uns["paga"]["connectivities_tree"]),
            np.asarray(tmp.uns["group_sizes"], np.int64))


def domain_paga(adata) -> None:
    """The domains' PAGA graph over the embedding (:func:`paga_connectivities` of ``obs['domain']`` on the
    embedding the domains come from, :func:`domain_embedding`: ``obsm['embedding']`` unless ``cluster.seeds`` is
    ``together``): the M-STGCN paper's UMAP + PAGA figure; on DLPFC the strongest connections follow the
    cortical layers' order (benchmarks/RESULTS.md). Writes ``uns['paga']`` in scanpy's layout
    (``connectivities``, domains x domains, in the order of ``obs['domain']``'s categories;
    ``connectivities_tree``; ``groups`` = 'domain'), so ``sc.pl.paga(adata)`` draws it, and ``uns['domain_sizes']``
    (spots per domain). With fewer than :data:`GRAPH_MIN_SPOTS` spots there is no graph: both are removed."""
    drop_paga(adata)
    if adata.n_obs < GRAPH_MIN_SPOTS:
        return
    conn, tree, sizes = paga_connectivities(domain_embedding(adata)[0], adata.obs[keys.DOMAIN])
    adata.uns[keys.PAGA] = {"connectivities": conn, "connectivities_tree": tree, "groups": keys.DOMAIN}
    adata.uns[keys.DOMAIN_SIZES] = sizes


def drop_paga(adata) -> None:
    """Remove what :func:`domain_paga` writes (``uns['paga']``, ``uns['domain_sizes']``)."""
    for key in (keys.PAGA, keys.DOMAIN_SIZES):
        adata.uns.pop(key, None)


def paga_table(adata) -> pd.DataFrame:
    """``uns['paga']`` (:func:`domain_paga`) as one row per connected pair of domains, strongest first:
    ``domain_a``, ``domain_b``, ``connectivity`` (0-1) and ``tree`` (True for the maximum spanning tree's
    edges). Empty without it."""
    columns = ["domain_a", "domain_b", "connectivity", "tree"]
    paga = adata.uns.get(keys.PAGA)
    if paga is None:
        return pd.DataFrame(columns=columns)
    names = adata.obs[keys.DOMAIN].cat.categories.astype(str)
    conn = sp.triu(sp.csr_matrix(paga["connectivities"]), k=1).tocoo()
    tree = sp.csr_matrix(paga["connectivities_tree"])
    tree = ((tree + tree.T) != 0).toarray()
    table = pd.DataFrame({"domain_a": names[conn.row], "domain_b": names[conn.col],
                          "connectivity": conn.data.astype(float), "tree": tree[conn.row, conn.col]})
    return table[table["connectivity"] > 0].sort_values("connectivity", ascending=False, kind="stable") \
        .reset_index(drop=True)[columns]


MARKER_METHODS = ("t-test", "t-test_overestim_var", "wilcoxon")   # markers.method: scanpy's tests (null: none)


def domain_markers(adata, method: str | None = "t-test") -> None:
    """Each domain's genes ranked against the other spots, as scanpy's ``sc.tl.rank_genes_groups`` ranks
    them (``method``; null removes them): on ``layers['lognorm']`` (measured log1p(CP10k), not the denoised
    values) of the modelled genes, grouped by ``obs['domain']``. Writes ``uns['rank_genes_groups']``
    (scanpy's layout, so ``sc.pl.rank_genes_groups_dotplot(adata)`` and ``sc.get.rank_genes_groups_df`` read
    it; with ``pts``: the share of spots with counts, in the domain and elsewhere). A domain of one spot
    has no spread to test and is left out. The domains were found from these same counts, so the p-values
    overstate significance: the ranking is the use, not the p-values."""
    import scanpy as sc

    adata.uns.pop(keys.DOMAIN_MARKERS, None)
    if method is None:
        return
    if method not in MARKER_METHODS:
        raise InputError(f"markers.method={method!r}: choose one of {', '.join(MARKER_METHODS)} or null.")
    sizes = adata.obs[keys.DOMAIN].value_counts()
    groups = [str(g) for g in adata.obs[keys.DOMAIN].cat.categories if sizes.get(g, 0) >= 2]
    if len(groups) < 2:
        log.info("domain markers: fewer than 2 domains with 2 or more spots; none ranked")
        return
    left_out = [str(g) for g in adata.obs[keys.DOMAIN].cat.categories if str(g) not in groups]
    if left_out:
        log.info("domain markers: domain(s) %s of one spot left out", ", ".join(left_out))
    with warnings.catch_warnings():     # scanpy >= 1.12 still takes every domain's variance, and warns about the
        warnings.filterwarnings("ignore", "Group counts matches dof", RuntimeWarning)   # one-spot ones (by index)
        sc.tl.rank_genes_groups(adata, keys.DOMAIN, groups=groups if left_out else "all", reference="rest",
                                method=method, layer=keys.LOGNORM, use_raw=False, pts=True,
                                key_added=keys.DOMAIN_MARKERS)


def marker_table(adata) -> pd.DataFrame:
    """``uns['rank_genes_groups']`` (:func:`domain_markers`) as one long table, best first within each domain:
    ``domain``, ``rank`` (1 = best), ``gene``, ``score`` (the test statistic), ``log2_fold_change`` (scanpy's:
    log2 of the ratio of expm1(mean log1p(CP10k)) in the domain to that elsewhere), ``pval``, ``pval_adj``
    (Benjamini-Hochberg over the genes), ``pct_in_domain`` and ``pct_elsewhere`` (share of spots with counts).
    Empty without it."""
    cols = ["domain", "rank", "gene", "score", "log2_fold_change", "pval", "pval_adj", "pct_in_domain", "pct_elsewhere"]
    res = adata.uns.get(keys.DOMAIN_MARKERS)
    if not res:
        return pd.DataFrame(columns=cols)
    parts = []
    for group in res["names"].dtype.names:
        genes = np.asarray(res["names"][group]).astype(str)
        parts.append(pd.DataFrame({
            "domain": group, "rank": np.arange(1, len(genes) + 1), "gene": genes,
            "score": np.asarray(res["scores"][group], float),
            "log2_fold_change": np.asarray(res["logfoldchanges"][group], float),
            "pval": np.asarray(res["pvals"][group], float), "pval_adj": np.asarray(res["pvals_adj"][group], float),
            "pct_in_domain": pd.DataFrame(res["pts"])[group].reindex(genes).to_numpy(float),
            "pct_elsewhere": pd.DataFrame(res["pts_rest"])[group].reindex(genes).to_numpy(float)}))
    return pd.concat(parts, ignore_index=True)[cols]


MIN_SHARED_GENES = 50     # a reference must share at least this many modelled genes to name domains by


def domain_profiles(adata, genes) -> pd.DataFrame:
    """(domains x ``genes``) each domain's mean ``layers['lognorm']`` (log1p(CP10k)) minus the mean over all
    the slide's spots: how the domain differs from its own slide, in natural-log units. Taking each slide's
    own mean out leaves what sequencing depth and capture efficiency change between slides aside. Spots
    without a domain (NaN, in a reference made elsewhere) count in the slide's mean only."""
    cols = adata.var_names.get_indexer(genes)
    x = adata.layers[keys.LOGNORM][:, cols]
    x = np.asarray(x.todense() if sp.issparse(x) else x, np.float64)
    labels = adata.obs[keys.DOMAIN]
    domains = np.where(labels.notna(), labels.astype(str), None)        # a spot without a domain joins none
    categorical = isinstance(labels.dtype, pd.CategoricalDtype)
    order = labels.cat.categories if categorical else pd.unique(labels.dropna().astype(str))
    names = [str(c) for c in order if (domains == str(c)).any()]
    means = np.vstack([x[domains == d].mean(0) for d in names])
    return pd.DataFrame(means - x.mean(0), index=names, columns=list(genes))


def pair_by_correlation(corr: np.ndarray) -> list[tuple[int, int]]:
    """(row, column) pairs of ``corr`` (domains here x reference domains), one to one, with the highest total
    correlation (Hungarian assignment, ``scipy.optimize.linear_sum_assignment``), keeping only the pairs whose
    correlation is positive."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-corr)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if corr[r, c] > 0]


def match_domains(adata, reference, reference_name: str = "reference") -> pd.DataFrame:
    """Name the domains of ``adata`` after those of ``reference`` (another slice's stage-3 result: its
    ``obs['domain']`` and ``layers['lognorm']``, e.g. an adjacent section's ``03_domains.h5ad``), so the
    same tissue region carries the same name and colour on both. No labels are used.

    Each domain's profile is :func:`domain_profiles` over the modelled genes both slices have (at least
    :data:`MIN_SHARED_GENES`); domains are paired one to one by the highest total Pearson correlation of
    their profiles, and a pair is kept only when its correlation is positive (the two domains differ from
    their slides in the same direction): :func:`pair_by_correlation`.
    A domain left unpaired (more domains here than in the reference, or no positive partner) gets a new
    name the reference does not use: the next whole numbers after the reference's largest. Renames the
    categories of ``obs['domain']`` and ``obs['domain_unrefined']`` (reference names first, in the
    reference's order); writes ``uns['domain_colors']`` (each named domain in the reference's colour, new
    ones in colours the reference does not use) and ``uns['domain_matching']`` (``reference``,
    ``n_genes``, and per domain ``domain`` (its name before), ``reference_domain`` (now its name; '' when
    new), ``correlation`` and ``name``). Returns that table as a DataFrame."""
    from pipeline.plotting import scanpy_colors

    if keys.DOMAIN not in reference.obs or keys.LOGNORM not in reference.layers:
        raise InputError(f"{reference_name}: has no obs['{keys.DOMAIN}'] and layers['{keys.LOGNORM}'] to name domains "
                         "by; give another run's 03_domains.h5ad.")
    genes = [g for g in adata.var_names if g in set(reference.var_names)]
    if len(genes) < MIN_SHARED_GENES:
        raise InputError(f"{reference_name}: shares {len(genes)} of its modelled genes with this slide (at least "
                         f"{MIN_SHARED_GENES} are needed to compare domains); give a run of a slide measuring the "
                         "same genes.")
    ours, theirs = domain_profiles(adata, genes), domain_profiles(reference, genes)

    def standardised(p):
        z = p.to_numpy() - p.to_numpy().mean(1, keepdims=True)
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    corr = standardised(ours) @ standardised(theirs).T
    paired = pair_by_correlation(corr)
    pairs = {ours.index[r]: theirs.index[c] for r, c in paired}
    ref_names = list(theirs.index)
    labels = reference.obs[keys.DOMAIN]
    ref_cats = [str(c) for c in labels.cat.categories] if isinstance(labels.dtype, pd.CategoricalDtype) else ref_names
    whole = [int(n) for n in ref_cats if n.lstrip("-").isdigit()]
    start = max(whole) + 1 if whole else len(ref_cats)
    columns = [c for c in (keys.DOMAIN, keys.DOMAIN_UNREFINED) if c in adata.obs]
    old_names = list(dict.fromkeys(str(c) for col in columns for c in adata.obs[col].cat.categories))
    new = [d for d in old_names if d not in pairs]
    names = pairs | {d: str(start + i) for i, d in enumerate(new)}
    order = [n for n in ref_names if n in names.values()] + [names[d] for d in new]
    for col in columns:
        renamed = adata.obs[col].astype(str).map(names)
        adata.obs[col] = pd.Categorical(renamed, categories=[n for n in order if (renamed == n).any()])
    saved = reference.uns.get(f"{keys.DOMAIN}_colors")
    saved = list(saved) if saved is not None and len(saved) == len(ref_cats) else scanpy_colors(ref_cats)
    ref_colors = dict(zip(ref_cats, saved))
    spare = [c for c in scanpy_colors([str(i) for i in range(len(ref_cats) + len(new))]) if c not in saved]
    colors = {n: ref_colors[n] for n in pairs.values()} | {names[d]: spare[i % len(spare)] if spare else "#808080"
                                                          for i, d in enumerate(new)}
    adata.uns[f"{keys.DOMAIN}_colors"] = [colors[str(c)] for c in adata.obs[keys.DOMAIN].cat.categories]
    r_of = {ours.index[r]: float(corr[r, c]) for r, c in paired}
    table = pd.DataFrame({"domain": old_names, "reference_domain": [pairs.get(d, "") for d in old_names],
                          "correlation": [round(r_of.get(d, np.nan), 4) for d in old_names],
                          "name": [names[d] for d in old_names]})
    adata.uns[keys.DOMAIN_MATCHING] = {"reference": str(reference_name), "n_genes": len(genes),
                                       **{c: table[c].to_numpy() for c in table.columns}}
    for row in table.itertuples():
        log.info("domain %s -> %s (r %.3f with the reference's)", row.domain,
                 row.reference_domain or f"{row.name} (new: no positive match in {reference_name})", row.correlation)
    return table


def domain_categorical(labels: np.ndarray) -> pd.Categorical:
    """Integer domain labels as a categorical of strings in numeric order ('2' before '10'), so
    scanpy's legends and colours follow the domain numbers."""
    values = np.asarray(labels).astype(int)
    return pd.Categorical(values.astype(str), categories=[str(v) for v in np.unique(values)])


def _n_clusters(adata, cfg: dict, announce: bool = True) -> int:
    """``model.n_clusters``, or the number of distinct truth labels when it is null (logged when ``announce``);
    refused unless it is between 2 and the number of spots (``adata.n_obs``)."""
    n_clusters = cfg["model"].get("n_clusters")
    source = f"model.n_clusters={n_clusters}"
    if n_clusters is None:
        truth = adata.obs.get(keys.TRUTH)
        if truth is None or truth.isna().all():
            raise InputError("model.n_clusters is not set and there is no truth to count labels from: "
                             "set it, e.g. --set model.n_clusters=7")
        n_clusters = int(truth.dropna().nunique())
        source = (f"model.n_clusters is not set and the truth has {n_clusters} distinct "
                  f"label{'s' if n_clusters != 1 else ''}")
        if announce:
            log.info("model.n_clusters not set: using the number of annotated labels (%d)", n_clusters)
    if n_clusters < 2 or n_clusters > adata.n_obs:
        raise InputError(f"{source}: the number of domains must be between 2 and the number of spots "
                         f"({adata.n_obs} on this slide); set model.n_clusters.")
    return int(n_clusters)


def check_n_clusters(adata, cfg: dict) -> None:
    """Refuse a number of domains this slide cannot have (:func:`_n_clusters`) as soon as the slide is
    read, before stages 1 and 2 spend their time (``run_dlpfc.py`` / ``run_breast_cancer.py``); stage 3 logs the
    number it takes."""
    _n_clusters(adata, cfg, announce=False)


DECODER_STARTS = ("zero", "genes")


def decoder_start(adata, cfg: dict, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Where ``model.decoder_start`` is 'genes', each gene's null fit (:func:`gene_null_fit` of ``adata``'s raw
    counts: log rate, dispersion) for the decoder to start from; None for 'zero' (or null: every gene's rate
    1 CP10k, dispersion 0.69 and zero-inflation 0.5, all under weight decay)."""
    start = cfg["model"].get("decoder_start") or "zero"
    if start not in DECODER_STARTS:
        raise InputError(f"model.decoder_start={start!r}: must be one of {', '.join(DECODER_STARTS)}.")
    if start == "zero":
        return None
    return gene_null_fit(adata.X, adata.obs[keys.TOTAL_COUNTS].to_numpy(), seed)


def _train_and_cluster(adata, cfg: dict, feats: np.ndarray, graphs: dict, n_clusters: int, seed: int,
                       device: str, progress: bool, start: tuple | None) -> dict:
    """One seeded M-STGCN: train, infer, cluster; the decoder starting from ``start`` (:func:`decoder_start`: the
    genes' null fit, or None for the zero start). Returns the embedding, raw and smoothed labels, log rates,
    zero-inflation logits, attention and loss history (numpy)."""
    import torch

    from models.reproducibility import seed_everything
    from models.training import TrainParams, infer, train_mstgcn

    m = cfg["model"]
    seed_everything(seed)
    names = list(graphs)
    x = torch.from_numpy(feats).to(device)
    adjs = [_adjacency(graphs[k]).to(device) for k in names]
    spatial_pairs = _edge_index(graphs["spatial"]).to(device)
    counts = torch.from_numpy(np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X, np.float32)).to(device)
    sf = torch.from_numpy((adata.obs[keys.TOTAL_COUNTS].to_numpy(np.float32) / 1e4)[:, None]).to(device)
    codes, n_sections = section_codes(adata, cfg)
    section = None if codes is None else torch.from_numpy(codes).to(device)
    model = _network(cfg, x.shape[1], adata.n_vars, len(names), n_sections).to(device)
    if start is not None:
        model.decoder.start_from(torch.from_numpy(start[0]), torch.from_numpy(start[1]), NULL_PI)
    params = TrainParams(epochs=m["epochs"], lr=m["lr"], weight_decay=m["weight_decay"], zinb_weight=m["zinb_weight"],
                         spatial_weight=m["spatial_weight"], feature_weight=m.get("feature_weight", 0.0), negative_ratio=m["negative_ratio"],
                         decoder_batch=m["decoder_batch"], seed=seed, decay_gene_parameters=start is None)
    history = train_mstgcn(model, x, adjs, counts, sf, spatial_pairs, params, progress=progress, section=section)
    out = infer(model, x, adjs, section)
    raw, labels, uncertainty = cluster_embedding(out["embedding"], graphs["spatial"], n_clusters, cfg, seed)
    return {"embedding": out["embedding"], "raw": raw, "labels": labels, "uncertainty": uncertainty,
            "log_rate": out["log_rate"],
            "pi_logits": out["pi_logits"], "attention": out["attention"], "loss": [h["loss"] for h in history],
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def _network(cfg: dict, n_inputs: int, n_genes: int, n_graphs: int, n_sections: int = 0):
    """An untrained M-STGCN as ``model.*`` sets it up (its decoders reading ``n_sections`` sections' codes)."""
    from models.mstgcn import MSTGCN

    m = cfg["model"]
    return MSTGCN(n_inputs, n_genes, n_graphs, m["hidden"], m["embedding"], m["decoder_hidden"], m["dropout"],
                  n_sections=n_sections)


def section_codes(adata, cfg: dict) -> tuple[np.ndarray | None, int]:
    """(each spot's section as an integer code (n,), the number of sections) when the network's decoders read the
    section (``joint.section_covariate`` and spots of several sections, ``obs['section']``); else (None, 0)."""
    if not (cfg.get("joint") or {}).get("section_covariate") or keys.SECTION not in adata.obs:
        return None, 0
    section = pd.Categorical(adata.obs[keys.SECTION])
    return section.codes.astype(np.int64), len(section.categories)


def saved_seed_network(networks, n_seeds: int, index: int) -> dict | None:
    """The saved network ({'state', 'loss'}, as :func:`find_domains` fills ``networks``) of the ``index``-th of a
    run's ``n_seeds`` seeds; None when none was saved for them. ``networks``: a function returning the saved list
    (or None), called once, or None."""
    saved = networks() if networks is not None else None
    return saved[index] if saved and len(saved) == n_seeds else None


def saved_decoder_outputs(adata, cfg: dict, state: dict, device: str = "cpu") -> dict:
    """A saved seed's trained decoder (``state``, as for :func:`saved_network_outputs`) run on the embedding that
    network gave (``obsm['embedding']`` of ``03_domains.h5ad``'s AnnData, with that seed kept): its ``log_rate``,
    ``theta`` and ``pi_logits``, the values :func:`saved_network_outputs` gives, without building the input PCs and
    graphs or running the encoder again (DEVLOG 340)."""
    import torch

    from models.training import decode

    n_graphs = len({k.split(".")[1] for k in state if k.startswith("branches.")})
    model, section = _saved_network(adata, cfg, state, state["feature_decoder.weight"].shape[0], n_graphs, device)
    embedding = torch.from_numpy(np.ascontiguousarray(adata.obsm[keys.EMBEDDING], np.float32)).to(device)
    return decode(model, embedding, section)


def saved_network_outputs(adata, cfg: dict, state: dict, device: str = "cpu") -> dict:
    """A saved seed's trained network (``state``, from :func:`find_domains`' ``networks``) run on the slide
    it was trained on (``03_domains.h5ad``'s AnnData, which holds stage 2's inputs): its embedding, log rates,
    theta and attention, as after its training (the input PCs and graphs are built again as for training)."""
    import torch

    from models.training import infer

    feats = input_pcs(adata, cfg, int(cfg.get("seed", 0)))
    graphs = build_graphs(adata, cfg, feats)
    model, section = _saved_network(adata, cfg, state, feats.shape[1], len(graphs), device)
    return infer(model, torch.from_numpy(feats).to(device), [_adjacency(graphs[k]).to(device) for k in graphs],
                 section)


def _saved_network(adata, cfg: dict, state: dict, n_inputs: int, n_graphs: int, device: str) -> tuple:
    """(the network ``model.*`` sets up for ``adata`` with the saved weights ``state``, on ``device``; each spot's
    section code as a tensor there, or None when its decoders read no section: :func:`section_codes`)."""
    import torch

    codes, n_sections = section_codes(adata, cfg)
    model = _network(cfg, n_inputs, adata.n_vars, n_graphs, n_sections)
    model.load_state_dict(state)
    model.to(device)
    return model, None if codes is None else torch.from_numpy(codes).to(device)


def consensus_run(labelings: list) -> tuple[int, list]:
    """Index of the medoid labeling (highest mean ARI with the others) and each one's mean ARI
    with the others. Uses no truth; ties go to the earliest. One labeling: (0, [1.0])."""
    from pipeline.metrics import labeling_agreement

    k = len(labelings)
    if k == 1:
        return 0, [1.0]
    mean = (labeling_agreement(labelings).sum(1) - 1.0) / (k - 1)
    return int(np.argmax(mean)), [round(float(v), 4) for v in mean]
