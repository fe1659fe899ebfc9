"""Scores: clustering agreement (ARI, NMI on annotated spots) and expression prediction (PCC, MSE)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def clustering_scores(pred, truth) -> dict:
    """ARI and NMI over spots whose truth label is present (NaN/None = not annotated)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = pd.Series(truth, dtype=object)
    ok = truth.notna().to_numpy()
    p = np.asarray(pred)[ok]
    t = truth[ok].astype(str).to_numpy()
    return {"ari": float(adjusted_rand_score(t, p)), "nmi": float(normalized_mutual_info_score(t, p)),
            "n_annotated": int(ok.sum())}


def labeling_agreement(first: list, second: list | None = None) -> np.ndarray:
    """ARI between labelings, no truth involved: (k, k) between the labelings of ``first`` (diagonal
    1), or (k, m) between those of ``first`` and ``second``. Label names do not matter."""
    from sklearn.metrics import adjusted_rand_score

    if second is None:
        k = len(first)
        A = np.eye(k)
        for i in range(k):
            for j in range(i + 1, k):
                A[i, j] = A[j, i] = adjusted_rand_score(first[i], first[j])
        return A
    return np.array([[adjusted_rand_score(a, b) for b in second] for a in first], dtype=float)


def per_gene_pearson(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Pearson correlation per column (gene) across rows (spots); NaN where either side is constant."""
    pred = np.asarray(pred, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    pc = pred - pred.mean(0)
    oc = obs - obs.mean(0)
    den = np.sqrt((pc ** 2).sum(0) * (oc ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * oc).sum(0) / den
    r[den == 0] = np.nan
    return r


def expression_scores(pred: np.ndarray, obs: np.ndarray) -> dict:
    """Mean per-gene Pearson correlation (genes with a defined correlation) and MSE."""
    r = per_gene_pearson(pred, obs)
    return {"pcc": float(np.nanmean(r)), "mse": float(np.mean((np.asarray(pred) - np.asarray(obs)) ** 2)),
            "n_genes": int(np.isfinite(r).sum())}


def morans_i(X, xy: np.ndarray, k: int = 6) -> np.ndarray:
    """Moran's I of each column of ``X`` (n, g) over the ``k``-nearest-neighbour graph of ``xy`` (n, 2).

    I = (n / sum(W)) * z'Wz / z'z with z the centred column and W the symmetric binary kNN adjacency
    (``graphs.KNNGraph``, Euclidean; no self-loops): near 1 for a smooth spatial pattern, near 0 for
    spatial noise, -1/(n-1) expected under no pattern. Any units (log-normalised expression here).
    Returns (g,) floats; NaN for a constant column.
    """
    from pipeline.graphs import KNNGraph

    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, float)
    W = KNNGraph(k=k, metric="euclidean").build(np.asarray(xy, float))
    Z = X - X.mean(0)
    den = (Z ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, len(X) / W.sum() * (Z * (W @ Z)).sum(0) / den, np.nan)


def most_patterned_genes(X, xy: np.ndarray, genes, n: int = 3, scores=None) -> list:
    """The ``n`` genes of ``genes`` (names of ``X``'s columns) with the highest Moran's I
    (:func:`morans_i`; ``scores``: those values already computed, e.g. ``var['morans_i']``): the default genes
    the figures draw, chosen from the data each figure shows (measured spots, or a prediction), never from a
    test section's measured expression."""
    score = np.nan_to_num(np.asarray(morans_i(X, xy) if scores is None else scores, float), nan=-np.inf)
    return [genes[i] for i in np.argsort(-score, kind="stable")[:n]]


def spatial_coherence(labels, xy: np.ndarray, k: int = 10) -> dict:
    """How spatially coherent a labelling is, without truth: ``chaos`` and ``pas`` as the spatial-domain
    benchmark SDMBench (Yuan et al., Nature Methods 2024) and SpatialPCA define them; lower is more coherent.

    * ``chaos``: the coordinates standardised per axis (mean 0, sd 1), each spot's distance to the nearest
      other spot of its own label, summed over the labels with more than 2 spots and divided by the number of
      all spots (labels of 1-2 spots add nothing, as in the published definition). Units: standard
      deviations of the coordinates, so it compares labellings of one slide, not slides of different shapes.
    * ``pas``: the share of spots of which more than half of the ``k`` (10) nearest other spots carry a
      different label (6 of 10), the neighbours by distance in ``xy`` as given (not standardised): scattered,
      isolated spots. Ties among equally distant neighbours (a lattice's second ring) are broken by the
      KD-tree's order.

    ``labels``: (n,) any hashable values (NaN counts as its own label; drop unannotated spots first);
    ``xy``: (n, 2) spot centres in any one unit (full-resolution pixels here). Returns floats; NaN for fewer
    than 2 spots (``pas`` with fewer than ``k + 1`` spots uses them all).
    """
    from scipy.spatial import cKDTree

    labels = pd.factorize(pd.Series(labels, dtype=object), use_na_sentinel=False)[0]
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    n = len(labels)
    if n < 2:
        return {"chaos": float("nan"), "pas": float("nan")}
    sd = xy.std(0)
    z = (xy - xy.mean(0)) / np.where(sd > 0, sd, 1.0)
    total = 0.0
    for lab in np.unique(labels):
        pts = z[labels == lab]
        if len(pts) > 2:
            total += float(cKDTree(pts).query(pts, k=2)[0][:, 1].sum())
    kk = min(k, n - 1)
    nearest = cKDTree(xy).query(xy, k=kk + 1)[1][:, 1:]
    differ = (labels[nearest] != labels[:, None]).sum(1)
    return {"chaos": total / n, "pas": float(np.mean(differ > kk / 2))}


def section_mixing(embedding: np.ndarray, sections, k: int = 15) -> dict:
    """How far spots of several sections mix in an embedding, without labels.

    * ``other_section_neighbours``: the share of each spot's ``k`` nearest other spots (Euclidean, in
      ``embedding``) that belong to another section, averaged over spots; 0 when the sections lie apart.
    * ``if_mixed_at_random``: what it would be if the sections' spots mixed at random: a spot of a section of n
      of N spots has (N - n) / (N - 1) of the others from other sections, averaged over spots (0.5 for two
      sections of one size).

    ``embedding``: (N, d); ``sections``: (N,) each spot's section. Floats; NaN for one section or
    fewer than 2 spots."""
    from sklearn.neighbors import NearestNeighbors

    sections = pd.factorize(pd.Series(sections, dtype=object))[0]
    sizes = np.bincount(sections)
    total = len(sections)
    if total < 2 or len(sizes) < 2:
        return {"other_section_neighbours": float("nan"), "if_mixed_at_random": float("nan")}
    kk = min(k, total - 1)
    emb = np.asarray(embedding, np.float64)
    nearest = NearestNeighbors(n_neighbors=kk + 1).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
    return {"other_section_neighbours": float((sections[nearest] != sections[:, None]).mean()),
            "if_mixed_at_random": float((sizes * (total - sizes)).sum() / (total * (total - 1)))}
