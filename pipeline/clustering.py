"""Domains from an embedding: a Gaussian mixture (the mclust idea, in scikit-learn, no R) and an
optional spatial smoothing of the labels by neighbour majority."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from data.errors import InputError

COVARIANCES = ("tied", "full", "diag", "spherical")   # scikit-learn's covariance types; tied = mclust EEE


def check_covariance(covariance: str) -> None:
    """Refuse a covariance type scikit-learn does not know (``cluster.covariance``)."""
    if covariance not in COVARIANCES:
        raise InputError(f"cluster.covariance={covariance!r}: choose one of {', '.join(COVARIANCES)} "
                         "(tied = mclust's EEE, the default).")


def mixture_input(embedding: np.ndarray, n_pcs: int | None = 20, seed: int = 0) -> np.ndarray:
    """What the mixture clusters: the embedding's first ``n_pcs`` PCs (float64, (n_spots, n_pcs); the embedding
    itself when ``n_pcs`` is null or not smaller than its width)."""
    from sklearn.decomposition import PCA

    Z = np.asarray(embedding, dtype=np.float64)
    n_pcs = min(int(n_pcs), Z.shape[0]) if n_pcs else None   # a tiny slide has fewer spots than PCs
    if n_pcs and n_pcs < Z.shape[1]:
        Z = PCA(n_components=n_pcs, random_state=seed).fit_transform(Z)
    return Z


def _mixture(n_clusters: int, covariance: str, seed: int, n_init: int):
    from sklearn.mixture import GaussianMixture

    check_covariance(covariance)
    return GaussianMixture(n_components=int(n_clusters), covariance_type=covariance, random_state=seed,
                           n_init=int(n_init), reg_covar=1e-5, max_iter=300)


def gaussian_mixture_labels(embedding: np.ndarray, n_clusters: int, n_pcs: int | None = 20,
                            covariance: str = "tied", seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster spots by a Gaussian mixture on the first ``n_pcs`` PCs of the embedding.

    ``covariance='tied'`` is mclust's EEE model (one shared full covariance). ``n_init`` k-means
    initialisations (seeded) are fitted and the one with the highest likelihood is kept, a
    label-free choice that makes the result far less dependent on the seed.
    """
    return gaussian_mixture_fit(embedding, n_clusters, n_pcs, covariance, seed, n_init)[0]


def gaussian_mixture_fit(embedding: np.ndarray, n_clusters: int, n_pcs: int | None = 20, covariance: str = "tied",
                         seed: int = 0, n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gaussian_mixture_labels`' labels (n,) and each spot's uncertainty (n,) float32, mclust's: 1 - the
    fitted mixture's posterior probability of the spot's label (0: the spot surely belongs to its cluster; at most
    1 - 1/n_clusters, an even split). The same fit: the labels are its posterior's argmax."""
    Z = mixture_input(embedding, n_pcs, seed)
    mixture = _mixture(n_clusters, covariance, seed, n_init)
    labels = mixture.fit_predict(Z)
    posterior = mixture.predict_proba(Z)
    return labels, (1.0 - posterior[np.arange(len(labels)), labels]).astype(np.float32)


STABILITY_MAX_SPOTS = 4000     # spots per resampled fit at most, so that the cost stops growing with the slide


def mixture_stability(embedding: np.ndarray, n_clusters: int, n_pcs: int | None = 20, covariance: str = "tied",
                      seed: int = 0, n_init: int = 10, n_resamples: int = 5, fraction: float = 0.8,
                      max_spots: int = STABILITY_MAX_SPOTS) -> tuple:
    """How reproducible :func:`gaussian_mixture_labels`' clustering into ``n_clusters`` is, without labels: the
    resampling stability of Ben-Hur et al. (2002) and Lange et al. (2004). The same mixture (PCs, covariance,
    ``n_init``) is fitted on ``n_resamples`` random subsets of ``fraction`` of the spots, at most ``max_spots`` of
    them (so that the cost stops growing with the slide: a Visium HD slide has 20,000 bins or more), seeded by
    ``seed``, each fit its own seed; each fit labels every spot, and the result is the mean and standard deviation of
    the adjusted Rand index over every pair of these labellings (1: the same partition every time; ~0: no more
    alike than chance, at any number of clusters). ``embedding``: (n_spots, d). Returns (mean, sd), floats."""
    from itertools import combinations

    from sklearn.metrics import adjusted_rand_score

    if n_resamples < 2:
        raise InputError(f"{n_resamples} resamples: the stability compares pairs of fits, so at least 2 are needed "
                         "(cluster.sweep_resamples; 0 turns the stability off).")
    Z = mixture_input(embedding, n_pcs, seed)
    n = Z.shape[0]
    size = max(int(n_clusters), min(int(round(fraction * n)), int(max_spots)))
    rng = np.random.default_rng(seed)
    labellings = []
    for r in range(int(n_resamples)):
        rows = np.sort(rng.choice(n, size=min(size, n), replace=False))
        labellings.append(_mixture(n_clusters, covariance, seed + 1 + r, n_init).fit(Z[rows]).predict(Z))
    aris = [adjusted_rand_score(a, b) for a, b in combinations(labellings, 2)]
    return float(np.mean(aris)), float(np.std(aris))


def smooth_labels(labels: np.ndarray, graph: sp.spmatrix) -> np.ndarray:
    """One pass of neighbour-majority smoothing over a spatial graph (SpaGCN-style refinement).

    A spot takes the most common label among its neighbours when fewer than half of its
    neighbours share its own label and that most common label covers more than half of them.
    """
    labels = np.asarray(labels)
    G = sp.csr_matrix(graph)
    uniq, codes = np.unique(labels, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), len(uniq)))
    counts = np.asarray((G @ onehot).todense())
    deg = counts.sum(1)
    own = counts[np.arange(len(codes)), codes]
    best = counts.argmax(1)
    change = (deg > 0) & (own < deg / 2) & (counts.max(1) > deg / 2)
    out = codes.copy()
    out[change] = best[change]
    return uniq[out]
