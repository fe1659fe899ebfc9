"""Neighbour graphs as small builder classes; every graph is a sparse CSR matrix.

``RadiusGraph`` (spots within a distance; :func:`spot_neighbours` measures it on the array's sites) and
``KNNGraph`` (k nearest by a feature metric) return symmetric binary adjacency without self-loops;
:func:`nearest_with_ties` a directed k-nearest graph that keeps ties; :func:`store_graph` is the one place
that writes a graph into an AnnData (``obsp[key]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors


def _symmetric_binary(rows, cols, n) -> sp.csr_matrix:
    keep = rows != cols
    A = sp.csr_matrix((np.ones(keep.sum(), np.float32), (rows[keep], cols[keep])), shape=(n, n))
    A = A.maximum(A.T).tocsr()
    A.data[:] = 1.0
    return A


@dataclass
class RadiusGraph:
    """Edges between points closer than ``radius`` (same units as the coordinates)."""
    radius: float

    def build(self, coords: np.ndarray) -> sp.csr_matrix:
        nn = NearestNeighbors(radius=self.radius).fit(coords)
        G = nn.radius_neighbors_graph(coords, mode="connectivity")
        r, c = G.nonzero()
        return _symmetric_binary(r, c, len(coords))


def spot_neighbours(xy: np.ndarray, radius: float, array_coords=None) -> sp.csr_matrix:
    """:class:`RadiusGraph` of spots within ``radius`` (the units of ``xy`` (n, 2)) of each other, measured between
    their array sites where ``array_coords`` (n, 2) (col, row) are a lattice of ``xy``
    (:func:`data.lattice.lattice_sites`), else between the positions ``xy``: the neighbours of a spot on a printed
    array do not depend on how far its detected position strays from the grid (DEVLOG 342)."""
    from data.lattice import lattice_sites

    sites = lattice_sites(array_coords, xy)
    return RadiusGraph(radius).build(np.asarray(xy, float) if sites is None else sites)


KNN_WORKING_MB = 128   # sklearn working memory for a brute-force kNN query (row chunks of the distances)


@dataclass
class KNNGraph:
    """Edges to the ``k`` nearest neighbours (symmetrised by union) under ``metric``."""
    k: int = 15
    metric: str = "cosine"

    def build(self, X: np.ndarray) -> sp.csr_matrix:
        import sklearn

        n = len(X)
        k = min(self.k, n - 1)
        nn = NearestNeighbors(n_neighbors=k + 1, metric=self.metric).fit(X)
        # cosine has no tree: brute force computes distances in row chunks of sklearn's working
        # memory (1 GB by default, 1.6 GB of RSS at 14k spots); smaller chunks give the same
        # neighbours, faster (cache) and with 0.2 GB
        with sklearn.config_context(working_memory=KNN_WORKING_MB):
            idx = nn.kneighbors(X, return_distance=False)
        rows = np.repeat(np.arange(n), k + 1)
        return _symmetric_binary(rows, idx.ravel(), n)


TIE_TOLERANCE = 1e-6     # relative: distances this close to the k-th count as tied with it (float rounding)


def nearest_with_ties(xy: np.ndarray, k: int) -> sp.csr_matrix:
    """Directed, not symmetrised: (n, n) float32 0/1, row i marking the points of ``xy`` (n, 2) no farther from
    point i than its k-th nearest other point (times 1 + :data:`TIE_TOLERANCE`), itself left out: the k nearest
    and every point tied with the k-th, whatever order the search found them in. k < 1 marks none."""
    n = len(xy)
    if k < 1:
        return sp.csr_matrix((n, n), dtype=np.float32)
    search = NearestNeighbors().fit(xy)
    m = min(n - 1, 2 * k + 8)                   # enough for any lattice's tied ring, else widened below
    while True:
        # queried with no points, sklearn leaves each point out of its own neighbours
        dist, idx = search.kneighbors(n_neighbors=m)
        keep = dist <= dist[:, k - 1:k] * (1 + TIE_TOLERANCE)
        if m == n - 1 or not keep[:, -1].any():
            break
        m = min(n - 1, 2 * m)
    rows = np.repeat(np.arange(n), keep.sum(1))
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, idx[keep])), shape=(n, n))


def within_groups(groups, build) -> sp.csr_matrix:
    """One graph per group of points, none between groups: ``build(group, rows)`` gives the graph of the points at
    integer positions ``rows`` (the group's, in order), and each is placed at those rows and columns of the
    (n, n) result. ``groups``: (n,) labels (each spot's section, for a joint run's spatial graph)."""
    groups = np.asarray(groups)
    blocks = []
    for group in dict.fromkeys(groups.tolist()):
        rows = np.flatnonzero(groups == group)
        A = sp.coo_matrix(build(group, rows))
        blocks.append((rows[A.row], rows[A.col], A.data))
    r, c, v = (np.concatenate(parts) for parts in zip(*blocks))
    return sp.csr_matrix((v, (r, c)), shape=(len(groups), len(groups)))


def median_nearest_distance(xy: np.ndarray) -> float | None:
    """Median distance from each point to its nearest other point (the spacing of spots on a lattice,
    or of a grid), in the units of ``xy``; None for fewer than two points or all at one place."""
    xy = np.asarray(xy, float)
    if len(xy) < 2:
        return None
    d, _ = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
    step = float(np.median(d[:, 1]))
    return step if step > 0 else None


def store_graph(adata, key: str, A: sp.spmatrix) -> None:
    """Write graph ``A`` to ``adata.obsp[key]`` (the only writer of graphs into an AnnData)."""
    adata.obsp[key] = sp.csr_matrix(A)
