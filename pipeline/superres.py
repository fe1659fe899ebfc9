"""Stage 4 library: super-resolution problems, evaluation protocols, kernel baselines, the output grid.

Vocabulary
    *context*  the locations whose expression a model may see (visible spots, or super-spots);
    *queries*  the locations it must predict (hidden spots, original spots, or grid points).
Expression is log1p(CP10k) throughout; coordinates are full-resolution pixels (x, y).

Self-supervised training pairs (nothing outside the context is ever used):
    ``loo``       for each context location, the kernel estimate from the *other* context
                  locations -> its own expression (used when queries lie between context spots);
    ``coarsen``   the context is pooled 2x2 once more; kernel estimates from that coarser map at
                  the context locations -> their expression (used when queries are finer than the
                  context: pooling protocol and the production grid).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from data import keys
from data.errors import InputError
from data.lattice import is_hex_grid
from pipeline.preprocess import GENE_CHUNK, lognormalize
from pipeline.superres_patches import PatchCandidate, PatchCandidateSettings, patch_candidate_wanted

log = logging.getLogger("stpipe")

BANDWIDTHS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)   # candidate Gaussian widths, in context spacings
LOWRES_SCALES = (0.7, 1.4, 2.8, 5.6)   # TriHRGE also sees kernel estimates at these widths (context spacings)
N_CONTEXT_PCS = 16                      # ... each projected on this many principal axes of the context


# ------------------------------------------------------------------------------------------
# expression on a set of locations
# ------------------------------------------------------------------------------------------
@dataclass
class Locations:
    """Expression at a set of locations. xy: (n, 2) full-res px; expr: (n, g) log1p(CP10k) or None;
    array: (n, 2) integer (col, row) grid coordinates or None; spacing: centre-to-centre px."""
    xy: np.ndarray
    expr: np.ndarray | None
    spacing: float
    array: np.ndarray | None = None
    counts: sp.csr_matrix | None = None
    totals: np.ndarray | None = None
    index: np.ndarray = field(default=None)  # indices into the original spots (for leak checks)


def pool_2x2(loc: Locations) -> tuple[Locations, np.ndarray]:
    """Merge locations 2x2 on their array grid (sum counts, mean coordinates).

    Visium hex grid: groups (row // 2, col // 4) hold 2 spots in each of 2 rows; square grids
    (legacy ST, and super-spots themselves, re-indexed): (row // 2, col // 2). Returns the pooled
    locations (array = group coordinates, spacing doubled) and the group of every input location.
    """
    if loc.array is None or loc.counts is None:
        raise InputError("2x2 pooling (stage 4's self-supervised training pairs, and eval.protocol=pooling) needs "
                         "each spot's raw counts and array position, obs['array_row'/'array_col']: Space Ranger's "
                         "spot and bin folders and legacy ST tables give them; an .h5ad without them gets them only "
                         "when its spots lie on a regular Visium or ST lattice, which these do not. Cells (Space "
                         "Ranger's segmented_outputs/, a cell-based SpatialData store) lie on no lattice: for a "
                         "Visium HD run, super-resolve its bins (data.path=<the run's outs/>, data.bin_um).")
    col, row = loc.array[:, 0], loc.array[:, 1]
    gcol = col // 4 if is_hex_grid(loc.array) else col // 2
    grow = row // 2
    key = pd.Series(list(zip(gcol, grow)))
    codes, uniques = pd.factorize(key)
    n = len(uniques)
    M = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    counts = sp.csr_matrix(M @ loc.counts)
    totals = M @ loc.totals
    xy = (M @ loc.xy) / np.asarray(M.sum(1))
    expr = lognormalize(counts, totals) if loc.expr is not None else None
    arr = np.array([list(u) for u in uniques], dtype=int)
    return Locations(xy=xy, expr=expr, spacing=2 * loc.spacing, array=arr, counts=counts, totals=totals,
                     index=None), codes


# ------------------------------------------------------------------------------------------
# kernel estimates (the low-resolution input and the baselines)
# ------------------------------------------------------------------------------------------
def kernel_weights(src_xy, dst_xy, bandwidth_px: float, exclude_self: bool = False, k: int = 150,
                   src_colour=None, dst_colour=None, colour_bw: float | None = None) -> sp.csr_matrix:
    """Row-normalised Gaussian weights from ``k`` nearest sources to each destination.

    w_ij = exp(-d_ij^2 / 2 h^2) [x exp(-|c_i - c_j|^2 / 2 h_c^2) with colours]. With
    ``exclude_self`` (src is dst), a location gets no weight from itself (leave-one-out).
    """
    d, idx = neighbours(src_xy, dst_xy, k, exclude_self)
    dc = None
    if src_colour is not None and colour_bw:
        dc = ((dst_colour[:, None, :] - src_colour[idx]) ** 2).sum(-1)
    return weights_from_neighbours(d, idx, len(src_xy), bandwidth_px, dc, colour_bw, exclude_self)


def neighbours(src_xy, dst_xy, k: int = 150, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (n_dst, k'), of the ``k`` nearest sources (one more with
    ``exclude_self``, whose own entry :func:`weights_from_neighbours` then zeroes)."""
    k = int(min(k + int(exclude_self), len(src_xy)))
    return NearestNeighbors(n_neighbors=k).fit(src_xy).kneighbors(dst_xy)


def weights_from_neighbours(d, idx, n_src: int, bandwidth_px: float, guide_d2=None, guide_bw=None,
                            exclude_self: bool = False) -> sp.csr_matrix:
    """Row-normalised (n_dst, n_src) weights exp(-d^2 / 2 h^2) [x exp(-guide_d2 / 2 guide_bw^2)] on
    the neighbours of :func:`neighbours`; with ``exclude_self`` destination i gives source i no weight."""
    own = idx == np.arange(len(d))[:, None] if exclude_self else None
    if guide_d2 is not None and guide_bw:
        e = -d ** 2 / (2 * bandwidth_px ** 2) - guide_d2 / (2 * guide_bw ** 2)
        if own is not None:
            e[own] = -np.inf
        w = np.exp(e - e.max(1, keepdims=True))    # a row's largest weight is 1: no row underflows
    else:   # spatial only: the form every earlier kernel row was measured with (no underflow at these widths)
        w = np.exp(-d ** 2 / (2 * bandwidth_px ** 2))
        if own is not None:
            w[own] = 0.0
    w = w + 1e-300
    w /= w.sum(1, keepdims=True)
    rows = np.repeat(np.arange(len(d)), idx.shape[1])
    return sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(len(d), n_src))


def loo_bandwidth(ctx: Locations, candidates=BANDWIDTHS, colour=None, colour_candidates=None) -> tuple:
    """Bandwidth (px) [and colour bandwidth] minimising leave-one-out MSE on the context alone."""
    best = (np.inf, None, None)
    for b in candidates:
        for cb in (colour_candidates or [None]):
            W = kernel_weights(ctx.xy, ctx.xy, b * ctx.spacing, exclude_self=True,
                               src_colour=colour, dst_colour=colour, colour_bw=cb)
            err = float(np.mean((W @ ctx.expr - ctx.expr) ** 2))
            if err < best[0]:
                best = (err, b * ctx.spacing, cb)
    return best[1], best[2]


def kernel_predict(ctx: Locations, dst_xy, bandwidth_px: float, exclude_self: bool = False,
                   ctx_colour=None, dst_colour=None, colour_bw=None):
    """Gaussian-kernel estimate of the context's expression at ``dst_xy`` ((n, g))."""
    W = kernel_weights(ctx.xy, dst_xy, bandwidth_px, exclude_self, src_colour=ctx_colour,
                       dst_colour=dst_colour, colour_bw=colour_bw)
    return np.asarray(W @ ctx.expr, dtype=np.float32)


PROJECTION_RANKS = (2, 4, 8, 16, 32, 64)   # candidate ranks of the low-rank kernel estimate


def _loo_rank(loo_z: np.ndarray, z: np.ndarray, vt: np.ndarray, ranks=PROJECTION_RANKS) -> tuple:
    """(rank or None for no projection, its LOO MSE): the projection of the leave-one-out estimate
    ``loo_z`` (n, g) on the top axes ``vt`` that best matches ``z``, in standardised units."""
    errors = {None: float(np.mean((loo_z - z) ** 2))}
    for k in ranks:
        if k < min(z.shape):
            v = vt[:k].T
            errors[k] = float(np.mean((loo_z @ v @ v.T - z) ** 2))
    k = min(errors, key=errors.get)
    return k, errors[k]


def _project_rank(est: np.ndarray, std: tuple, vt: np.ndarray, k: int | None) -> np.ndarray:
    """``est`` (n, g, log1p(CP10k)) projected on the top ``k`` standardised axes ``vt`` (None: unchanged)."""
    if k is None:
        return np.asarray(est, np.float32)
    mean, sd = std
    v = vt[:k].T
    return (((est - mean) / sd) @ v @ v.T * sd + mean).astype(np.float32)


def low_rank_kernel(ctx: Locations, dst_xy, bandwidth_px: float, std: tuple, exclude_self: bool = False,
                    ranks=PROJECTION_RANKS) -> tuple[np.ndarray, int]:
    """Gaussian-kernel estimate at ``dst_xy`` projected on the context's top ``k`` gene axes
    (principal axes of its expression standardised by ``std`` = (mean, sd)); returns (the estimate
    (n, g) in log1p(CP10k), k).

    The kernel averages a few noisy neighbours gene by gene; the projection keeps only the
    directions along which the context's genes co-vary, so each gene borrows strength from the
    genes that move with it. ``k`` (or no projection) is chosen by the leave-one-out error of the
    projected kernel on the context itself, so nothing outside the context is used.
    """
    mean, sd = std
    z = (ctx.expr - mean) / sd
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    loo = (kernel_predict(ctx, ctx.xy, bandwidth_px, exclude_self=True) - mean) / sd
    k, _ = _loo_rank(loo, z, vt, ranks)
    est = kernel_predict(ctx, dst_xy, bandwidth_px, exclude_self=exclude_self)
    return _project_rank(est, std, vt, k), (min(z.shape) if k is None else k)


GUIDE_PCS = (2, 4, 8)                              # dimensions of the expression guide (context principal axes)
GUIDE_FIELD_WIDTHS = (0.7, 1.0, 1.4)               # Gaussian width of the field the guide is read from (spacings)
GUIDED_BANDWIDTHS = (1.4, 2.0, 2.8, 4.0, 5.6, 8.0)  # spatial widths tried with a guide (context spacings)
GUIDE_WIDTHS = (4.0, 2.0, 1.0, 0.5)                # guide kernel widths, in units of the guide's own noise
GUIDED_NEIGHBOURS = 150                            # context locations a guided estimate may draw on


@dataclass(frozen=True)
class GuidedKernel:
    """Settings of :func:`guided_kernel`, all chosen by leave-one-out on the context."""
    bandwidth: float               # spatial Gaussian width, context spacings
    guide_pcs: int | None          # guide dimension; None: no guide (the plain kernel)
    guide_field: float | None      # width of the kernel field the guide is read from, context spacings
    guide_width: float | None      # guide kernel width, in units of guide_noise
    guide_noise: float | None      # the guide's own noise on the context (see _guide_distances)
    rank: int | None               # rank of the final projection (None: not projected)
    loo_mse: float                 # its leave-one-out MSE on the context, standardised units


def _guide_distances(ctx: Locations, dst_xy, z_axes: np.ndarray, field_px: float, idx: np.ndarray,
                     exclude_self: bool) -> tuple[np.ndarray, float]:
    """Squared guide distances (n_dst, k) between each destination and its neighbours ``idx``, and
    the guide's own noise ``s``.

    The guide of a location is the Gaussian field (width ``field_px``) of ``z_axes`` (n_ctx, m: the
    context's standardised expression on its top axes) over its ``GUIDED_NEIGHBOURS`` nearest
    context locations. With ``exclude_self`` the destinations are the context locations and no
    guide involved in destination j's weights contains j's own expression: neither j's guide nor
    those of its neighbours (each has j's term removed), so a training pair is estimated exactly
    as a hidden spot is. ``s`` is the RMS change of a context location's guide when its own term
    is removed.
    """
    n = len(ctx.xy)
    kd, kidx = neighbours(ctx.xy, ctx.xy, GUIDED_NEIGHBOURS)            # includes the location itself
    K = sp.csr_matrix((np.exp(-kd ** 2 / (2 * field_px ** 2)).ravel(),
                       (np.repeat(np.arange(n), kidx.shape[1]), kidx.ravel())), shape=(n, n))
    S = np.asarray(K.sum(1)).ravel()                                   # (n,) field mass at each location
    T = np.asarray(K @ z_axes)                                         # (n, m) unnormalised field
    own = K.diagonal()
    g_full = T / S[:, None]
    g_loo = (T - own[:, None] * z_axes) / np.maximum(S - own, 1e-300)[:, None]
    noise = float(np.sqrt(np.mean(((g_loo - g_full) ** 2).sum(1)))) + 1e-12
    if exclude_self:
        j = np.repeat(np.arange(n), idx.shape[1])
        kij = np.asarray(K[idx.ravel(), j]).reshape(idx.shape)          # weight of target j in source i's field
        g_src = (T[idx] - kij[..., None] * z_axes[:, None, :]) / np.maximum(S[idx] - kij, 1e-300)[..., None]
        g_dst = g_loo
    else:
        qd, qidx = neighbours(ctx.xy, dst_xy, GUIDED_NEIGHBOURS)
        Q = np.exp(-qd ** 2 / (2 * field_px ** 2))
        g_dst = np.einsum("nk,nkm->nm", Q, z_axes[qidx]) / np.maximum(Q.sum(1), 1e-300)[:, None]
        g_src = g_full[idx]
    return ((g_dst[:, None, :] - g_src) ** 2).sum(-1), noise


def fit_guided_kernel(ctx: Locations, std: tuple) -> GuidedKernel:
    """Choose :func:`guided_kernel`'s settings by leave-one-out MSE on the context alone: every
    combination of ``GUIDE_PCS`` x ``GUIDE_FIELD_WIDTHS`` x ``GUIDED_BANDWIDTHS`` x ``GUIDE_WIDTHS``
    and the unguided kernel at each of ``BANDWIDTHS`` + ``GUIDED_BANDWIDTHS``; then the rank."""
    z = ((ctx.expr - std[0]) / std[1]).astype(np.float32)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    d, idx = neighbours(ctx.xy, ctx.xy, GUIDED_NEIGHBOURS, exclude_self=True)
    n = len(ctx.xy)
    best = (np.inf, None, None)

    def consider(settings, W):
        nonlocal best
        err = float(np.mean((W @ z - z) ** 2))
        if err < best[0]:
            best = (err, settings, W)

    for b in sorted(set(BANDWIDTHS) | set(GUIDED_BANDWIDTHS)):
        consider((b, None, None, None, None), weights_from_neighbours(d, idx, n, b * ctx.spacing, exclude_self=True))
    for m in GUIDE_PCS:
        if m >= min(z.shape):
            continue
        for field_width in GUIDE_FIELD_WIDTHS:
            d2, noise = _guide_distances(ctx, ctx.xy, z @ vt[:m].T, field_width * ctx.spacing, idx, exclude_self=True)
            for b in GUIDED_BANDWIDTHS:
                for gw in GUIDE_WIDTHS:
                    consider((b, m, field_width, gw, noise),
                             weights_from_neighbours(d, idx, n, b * ctx.spacing, d2, gw * noise, exclude_self=True))
    _, (b, m, field, gw, noise), W = best
    rank, err = _loo_rank(W @ z, z, vt)
    return GuidedKernel(b, m, field, gw, noise, rank, err)


def guided_kernel(ctx: Locations, dst_xy, std: tuple, exclude_self: bool = False,
                  settings: GuidedKernel | None = None) -> tuple[np.ndarray, GuidedKernel]:
    """An expression-guided (joint bilateral) Gaussian kernel at ``dst_xy``, projected on the
    context's top gene axes; returns (estimate (n, g) in log1p(CP10k), the settings used).

    Each location gets a *guide*, g(x) = the context's Gaussian-kernel field at x (width
    ``guide_field`` spacings) of its expression standardised by ``std`` on its top ``guide_pcs``
    principal axes: a denoised summary of the tissue state around x, read from the context only.
    Context location j then weighs

        w(x, j) = exp(-|x - x_j|^2 / 2 h^2) exp(-|g(x) - g(x_j)|^2 / 2 (c s)^2),

    with ``h = bandwidth`` spacings, ``c = guide_width`` and ``s = guide_noise`` the guide's own
    noise on the context (see :func:`_guide_distances`). Neighbours in the same tissue state (a cortical layer, a bulb
    layer) thus count more than equally near ones across a boundary, which lets the kernel average
    more of them. The estimate is finally projected on the top ``rank`` gene axes as in
    :func:`low_rank_kernel`. With ``exclude_self`` (``dst_xy`` is the context) a location's own
    expression reaches neither its weights nor its guide. With ``settings`` None they are chosen
    by leave-one-out on the context (:func:`fit_guided_kernel`); when that prefers no guide, this
    is the low-rank kernel at the leave-one-out width.
    """
    settings = settings or fit_guided_kernel(ctx, std)
    _, _, vt = np.linalg.svd((ctx.expr - std[0]) / std[1], full_matrices=False)
    return _guided_estimate(ctx, dst_xy, std, vt, settings, exclude_self), settings


def _guided_estimate(ctx: Locations, dst_xy, std: tuple, vt: np.ndarray, settings: GuidedKernel,
                     exclude_self: bool) -> np.ndarray:
    """:func:`guided_kernel`'s estimate (n, g) with given principal axes ``vt`` of the standardised context."""
    z = (ctx.expr - std[0]) / std[1]
    dst_xy = np.asarray(dst_xy, float)
    d, idx = neighbours(ctx.xy, dst_xy, GUIDED_NEIGHBOURS, exclude_self=exclude_self)
    d2, gw = None, None
    if settings.guide_pcs is not None:
        d2, _ = _guide_distances(ctx, dst_xy, z @ vt[:settings.guide_pcs].T, settings.guide_field * ctx.spacing,
                                 idx, exclude_self)
        gw = settings.guide_width * settings.guide_noise
    W = weights_from_neighbours(d, idx, len(ctx.xy), settings.bandwidth * ctx.spacing, d2, gw, exclude_self)
    return _project_rank(np.asarray(W @ ctx.expr), std, vt, settings.rank)


def nearest_location(ctx_xy, dst_xy, exclude_self: bool = False) -> np.ndarray:
    """(n_dst,) index of the nearest context location (the nearest other one with ``exclude_self``)."""
    k = 2 if exclude_self else 1
    return NearestNeighbors(n_neighbors=k).fit(ctx_xy).kneighbors(dst_xy, return_distance=False)[:, k - 1]


def nearest_predict(ctx: Locations, dst_xy, exclude_self: bool = False) -> np.ndarray:
    """Expression of the nearest context location (the nearest other one with ``exclude_self``)."""
    return ctx.expr[nearest_location(ctx.xy, dst_xy, exclude_self)]


NEEDS_IMAGE = "Stage 4 learns from the H&E"   # why a slide or section without an image is refused
THINNING_EXACT_MAX = 256   # counts up to this are thinned exactly; above, a second-order delta method
SHARE_BANDWIDTH = 0.7      # Gaussian width (context spacings) of the rate map that sets each query's share


def thinned_log_expression(ctx: Locations, dst_xy, share_bandwidth: float = SHARE_BANDWIDTH) -> np.ndarray:
    """Expected log1p(CP10k) (n_dst, g) of a location holding a share of the molecules of its
    nearest context location (the one it lies in, for queries finer than the context).

    The ``m`` queries whose nearest context location is the same one (``k`` counts of a gene,
    library ``L``) split it: query ``i`` gets ``X_i ~ Binomial(k, p_i)`` molecules and ``L / m`` of
    the library, where ``p_i`` is the query's share of a smooth rate map, the Gaussian-kernel
    estimate (width ``share_bandwidth`` context spacings) of the context's CP10k at the query,
    normalised over the ``m`` queries. The estimate is

        E[log1p(1e4 X_i / (L / m))].

    This is what a finer location's measured log-expression is worth knowing the coarse location
    that contains it and its neighbours (pooling protocol, production grid): copying the coarse
    value, log1p(1e4 k / L), overstates sparse genes (a spot of a super-spot with k = 1 is
    usually 0), and ignores on which side of the coarse location the gene is higher. The shares
    keep the coarse location's molecules, so the map stays consistent with the measurement. Needs
    the context's raw counts (``ctx.counts``, ``ctx.totals``); a context location nearest to a
    single query gives it its own value.
    """
    from scipy.special import gammaln

    if ctx.counts is None or ctx.totals is None:
        raise ValueError("thinned_log_expression needs the context's raw counts")
    dst_xy = np.asarray(dst_xy, float)
    nearest = nearest_location(ctx.xy, dst_xy)
    m = np.bincount(nearest, minlength=len(ctx.xy)).astype(np.float64)
    totals = np.maximum(np.asarray(ctx.totals, np.float64), 1.0)
    counts = sp.csr_matrix(ctx.counts)
    rate = np.asarray(sp.diags(1e4 / totals) @ counts.todense())                     # (n_ctx, g) CP10k
    lam = np.asarray(kernel_weights(ctx.xy, dst_xy, share_bandwidth * ctx.spacing) @ rate) + 1e-3
    group = np.zeros_like(rate)
    np.add.at(group, nearest, lam)
    p = lam / group[nearest]                                                         # (n_dst, g) shares
    k = np.asarray(counts[nearest].todense(), np.float64)
    a = 1e4 * m[nearest] / totals[nearest]                                           # (n_dst,) CP10k per molecule
    out = np.log1p(a[:, None] * k)                                                   # sole query: its own value
    share = (m[nearest][:, None] > 1) & (k > 0)

    def entries(mask):   # flat indices of the (query, gene) entries in ``mask``, with their k, p, a
        idx = np.flatnonzero(mask)
        return idx, k.flat[idx], p.flat[idx], a[idx // k.shape[1]]

    idx, kk, pp, aa = entries(share & (k <= THINNING_EXACT_MAX))
    if idx.size:
        order = np.argsort(kk, kind="stable")
        kk, pp, aa = kk[order], np.clip(pp[order], 1e-12, 1 - 1e-12), aa[order]
        lgk, lp, lq = gammaln(kk + 1), np.log(pp), np.log1p(-pp)
        acc = np.zeros_like(kk)
        for x in range(1, int(kk[-1]) + 1):           # entries with k >= x: a suffix of the sorted k
            j = np.searchsorted(kk, x)
            logpmf = lgk[j:] - gammaln(x + 1) - gammaln(kk[j:] - x + 1) + x * lp[j:] + (kk[j:] - x) * lq[j:]
            acc[j:] += np.exp(logpmf) * np.log1p(aa[j:] * x)
        out.flat[idx[order]] = acc
    idx, kk, pp, aa = entries(share & (k > THINNING_EXACT_MAX))
    if idx.size:
        mu, var = kk * pp, kk * pp * (1.0 - pp)
        out.flat[idx] = np.log1p(aa * mu) - 0.5 * var * aa ** 2 / (1.0 + aa * mu) ** 2
    return out.astype(np.float32)


def shared_blend(prior: np.ndarray, other: np.ndarray, target: np.ndarray) -> float:
    """The one weight lambda in [0, 1], shared by all genes, minimising the squared error of
    (1 - lambda) prior + lambda other against target (all (n, g)): many more numbers than one gene's."""
    from models.superres_training import shared_weight

    return shared_weight((other - prior).astype(np.float64), target - prior)


def fit_stack(candidates: list, target: np.ndarray, prior: int = 1, strength: float = 200.0,
              blend: int | None = None) -> np.ndarray:
    """Per-gene least-squares weights (with intercept) combining candidate estimates of ``target``,
    shrunk toward using candidate ``prior`` alone (weight 1, others 0) or, with ``blend``, toward
    ``(1 - lambda) prior + lambda blend`` with one lambda for all genes (:func:`shared_blend`).

    candidates: k arrays (n, g); returns (k + 1, g). The penalty strength x |w - w_prior|^2 is a
    fixed number of pseudo-pairs, so a context with few locations stays close to the prior (the
    leave-one-out kernel) and a large one can learn, e.g., to weight its nearest value.
    """
    n, g = target.shape
    k1 = len(candidates) + 1
    X = np.stack([np.ones((n, g), np.float32)] + list(candidates), axis=-1)       # (n, g, k+1)
    w0 = np.zeros(k1)
    w0[prior + 1] = 1.0
    if blend is not None:
        lam = shared_blend(candidates[prior], candidates[blend], target)
        w0[prior + 1], w0[blend + 1] = 1.0 - lam, lam
    XtX = np.einsum("ngk,ngl->gkl", X, X) + strength * np.eye(k1)[None]
    Xty = np.einsum("ngk,ng->gk", X, target) + strength * w0[None]
    return np.linalg.solve(XtX, Xty[..., None])[..., 0].T.astype(np.float32)      # (k + 1, g)


def apply_stack(weights: np.ndarray, candidates: list) -> np.ndarray:
    out = np.repeat(weights[:1], len(candidates[0]), axis=0)
    for w, c in zip(weights[1:], candidates):
        out = out + w[None] * c
    return out.astype(np.float32)


def geometry_features(ctx_xy, dst_xy, spacing: float, exclude_self: bool = False) -> np.ndarray:
    """(n, 2): distance to the nearest context location and context density within 1.5 spacings,
    both in context-spacing units (they tell a model how far its low-resolution input is from data)."""
    k = min(8 + int(exclude_self), len(ctx_xy))
    d, _ = NearestNeighbors(n_neighbors=k).fit(ctx_xy).kneighbors(dst_xy)
    if exclude_self:
        d = d[:, 1:]
    d = d / spacing
    return np.c_[d[:, 0], (d < 1.5).sum(1)].astype(np.float32)


# ------------------------------------------------------------------------------------------
# protocols
# ------------------------------------------------------------------------------------------
@dataclass
class Split:
    """What a model may see (context) and what is scored (queries, with their measured truth)."""
    context: Locations
    queries_xy: np.ndarray
    query_index: np.ndarray          # indices of the scored spots in the slide
    pairs: str                       # 'loo' or 'coarsen'
    truth: np.ndarray | None = None  # (n_queries, g) measured log1p(CP10k), for scoring only


def spots_as_locations(adata, genes, allow_missing: bool = False, with_expr: bool = True) -> Locations:
    """All spots of the slide as Locations over ``genes`` (log1p(CP10k) with the full library size).

    A gene the slide lacks is an error, or with ``allow_missing`` (another section trained on) a
    column of zero counts (standardised, it carries no signal). ``with_expr=False`` leaves ``expr``
    None (counts only): for choosing genes among all of a full-width matrix without densifying it."""
    gi = adata.var_names.get_indexer(genes)
    missing = [g for g, i in zip(genes, gi) if i < 0]
    if missing and not allow_missing:
        raise InputError(f"{len(missing)} gene(s) not in the slide: {', '.join(missing[:10])}.")
    counts = sp.csr_matrix(adata.X)[:, np.maximum(gi, 0)]
    if missing:
        counts = sp.csr_matrix(counts.multiply((gi >= 0).astype(float)[None, :]))
    totals = adata.obs[keys.TOTAL_COUNTS].to_numpy(float)
    arr = adata.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy(int) if keys.ARRAY_COL in adata.obs else None
    from positions_enhancement.spatial_weights import estimate_spot_spacing
    spacing = estimate_spot_spacing(adata.obsm[keys.SPATIAL], arr)
    return Locations(xy=np.asarray(adata.obsm[keys.SPATIAL], float),
                     expr=lognormalize(counts, totals) if with_expr else None, spacing=spacing, array=arr,
                     counts=counts, totals=totals, index=np.arange(adata.n_obs))


def take(loc: Locations, rows=None, genes=None) -> Locations:
    """The same locations restricted to ``rows`` and/or the gene columns ``genes``."""
    r = slice(None) if rows is None else rows
    g = slice(None) if genes is None else genes

    def sub(a, cols=False):
        if a is None:
            return None
        return a[r][:, g] if cols else a[r]
    return Locations(xy=loc.xy[r], expr=sub(loc.expr, True), spacing=loc.spacing, array=sub(loc.array),
                     counts=sub(loc.counts, True), totals=sub(loc.totals),
                     index=None if loc.index is None else loc.index[r])


PROTOCOLS = ("recovery", "pooling")   # eval.protocol (null: none)
# the self-supervised task a protocol poses (training_pairs' mode): hidden spots from visible ones, or spots
# from their 2x2 super-spots (pooling, and with no protocol the grid)
PROTOCOL_TASKS = {"recovery": "loo", "pooling": "coarsen", None: "coarsen"}


def make_split(spots: Locations, protocol: str, seed: int = 0) -> Split:
    """``recovery``: hide a random half of the spots (seeded); ``pooling``: 2x2 super-spots as the
    context, every original spot scored. The assertion guarantees no scored spot is in the context."""
    n = len(spots.xy)
    if protocol == "recovery":
        rng = np.random.default_rng(seed)
        hidden = np.sort(rng.choice(n, n // 2, replace=False))
        visible = np.setdiff1d(np.arange(n), hidden)
        ctx = take(spots, rows=visible)
        # recovered spots sit between visible ones: spacing of the visible set ~ the spot spacing
        assert not np.isin(ctx.index, hidden).any(), "a hidden spot leaked into the context"
        return Split(ctx, spots.xy[hidden], hidden, PROTOCOL_TASKS[protocol],
                     None if spots.expr is None else spots.expr[hidden])
    if protocol == "pooling":
        pooled, _ = pool_2x2(spots)
        pooled.index = np.array([], dtype=int)   # super-spots are not spots: nothing scored is seen as such
        return Split(pooled, spots.xy, np.arange(n), PROTOCOL_TASKS[protocol], spots.expr)
    raise InputError(f"eval.protocol={protocol!r}: choose 'recovery' or 'pooling' (or null for none).")


def training_pairs(ctx: Locations, mode: str):
    """(targets Locations, low-res context used for them, exclude_self) for self-supervision."""
    if mode == "loo":
        return ctx, ctx, True
    if mode == "coarsen":
        coarse, _ = pool_2x2(ctx)
        return ctx, coarse, False
    raise ValueError(mode)


def scoring_genes(ctx: Locations, genes, n: int = 250) -> list:
    """Top ``n`` genes by mean log-expression over the context (what the model may see). Without
    ``ctx.expr`` the means come from ``ctx.counts``, ``GENE_CHUNK`` genes densified at a time (the
    same arithmetic per gene, so the same ranking)."""
    if ctx.expr is not None:
        means = ctx.expr.mean(0)
    else:
        g = ctx.counts.shape[1]
        means = np.concatenate([lognormalize(ctx.counts[:, a:a + GENE_CHUNK], ctx.totals).mean(0)
                                for a in range(0, g, GENE_CHUNK)]) if g else np.zeros(0, np.float32)
    order = np.argsort(-means)[:n]
    return [genes[i] for i in order]


# ------------------------------------------------------------------------------------------
# output grid
# ------------------------------------------------------------------------------------------
def superres_grid(spot_xy: np.ndarray, spacing: float, factor: float, tissue=None,
                  array: np.ndarray | None = None) -> np.ndarray:
    """Square lattice ``factor`` times denser than the spots in each direction, over tissue only.

    spot_xy: (n, 2) full-res px; spacing: spot centre-to-centre px; array: (n, 2) the spots' array
    sites (col, row), or None. Returns (m, 2) full-res px. A grid point is kept when it lies in the
    area the measured spots tile: with ``array``, when the array site nearest to it holds a measured
    spot (each spot's cell of the array: a hexagon on Visium, a square on a legacy ST array, whose
    corners lie 0.71 spacings from the spot); without, within 0.6 spot spacings of a spot (Visium's
    hexagons reach 0.58). When ``tissue`` = (mask, scale) is given, it must also lie on the tissue mask.
    """
    from data.lattice import in_spot_cells

    if factor is None or factor < 1:
        raise InputError(f"superres.factor={factor}: must be >= 1 (how many times denser than the spots).")
    step = spacing / factor
    pad = np.ceil(0.5 * spacing / step) * step         # the edge spots' cells, keeping points on the spots
    lo, hi = spot_xy.min(0) - pad, spot_xy.max(0) + pad
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0] + step / 2, step), np.arange(lo[1], hi[1] + step / 2, step))
    pts = np.c_[gx.ravel(), gy.ravel()]
    d, _ = NearestNeighbors(n_neighbors=1).fit(spot_xy).kneighbors(pts)
    in_cells = None if array is None else in_spot_cells(np.asarray(array), spot_xy, pts)
    pts = pts[d[:, 0] <= 0.6 * spacing] if in_cells is None else pts[in_cells & (d[:, 0] <= spacing)]
    if tissue is not None:
        mask, scale = tissue
        mx = np.clip((pts[:, 0] * scale).astype(int), 0, mask.shape[1] - 1)
        my = np.clip((pts[:, 1] * scale).astype(int), 0, mask.shape[0] - 1)
        pts = pts[mask[my, mx]]
    return pts


# ------------------------------------------------------------------------------------------
# image features at arbitrary locations
# ------------------------------------------------------------------------------------------
def location_image_features(image, xy_fullres: np.ndarray, patch_fullres: float, scales=(1.0, 3.0),
                            tokens: bool = False) -> np.ndarray:
    """Handcrafted patch statistics at each location, one row per scale: (n, len(scales), 22).

    Patch side = ``patch_fullres`` x scale (full-resolution px), converted to the image's pixels.
    With ``tokens``, 9 extra rows: spot-sized patches on a 3x3 neighbourhood one patch apart
    (the tissue-level tokens of the diffusion model's cross-attention).
    """
    from image_process.encoders import patch_statistics
    from image_process.patches import extract_patches
    from image_process.process_pool import map_patches    # over the CPU cores; the same numbers

    centers = xy_fullres * image.scale
    side = patch_fullres * image.scale
    rows = [map_patches(patch_statistics, extract_patches(image.pixels, centers, side * s, 24)) for s in scales]
    if tokens:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                off = centers + np.array([dx, dy]) * side
                rows.append(map_patches(patch_statistics, extract_patches(image.pixels, off, side, 16)))
    return np.stack(rows, axis=1).astype(np.float32)


def location_rich_features(image, xy_fullres: np.ndarray, patch_fullres: float) -> np.ndarray:
    """Stage-1 handcrafted features (scales 1, 2, 4 x the patch) and nucleus statistics of each
    location, standardised over the given set of locations (so training pairs and queries at
    different patch sizes sit on the same footing): (n, 66 + 8) float32."""
    from image_process.encoders import HandcraftedEncoder
    from image_process.nuclei import nucleus_features
    from pipeline.expression_prediction import FeatureScaler

    centers = xy_fullres * image.scale
    side = patch_fullres * image.scale
    hand = HandcraftedEncoder().encode(image.pixels, centers, side)
    nuc, _ = nucleus_features(image.pixels, centers, side)
    return FeatureScaler("section").transform(np.hstack([hand, nuc]))


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)


def ridge_loo(Z: np.ndarray, R: np.ndarray, alphas=RIDGE_ALPHAS) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """Multi-output ridge ``R ~ Z W + b`` with alpha chosen by exact leave-one-out MSE (closed form
    via the hat matrix), on the training pairs only. Returns (W (d, g), b (g,), alpha, {alpha: LOO MSE})."""
    zm, rm = Z.mean(0), R.mean(0)
    Zc, Rc = Z - zm, R - rm
    U, sv, Vt = np.linalg.svd(Zc, full_matrices=False)
    n = len(Z)
    scores = {}
    for a in alphas:
        d = sv ** 2 / (sv ** 2 + a)
        H_diag = (U ** 2 * d).sum(1) + 1.0 / n          # hat matrix diagonal (with the intercept)
        fit = (U * d) @ (U.T @ Rc)
        loo = (Rc - fit) / (1 - H_diag)[:, None]
        scores[a] = float(np.mean(loo ** 2))
    alpha = min(scores, key=scores.get)
    W = Vt.T @ ((sv / (sv ** 2 + alpha))[:, None] * (U.T @ Rc))
    return W.astype(np.float32), (rm - zm @ W).astype(np.float32), float(alpha), scores


# ------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------
def grid_ssim(pred: np.ndarray, truth: np.ndarray, array: np.ndarray) -> float:
    """Mean over genes of SSIM between predicted and measured maps rasterised on the array grid
    (cells without a scored spot are 0 in both)."""
    from skimage.metrics import structural_similarity

    if array is None:
        return float("nan")
    col, row = array[:, 0] - array[:, 0].min(), array[:, 1] - array[:, 1].min()
    if is_hex_grid(array):
        col = col // 2
    shape = (row.max() + 1, col.max() + 1)
    if min(shape) < 7:
        return float("nan")
    vals = []
    for g in range(truth.shape[1]):
        a = np.zeros(shape)
        b = np.zeros(shape)
        a[row, col] = pred[:, g]
        b[row, col] = truth[:, g]
        rng = float(max(b.max() - b.min(), 1e-6))
        vals.append(structural_similarity(a, b, data_range=rng))
    return float(np.mean(vals))


def superres_scores(pred: np.ndarray, truth: np.ndarray, genes, score_genes, array=None) -> dict:
    """``pcc_all`` / ``pcc_heg`` (50 highest-mean of the scoring genes) / ``mse`` / ``ssim`` / ``n_genes``."""
    from pipeline.metrics import per_gene_pearson

    gi = [list(genes).index(g) for g in score_genes]
    p, t = pred[:, gi], truth[:, gi]
    r = per_gene_pearson(p, t)
    heg = np.argsort(-t.mean(0))[:50]
    return {"pcc_all": float(np.nanmean(r)), "pcc_heg": float(np.nanmean(r[heg])),
            "mse": float(np.mean((p - t) ** 2)), "ssim": grid_ssim(p, t, array), "n_genes": len(gi)}


# ------------------------------------------------------------------------------------------
# the trained model and its context
# ------------------------------------------------------------------------------------------
MODELS = ("trihrge", "diffusion")
RESTORER_FORMAT = "stpipe-superres-restorer-1"     # Restorer.save's payload


@dataclass
class SectionImage:
    """A section's H&E (a SlideImage) with its spot geometry in full-resolution px."""
    image: object
    spot_diameter: float
    spot_spacing: float

    def patch(self, spacing: float) -> float:
        """Patch side (full-res px) of locations ``spacing`` px apart: the spot diameter scaled alike."""
        return self.spot_diameter * spacing / self.spot_spacing


@dataclass
class TrainingSection:
    """Another section a model also learns from; its expression is fully known (it is never scored).
    spots: every spot over the modelled genes (:func:`spots_as_locations`)."""
    name: str
    spots: Locations
    image: SectionImage


def mirrored_pairs(spots: Locations, mode: str, seed: int = 0) -> tuple[Locations, Locations, bool]:
    """Training pairs from a fully known training section that pose the target's own task at the
    target's scale: ``loo`` (queries between context spots, recovery) -> a seeded random half of the
    spots predicted from the other half; ``coarsen`` (queries finer than the context) -> every spot
    predicted from its 2x2 super-spots. Returns (targets, low-res context, exclude_self=False)."""
    if mode == "loo":
        split = make_split(spots, "recovery", seed)
        return take(spots, rows=split.query_index), split.context, False
    if mode == "coarsen":
        pooled, _ = pool_2x2(spots)
        return spots, pooled, False
    raise ValueError(mode)


def standardiser(expr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene (mean, sd) of a section's log-expression; sd floored at 0.05 (near-constant genes)."""
    return expr.mean(0), np.maximum(expr.std(0), 0.05)


@dataclass
class _PairBlock:
    """One section's training pairs, standardised by that section's own statistics."""
    cands: list            # k arrays (n, g): low-res candidate estimates
    y: np.ndarray          # (n, g) targets
    geo: np.ndarray        # (n, 2) geometry_features
    feats: np.ndarray      # (n, rows, 22) standardised location image features
    rich: np.ndarray | None  # (n, 74) location_rich_features (image ridge) or None
    feature_stats: tuple     # per-column (mean, sd) of the raw image features of this block
    section: "SectionImage"  # whose image the pairs lie on
    xy: np.ndarray           # (n, 2) the targets' locations, full-res px


def require_slide_image(image, model_name: str) -> None:
    """Refuse a slide without an H&E image (``image`` None, as :func:`choose_image` gives it): both stage-4
    models are guided by it. Called as soon as the slide's image is chosen, before anything reads it."""
    if image is None:
        raise InputError(f"model.name={model_name} needs the slide's H&E image: set data.image (full resolution), "
                         "give a Space Ranger folder with tissue_hires_image.png / tissue_lowres_image.png, or "
                         "an .h5ad holding them in uns['spatial'][library]['images'] with their scale factors.")


class Restorer:
    """A super-resolution model trained on its context, predicting log1p(CP10k) anywhere.

    The low-resolution input ("base") at a location is a per-gene linear stack, fitted on the
    training pairs, of candidate estimates from the context (for queries finer than the context the
    thinned share of the location holding them, :func:`thinned_log_expression`; the nearest location;
    Gaussian kernels of several widths; for queries between context locations the expression-guided
    low-rank kernel, :func:`guided_kernel`, the stack's prior there; where the image has the pixels for it, a patch CNN trained here,
    cross-fitted so that a training pair's value never comes from a network that saw it,
    :mod:`pipeline.superres_patches`); the model predicts a correction to it from the image and the context.
    ``fit(pairs)`` builds self-supervised pairs from the context only (see module docstring) and,
    given ``others`` (:class:`TrainingSection`), pairs from those sections posing the same task
    (:func:`mirrored_pairs`); each section is standardised by its own per-gene mean and sd and its
    own image-feature statistics, so a model carries over between sections in those units.
    ``predict(xy, spacing)`` predicts at locations ``spacing`` px apart on the target section. The
    image patch of a location is the spot diameter scaled by (its spacing / spot spacing), at 1x
    and 3x (TriHRGE), or 1x plus 3x and a 3x3 neighbourhood of tokens (diffusion).
    """

    def __init__(self, name: str, ctx: Locations, image, spot_diameter: float, spot_spacing: float,
                 params, device: str = "cpu"):
        if name not in MODELS:
            raise InputError(f"model.name={name!r}: choose one of {MODELS}.")
        require_slide_image(image, name)
        self.name, self.ctx, self.params, self.device = name, ctx, params, device
        self.section = SectionImage(image, spot_diameter, spot_spacing)
        self.model = None
        self.history = []
        self.n_pairs = {}
        self.patch_cnn = None     # PatchCandidate when the learned image candidate is used
        self.patch_blend = None   # its shared weight in the stack's prior
        self._guided = {}         # id(context) -> (context, GuidedKernel): settings chosen once per context

    def _image(self, section: SectionImage, xy, spacing):
        """Raw image features (n, rows, 22) at locations ``spacing`` px apart."""
        return location_image_features(section.image, xy, section.patch(spacing), scales=(1.0, 3.0),
                                       tokens=self.name == "diffusion")

    @staticmethod
    def _feature_stats(feats):
        flat = feats.reshape(-1, feats.shape[-1])
        return flat.mean(0), flat.std(0) + 1e-6

    def _candidates(self, ctx, xy, std, exclude=False) -> list:
        """Low-resolution estimates at ``xy`` from ``ctx``, standardised by ``std`` = (mean, sd):
        when queries are finer than the context (``coarsen`` pairs), first the thinned share of the
        context location that holds the query (:func:`thinned_log_expression`); then the nearest
        context location, the kernel at the leave-one-out width, and kernels at LOWRES_SCALES spacings;
        when queries lie between context locations (``loo`` pairs), last the expression-guided
        low-rank kernel (:func:`guided_kernel`)."""
        bw, _ = loo_bandwidth(ctx)
        est = [thinned_log_expression(ctx, xy)] if self.pairs == "coarsen" else []
        est += [nearest_predict(ctx, xy, exclude), kernel_predict(ctx, xy, bw, exclude_self=exclude)]
        est += [kernel_predict(ctx, xy, s * ctx.spacing, exclude_self=exclude) for s in LOWRES_SCALES]
        if self.pairs == "loo":   # queries between context locations: the guided kernel (the stack's prior)
            est.append(guided_kernel(ctx, xy, standardiser(ctx.expr), exclude, self._guided_settings(ctx))[0])
        return [(e - std[0]) / std[1] for e in est]

    def _guided_settings(self, ctx: Locations) -> GuidedKernel:
        """:func:`fit_guided_kernel` of ``ctx``, computed once per context (training pairs and queries)."""
        cached = self._guided.get(id(ctx))
        if cached is None or cached[0] is not ctx:
            cached = self._guided[id(ctx)] = (ctx, fit_guided_kernel(ctx, standardiser(ctx.expr)))
        return cached[1]

    @property
    def guided_settings(self) -> GuidedKernel | None:
        """The guided kernel's settings on the slide's own context (``loo`` pairs only), else None."""
        cached = self._guided.get(id(self.ctx))
        return cached[1] if cached is not None and cached[0] is self.ctx else None

    def _prior(self) -> int:
        """The candidate the stack shrinks toward: the thinned share (queries inside coarser context
        locations) or the guided low-rank leave-one-out kernel (queries between context locations)."""
        return 0 if self.pairs == "coarsen" else 2 + len(LOWRES_SCALES)

    def _project(self, cands) -> np.ndarray:
        """Each candidate projected on the context's top ``N_CONTEXT_PCS`` principal axes (few
        network inputs: the training pairs are few)."""
        return np.concatenate([c @ self.axes for c in cands], axis=1)

    def _block(self, section: SectionImage, targets: Locations, low_ctx: Locations, exclude: bool, std) -> _PairBlock:
        feats = self._image(section, targets.xy, targets.spacing)
        fm, fs = self._feature_stats(feats)
        rich = None
        if getattr(self.params, "image_ridge", False):
            rich = location_rich_features(section.image, targets.xy, section.patch(targets.spacing))
        return _PairBlock(cands=self._candidates(low_ctx, targets.xy, std, exclude), y=(targets.expr - std[0]) / std[1],
                          geo=geometry_features(low_ctx.xy, targets.xy, low_ctx.spacing, exclude),
                          feats=(feats - fm) / fs, rich=rich, feature_stats=(fm, fs), section=section,
                          xy=targets.xy)

    def fit(self, pairs: str, progress: bool = False, others=(), train_self: bool = True):
        """Train on the context's self-supervised ``pairs`` ('loo' or 'coarsen'; skipped with
        ``train_self=False``) and on the same task posed on each of ``others``."""
        from models.superres_training import fit_diffusion, fit_trihrge

        if not train_self and not others:
            raise InputError("superres.train_self is false and train.sections is empty: nothing to train on.")
        self.pairs = pairs
        self.std = standardiser(self.ctx.expr)
        _, _, vt = np.linalg.svd((self.ctx.expr - self.std[0]) / self.std[1], full_matrices=False)
        self.axes = vt[:N_CONTEXT_PCS].T.astype(np.float32)
        targets, low_ctx, exclude = training_pairs(self.ctx, pairs)
        blocks = []
        if train_self:
            log.info("stage 4: image features and low-resolution candidates at the slide's %d training pairs",
                     len(targets.xy))
            blocks.append(self._block(self.section, targets, low_ctx, exclude, self.std))
            self.n_pairs["self"] = len(targets.xy)
            self.f_stats = blocks[0].feature_stats
        else:   # the target's image statistics at its own training-pair locations (image only)
            self.f_stats = self._feature_stats(self._image(self.section, targets.xy, targets.spacing))
        for i, sec in enumerate(others):
            t, low, ex = mirrored_pairs(sec.spots, pairs, self.params.seed + 1 + i)
            log.info("stage 4: the same at %d training pairs of section %s", len(t.xy), sec.name)
            blocks.append(self._block(sec.image, t, low, ex, standardiser(sec.spots.expr)))
            self.n_pairs[sec.name] = len(t.xy)
        self.patch_cnn = None
        settings = PatchCandidateSettings.from_config(getattr(self.params, "patch_cnn", None))
        named = {"the slide": self.section} | {sec.name: sec.image for sec in others}
        if patch_candidate_wanted(settings, named):
            # the learned image candidate: out-of-fold patch-CNN predictions at every training pair
            self.patch_cnn = PatchCandidate(settings, self.params.seed, self.device)
            oof = self.patch_cnn.fit([(b.section, b.xy, b.y) for b in blocks], self.section, self.ctx.xy, progress)
            for b, o in zip(blocks, oof):
                b.cands.append(o)
        cands = [np.concatenate([b.cands[i] for b in blocks]) for i in range(len(blocks[0].cands))]
        y = np.concatenate([b.y for b in blocks])
        geo = np.concatenate([b.geo for b in blocks])
        feats = np.concatenate([b.feats for b in blocks])
        # prior (see _prior); with the patch CNN, blended with it by one weight shared by all genes
        prior = self._prior()
        blend = len(cands) - 1 if self.patch_cnn is not None else None
        self.stack = fit_stack(cands, y, prior=prior, blend=blend)
        self.patch_blend = None if blend is None else shared_blend(cands[prior], cands[blend], y)
        lo = apply_stack(self.stack, cands)
        self.base_training_mse = float(np.mean((lo - y) ** 2))
        self.ridge = None
        if getattr(self.params, "image_ridge", False):
            # TriHRGE's linear image path: the residual of the low-res base explained by rich image
            # features of each location, alpha by leave-one-out on the training pairs
            Z = np.concatenate([b.rich for b in blocks])
            W, b, alpha, _ = ridge_loo(Z, y - lo)
            self.ridge = (W, b)
            self.ridge_alpha = alpha
            lo = lo + Z @ W + b
        if self.name == "trihrge":
            self.model, self.history = fit_trihrge(feats[:, :2], lo, np.c_[geo, self._project(cands)], y, self.params,
                                                   self.device, progress)
        else:
            self.model, self.history = fit_diffusion(feats[:, 0], feats[:, 1:], lo, y, self.params, self.device, progress)
        return self

    # what save() leaves out: the slide (its context and image), which load() is given again
    _SLIDE_ATTRIBUTES = ("ctx", "section", "_guided")

    def save(self, path, genes: list) -> Path:
        """Write the trained model (``04_model.pt``: networks, stacks, standardisers, the guided kernel's
        settings; not the slide's spots or image) so that :meth:`load` predicts as this object does.
        ``genes``: the modelled genes, in the order of the model's outputs. A Python pickle: stage 4 reads it
        back from its own ``--out``, or where ``superres.model_file`` names it (never load one from an
        untrusted source)."""
        from pipeline.stages import save_tagged

        if self.model is None:
            raise RuntimeError("Restorer.save before fit")
        state = {k: v for k, v in self.__dict__.items() if k not in self._SLIDE_ATTRIBUTES}
        return save_tagged(path, RESTORER_FORMAT, {"genes": list(genes), "state": state, "guided": self.guided_settings})

    @classmethod
    def load(cls, path, device: str = "cpu") -> tuple["Restorer", list]:
        """(the model :meth:`save` wrote, its genes); :meth:`attach` it to the slide it was trained on, or
        :meth:`adapt` it to another, before predicting. Raises ``ValueError`` for a file that is not such a
        model."""
        from pipeline.stages import load_tagged

        try:       # the networks, stacks and patch CNN are Python objects: a pickle (a file the user made)
            payload = load_tagged(path, RESTORER_FORMAT, weights_only=False, map_location=device)
        except ValueError as why:             # a damaged or foreign file: the caller retrains
            raise ValueError(f"{path}: not a stage-4 model ({why})") from None
        restorer = cls.__new__(cls)
        restorer.__dict__.update(payload["state"])
        restorer.ctx = restorer.section = None
        restorer._guided, restorer._saved_guided = {}, payload["guided"]
        restorer.device = device
        if restorer.patch_cnn is not None:
            restorer.patch_cnn.device = device
        return restorer, list(payload["genes"])

    def attach(self, ctx: Locations, image, spot_diameter: float, spot_spacing: float) -> "Restorer":
        """A loaded model (:meth:`load`) on the slide it was trained on: ``ctx``, its context over the
        model's genes built as for training, and the image, spot diameter and spacing ``__init__`` took."""
        self.ctx = ctx
        self.section = SectionImage(image, spot_diameter, spot_spacing)
        saved = self.__dict__.pop("_saved_guided", None)
        self._guided = {} if saved is None else {id(ctx): (ctx, saved)}
        return self

    def adapt(self, ctx: Locations, image, spot_diameter: float, spot_spacing: float) -> "Restorer":
        """A loaded model (:meth:`load`) on another slide than it was trained on, as a training section's data
        is met in :meth:`fit`: ``ctx`` (that slide's context over the model's genes), its image, spot diameter
        and spacing; the expression standardiser and the image features' statistics are the new slide's own
        (its context, and its training-pair locations for the model's task), and the guided kernel's settings
        are chosen again on its context. The networks, stacks and gene axes stay as trained."""
        self.attach(ctx, image, spot_diameter, spot_spacing)
        self._guided = {}
        self.std = standardiser(ctx.expr)
        targets, _, _ = training_pairs(ctx, self.pairs)
        self.f_stats = self._feature_stats(self._image(self.section, targets.xy, targets.spacing))
        return self

    def predict(self, xy, spacing: float, progress: bool = False) -> np.ndarray:
        from models.superres_training import predict_diffusion, predict_trihrge

        cands = self._candidates(self.ctx, xy, self.std)
        if self.patch_cnn is not None:
            cands.append(self.patch_cnn.predict(self.section, xy, progress))
        lo = apply_stack(self.stack, cands)
        if self.ridge is not None:
            Z = location_rich_features(self.section.image, xy, self.section.patch(spacing))
            lo = lo + Z @ self.ridge[0] + self.ridge[1]
        feats = (self._image(self.section, xy, spacing) - self.f_stats[0]) / self.f_stats[1]
        if self.name == "trihrge":
            geo = geometry_features(self.ctx.xy, xy, self.ctx.spacing)
            z = predict_trihrge(self.model, feats[:, :2], lo, np.c_[geo, self._project(cands)], self.device)
        else:
            z = predict_diffusion(self.model, feats[:, 0], feats[:, 1:], lo, self.params, self.device,
                                  progress=progress)
        return (z * self.std[1] + self.std[0]).astype(np.float32)
