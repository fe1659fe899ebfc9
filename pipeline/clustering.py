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


def gaussian_mixture_labels(embedding: np.ndarray, n_clusters: int, n_pcs: int | None = 20,
                            covariance: str = "tied", seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster spots by a Gaussian mixture on the first ``n_pcs`` PCs of the embedding.

    ``covariance='tied'`` is mclust's EEE model (one shared full covariance). ``n_init`` k-means
    initialisations (seeded) are fitted and the one with the highest likelihood is kept, a
    label-free choice that makes the result far less dependent on the seed.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    Z = np.asarray(embedding, dtype=np.float64)
    n_pcs = min(int(n_pcs), Z.shape[0]) if n_pcs else None   # a tiny slide has fewer spots than PCs
    if n_pcs and n_pcs < Z.shape[1]:
        Z = PCA(n_components=n_pcs, random_state=seed).fit_transform(Z)
    check_covariance(covariance)
    gmm = GaussianMixture(n_components=int(n_clusters), covariance_type=covariance, random_state=seed,
                          n_init=int(n_init), reg_covar=1e-5, max_iter=300)
    return gmm.fit_predict(Z)


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
