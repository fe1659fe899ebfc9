"""Array (grid) coordinates of spots recovered from their pixel positions.

Space Ranger folders and legacy ST tables give every spot its array position (``array_row``,
``array_col``); an ``.h5ad`` from another tool may hold only ``obsm['spatial']``. The stages that
work on the grid (stage 4's 2x2 pooling, the spot spacing) then need the array back. Spots of a
Visium slide lie on a hexagonal lattice (each spot has 6 neighbours at one spacing; Visium numbers
the columns of a row in steps of 2 and offsets alternate rows by one, so ``row + col`` is even) and
those of a legacy ST array on a square one (4 neighbours); the lattice may be rotated and sheared a
little in the image.

:func:`infer_array_coordinates` fits that lattice: the spacing s = median nearest-neighbour
distance; the lattice kind from the number of neighbours within 0.75-1.25 s (6: hexagonal, 4:
square); its orientation from the neighbour directions (circular mean of 6 theta resp. 4 theta),
which gives a first guess of the lattice's step vectors. Each pair of a spot and one of its 6 nearest
neighbours is named the lattice step whose vector is nearest (within 0.3 s, else it is no step), and
the step vectors are refitted by least squares to the pairs so named, three times (so a rectangular
or sheared array is followed too). Indices are then propagated along the steps from one spot
(breadth first), so a slow drift of the spacing across the array does not accumulate into rounding
errors. Separate tissue pieces are placed through an affine map index ->
pixel fitted on the largest. The result is accepted only when every step agrees with the indices,
every spot has its own index, and 99% of the spots lie within ``max_residual`` spacings of the
fitted lattice; otherwise (a random or irregular layout: Slide-seq beads, cells, bins) None.

:func:`lattice_sites` places each spot at its array site (the same affine map and residual rule), so that
stages 2 and 3 decide which spots are neighbours on the printed grid rather than between detected positions
that stray from it (legacy ST; DEVLOG 342).
"""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

# lattice steps (col, row) by direction, counter-clockwise from the lattice's first axis
HEX_STEPS = np.array([[2, 0], [1, 1], [-1, 1], [-2, 0], [-1, -1], [1, -1]], float)
SQUARE_STEPS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], float)


def is_hex_grid(array) -> bool:
    """Visium's hexagonal array indices (n, 2) (col, row): (col + row) is always even."""
    if array is None or len(array) == 0:
        return False
    array = np.asarray(array)
    return bool(np.all((array[:, 0] + array[:, 1]) % 2 == 0))


def infer_array_coordinates(coords_px: np.ndarray, max_residual: float = 0.35) -> tuple[np.ndarray, str] | None:
    """(array (n, 2) integer (col, row), 'hex' | 'square') for spots on a lattice, else None.

    coords_px: (n, 2) spot centres (x, y) in any pixel units. Hexagonal arrays follow Visium's
    numbering (columns of a row two apart, ``row + col`` even), square ones count columns and rows
    one apart; indices start at 0 (a hexagonal column at 0 or 1, keeping the parity). ``max_residual``:
    largest distance (in spacings) from a spot to its fitted lattice point for 99% of the spots.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    xy = np.asarray(coords_px, float)
    n = len(xy)
    if n < 7 or not np.isfinite(xy).all():
        return None
    d, idx = NearestNeighbors(n_neighbors=7).fit(xy).kneighbors(xy)
    s = float(np.median(d[:, 1]))
    if not s > 0:
        return None
    near = (d[:, 1:] > 0.75 * s) & (d[:, 1:] < 1.25 * s)
    kind = "hex" if np.median(near.sum(1)) >= 5 else "square"
    steps = HEX_STEPS if kind == "hex" else SQUARE_STEPS
    fold = len(steps)
    theta = np.arctan2(*(xy[idx[:, 1:]] - xy[:, None, :])[near][:, ::-1].T)
    phi = np.arctan2(np.sin(fold * theta).mean(), np.cos(fold * theta).mean()) / fold
    first = s * np.array([np.cos(phi), np.sin(phi)])                  # pixel vector of steps[0]
    second = s * np.array([np.cos(phi + 2 * np.pi / fold), np.sin(phi + 2 * np.pi / fold)])
    M = np.linalg.solve(steps[:2], np.array([first, second])).T     # (2, 2): index step -> pixels
    src = np.repeat(np.arange(n), 6)
    dst = idx[:, 1:].ravel()
    vec = xy[dst] - xy[src]
    for _ in range(3):        # assign each neighbour pair to its nearest step; refit the step vectors
        err = np.linalg.norm(vec[:, None, :] - (steps @ M.T)[None], axis=2)
        step = err.argmin(1)
        ok = err[np.arange(len(vec)), step] < 0.3 * s
        if ok.sum() < n:       # fewer steps than spots: no lattice to speak of
            return None
        M = np.linalg.lstsq(steps[step[ok]], vec[ok], rcond=None)[0].T
    src, dst, delta = src[ok], dst[ok], steps[step[ok]]               # index step src -> dst
    graph = sp.csr_matrix((np.arange(1, len(src) + 1), (src, dst)), shape=(n, n))
    n_parts, part = connected_components(graph, directed=False)
    index = np.zeros((n, 2), float)
    undirected = (graph + graph.T).tocsr()
    for c in range(n_parts):
        root = int(np.flatnonzero(part == c)[0])
        order, pred = breadth_first_order(undirected, root, directed=False)
        for node in order[1:]:
            p = pred[node]
            e = graph[p, node]
            index[node] = index[p] + (delta[e - 1] if e else -delta[graph[node, p] - 1])
    if np.any(index[dst] - index[src] != delta):            # a step that disagrees: not a lattice
        return None
    sizes = np.bincount(part)
    main = part == np.argmax(sizes)
    coef = fit_lattice_affine(index[main], xy[main])
    if coef is None:
        return None
    for c in np.flatnonzero(np.arange(n_parts) != np.argmax(sizes)):
        members = part == c
        frac = np.linalg.solve(coef[:2].T, (xy[members] - coef[2]).T).T
        mean = (frac - index[members]).mean(0)              # the piece's offset, in index units
        base = np.floor(mean)
        shifts = np.array([base + [a, b] for a in (0, 1) for b in (0, 1)])
        if kind == "hex":          # every piece starts at (0, 0): an even shift keeps row + col even
            shifts = shifts[shifts.sum(1) % 2 == 0]
        index[members] += shifts[np.argmin(np.linalg.norm((shifts - mean) @ coef[:2], axis=1))]
    coef = fit_lattice_affine(index, xy)
    if coef is None or len(np.unique(index, axis=0)) < n:
        return None
    residual = np.linalg.norm(np.c_[index, np.ones(n)] @ coef - xy, axis=1) / s
    if np.quantile(residual, 0.99) > max_residual:
        return None
    index -= index.min(0)
    if kind == "hex" and np.any((index[:, 0] + index[:, 1]) % 2):
        index[:, 0] += 1
    return index.astype(int), kind


def fit_lattice_affine(index: np.ndarray, xy: np.ndarray) -> np.ndarray | None:
    """Least-squares (3, 2) map [col, row, 1] -> (x, y); None when the indices span no plane.

    index: (n, 2) array coordinates (col, row); xy: (n, 2) pixel positions of the same spots."""
    coef, *_ = np.linalg.lstsq(np.c_[index, np.ones(len(xy))], xy, rcond=None)
    return None if abs(np.linalg.det(coef[:2])) < 1e-9 else coef


LATTICE_MAX_RESIDUAL = 0.35   # spacings: 99% of the spots within this of their array sites, or no lattice


def lattice_sites(index, xy: np.ndarray, max_residual: float = LATTICE_MAX_RESIDUAL) -> np.ndarray | None:
    """Each spot's site on its printed array, (n, 2) in the units of ``xy``: its array coordinates ``index`` (n, 2)
    (col, row) through the affine map fitted to all spots (:func:`fit_lattice_affine`). None when there are no
    indices, they span no plane, or they are not a lattice of these positions: 99% of the spots must lie within
    ``max_residual`` spacings of their sites (the rule :func:`infer_array_coordinates` applies; spacing: the median
    distance between neighbouring sites). A legacy ST array's detected spot positions stray from the printed grid
    by up to a third of a spacing, so distances between sites, not between detected positions, say which spots
    are neighbours (DEVLOG 342); Visium's positions are the fitted lattice already."""
    if index is None or len(index) < 3:
        return None
    index = np.asarray(index, float)
    xy = np.asarray(xy, float)
    if not (np.isfinite(index).all() and np.isfinite(xy).all()):
        return None
    coef = fit_lattice_affine(index, xy)
    if coef is None:
        return None
    sites = np.c_[index, np.ones(len(xy))] @ coef
    spacing = float(np.median(NearestNeighbors(n_neighbors=2).fit(sites).kneighbors(sites)[0][:, 1]))
    if not spacing > 0 or np.quantile(np.linalg.norm(sites - xy, axis=1), 0.99) > max_residual * spacing:
        return None
    return sites


def in_spot_cells(index: np.ndarray, xy: np.ndarray, points_xy: np.ndarray) -> np.ndarray | None:
    """For each of ``points_xy`` (m, 2) px, whether the array site nearest to it holds one of the spots.

    The lattice is the one the spots ``index`` (n, 2) (col, row) at ``xy`` (n, 2) px lie on: hexagonal
    when every ``col + row`` is even (Visium numbering), square otherwise; its sites are placed by the
    affine map fitted to the spots (:func:`fit_lattice_affine`), so that a site need not hold a spot.
    So the points kept are those in the area the spots' cells tile (a hexagon per Visium spot, a square
    per legacy ST spot). A point on the border of two cells (an even grid aligned with the spots puts
    points there) counts as in a spot's cell when either of them is. Returns an (m,) bool mask, or
    None when the spots span no plane.
    """
    coef = fit_lattice_affine(index, xy)
    if coef is None:
        return None
    index = np.asarray(index, int)
    hexagonal = bool(np.all((index[:, 0] + index[:, 1]) % 2 == 0))
    cont = np.linalg.solve(coef[:2].T, (np.asarray(points_xy, float) - coef[2]).T).T   # (col, row), real
    offsets = np.array([(dc, dr) for dc in (-1, 0, 1, 2) for dr in (0, 1)])   # around the point: holds its nearest site
    cand = np.floor(cont).astype(int)[:, None, :] + offsets[None]              # (m, 8, 2)
    d = np.linalg.norm((cand - cont[:, None, :]) @ coef[:2], axis=2)
    if hexagonal:
        d[(cand[..., 0] + cand[..., 1]) % 2 == 1] = np.inf                     # not a Visium site
    lo, span = index.min(0), index.max(0) - index.min(0) + 1
    held = np.zeros(span, bool)
    held[tuple((index - lo).T)] = True
    inside = np.all((cand >= lo) & (cand < lo + span), axis=2)
    is_held = np.zeros(d.shape, bool)
    is_held[inside] = held[tuple((cand[inside] - lo).T)]
    tol = 1e-3 * np.linalg.norm(coef[:2], axis=1).max()
    return np.where(is_held, d, np.inf).min(1) <= d.min(1) + tol
