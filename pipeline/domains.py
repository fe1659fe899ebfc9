"""Stage 3 library: M-STGCN domains and denoised expression on the stage-2 AnnData."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data import keys
from data.errors import InputError
from pipeline.clustering import gaussian_mixture_labels, smooth_labels
from pipeline.graphs import KNNGraph, RadiusGraph
from pipeline.preprocess import expected_lognorm_nb, pca

log = logging.getLogger("stpipe")


def _edge_index(A: sp.spmatrix):
    """(2, m) int64 tensor of the graph's edges."""
    import torch
    A = A.tocoo()
    return torch.from_numpy(np.vstack([A.row, A.col]).astype(np.int64))


def _adjacency(A: sp.spmatrix):
    """Symmetric binary graph as a torch sparse CSR tensor (GCNConv's fast CPU path)."""
    import warnings

    import torch
    A = sp.csr_matrix(A, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.from_numpy(A.indptr.astype(np.int64)),
                                   torch.from_numpy(A.indices.astype(np.int64)),
                                   torch.from_numpy(A.data), size=A.shape)


def build_graphs(adata, cfg: dict, gene_pcs: np.ndarray) -> dict:
    """Spatial radius graph, gene-similarity kNN graph and (with an image) image-similarity kNN graph."""
    g = cfg["graph"]
    graphs = {"spatial": RadiusGraph(g["spatial_radius"] * adata.uns[keys.SPOT_SPACING] * (1 + 1e-6))
              .build(adata.obsm[keys.SPATIAL]),
              "gene": KNNGraph(g["gene_k"], "cosine").build(gene_pcs[:, :g["gene_pcs"]])}
    img = adata.obsm.get(keys.IMAGE_ENHANCED)
    if img is not None and img.shape[1] > 0 and g.get("use_image", True):
        graphs["image"] = KNNGraph(g["image_k"], "euclidean").build(img)
    return graphs


def find_domains(adata, cfg: dict, device: str = "cpu", progress: bool = True):
    """Train M-STGCN on ``adata`` (from stage 2) and cluster its embedding into domains.

    Writes ``obsm['embedding']`` (n, model.embedding), ``obs['domain']`` (categorical; after the
    optional neighbour-majority smoothing), ``obs['domain_unrefined']``, ``layers['denoised']``
    (decoder NB mean as log1p(CP10k) for every gene in var_names, same units as
    ``layers['lognorm']``), ``uns['mstgcn']`` (branch names, mean attention, loss history).
    Returns ``adata``.
    """
    import torch

    from models.mstgcn import MSTGCN
    from models.training import TrainParams, infer, seed_everything, train_mstgcn

    m = cfg["model"]
    n_clusters = m.get("n_clusters")
    if n_clusters is None:
        truth = adata.obs.get(keys.TRUTH)
        if truth is None or truth.isna().all():
            raise InputError("model.n_clusters is not set and there is no truth to count labels from: "
                             "set it, e.g. --set model.n_clusters=7")
        n_clusters = int(truth.dropna().nunique())
        log.info("model.n_clusters not set: using the number of annotated labels (%d)", n_clusters)
    if n_clusters < 2 or n_clusters > adata.n_obs:
        raise InputError(f"model.n_clusters={n_clusters}: must be between 2 and the number of spots.")
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    feats = pca(adata.layers[keys.ENHANCED], m["input_pcs"], seed=seed)
    graphs = build_graphs(adata, cfg, feats)
    names = list(graphs)
    x = torch.from_numpy(feats).to(device)
    adjs = [_adjacency(graphs[k]).to(device) for k in names]
    spatial_pairs = _edge_index(graphs["spatial"]).to(device)
    counts = torch.from_numpy(np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X, np.float32)).to(device)
    sf = torch.from_numpy((adata.obs[keys.TOTAL_COUNTS].to_numpy(np.float32) / 1e4)[:, None]).to(device)
    model = MSTGCN(x.shape[1], adata.n_vars, len(names), m["hidden"], m["embedding"], m["decoder_hidden"],
                   m["dropout"]).to(device)
    params = TrainParams(epochs=m["epochs"], lr=m["lr"], weight_decay=m["weight_decay"], zinb_weight=m["zinb_weight"],
                         spatial_weight=m["spatial_weight"], feature_weight=m.get("feature_weight", 0.0), negative_ratio=m["negative_ratio"],
                         decoder_batch=m["decoder_batch"], seed=seed)
    history = train_mstgcn(model, x, adjs, counts, sf, spatial_pairs, params, progress=progress)
    out = infer(model, x, adjs)
    emb = out["embedding"]
    c = cfg["cluster"]
    raw = gaussian_mixture_labels(emb, n_clusters, c["n_pcs"], c["covariance"], seed, c.get("n_init", 10))
    labels = smooth_labels(raw, graphs["spatial"]) if c.get("refine", True) else raw
    adata.obsm[keys.EMBEDDING] = emb.astype(np.float32)
    adata.obs[keys.DOMAIN_UNREFINED] = pd.Categorical(raw.astype(str))
    adata.obs[keys.DOMAIN] = pd.Categorical(labels.astype(str))
    rate = np.exp(out["log_rate"].astype(np.float64))
    adata.layers[keys.DENOISED_MEAN] = np.log1p(rate).astype(np.float32)
    adata.layers[keys.DENOISED] = expected_lognorm_nb(rate, out["theta"], adata.obs[keys.TOTAL_COUNTS].to_numpy())
    adata.uns[keys.MSTGCN] = {"graphs": names, "attention_mean": out["attention"].mean(0).tolist(),
                           "loss": [h["loss"] for h in history], "n_clusters": int(n_clusters),
                           "graph_edges": {k: int(v.nnz) for k, v in graphs.items()}}
    return adata
