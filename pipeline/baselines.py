"""Baselines the benchmarks compare against (same preprocessing as the pipeline).

* ``pca_gmm``: PCA of the log-normalised HVGs + Gaussian mixture.
* ``smoothed_pca_gmm``: the same PCs averaged over each spot and its ``k`` nearest spots first.
"""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from data import keys
from pipeline.clustering import gaussian_mixture_labels
from pipeline.preprocess import pca


def knn_average(values: np.ndarray, coords: np.ndarray, k: int = 6, include_self: bool = True) -> np.ndarray:
    """Mean of each spot's ``k`` nearest spots (by coordinates), with the spot itself if asked."""
    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    idx = nn.kneighbors(coords, return_distance=False)
    idx = idx if include_self else idx[:, 1:]
    return np.asarray(values)[idx].mean(1)


def pca_gmm(adata, n_clusters: int, n_pcs: int = 30, seed: int = 0, covariance: str = "tied") -> np.ndarray:
    """Labels from a Gaussian mixture on PCs of ``layers['lognorm']``."""
    z = pca(adata.layers[keys.LOGNORM], n_pcs, seed=seed)
    return gaussian_mixture_labels(z, n_clusters, None, covariance, seed)


def smoothed_pca_gmm(adata, n_clusters: int, n_pcs: int = 30, k: int = 6, seed: int = 0,
                     covariance: str = "tied") -> np.ndarray:
    """Labels from a Gaussian mixture on PCs averaged over each spot and its ``k`` nearest spots."""
    z = pca(adata.layers[keys.LOGNORM], n_pcs, seed=seed)
    return gaussian_mixture_labels(knn_average(z, adata.obsm[keys.SPATIAL], k), n_clusters, None, covariance, seed)
