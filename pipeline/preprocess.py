"""Expression preprocessing shared by every stage.

Log-normalised units everywhere: ``log1p(1e4 * count / total_counts)`` where ``total_counts`` is
the spot's UMI total over all genes read (``obs['total_counts']``), i.e. scanpy's
``normalize_total(target_sum=1e4)`` + ``log1p`` computed before any gene subsetting.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from data import keys
from data.errors import InputError

log = logging.getLogger("stpipe")

GENE_CHUNK = 2048   # genes densified at a time where every gene of a full-width matrix is ranked


def match_gene_names(wanted, available, key: str) -> tuple[list[str], list[str]]:
    """``(found, missing)``: the genes of ``wanted`` (a config's gene list, ``key`` naming it in messages)
    as spelled in ``available`` (the slide's or the model's gene names), in ``wanted``'s order. A name
    found only when case is ignored (``mobp`` for ``MOBP``, a human symbol for the mouse ``Mobp``) is
    taken when exactly one gene matches, with a log line; otherwise it is missing. Repeats are dropped."""
    available = list(available)
    exact = set(available)
    by_lower: dict = {}
    for name in available:
        by_lower.setdefault(str(name).lower(), []).append(name)
    found, missing, recased = [], [], []
    for name in wanted:
        if name in exact:
            hit = name
        else:
            hits = by_lower.get(str(name).lower(), [])
            if len(hits) != 1:
                missing.append(name)
                continue
            hit = hits[0]
            recased.append(f"{name} -> {hit}")
        if hit not in found:
            found.append(hit)
    if recased:
        log.info("%s: matched ignoring case: %s", key, ", ".join(recased))
    return found, missing


def warn_genes_left_out(wanted, genes, key: str, genes_are: str, consequence: str) -> list[str]:
    """Warn, as soon as the model's ``genes`` are known (before training), of the genes of ``wanted`` (a
    figure's gene list, ``key`` naming it) that are not among them, so the figure will leave them out;
    returns them. ``genes_are`` says what the genes are ("modelled genes"), ``consequence`` how to
    get them drawn ("the maps will leave them out (...)")."""
    missing = match_gene_names(wanted or [], genes, key)[1]
    if missing:
        log.warning("%s %s are not among the %d %s, so %s", key, ", ".join(missing), len(genes), genes_are, consequence)
    return missing


def lognormalize(counts, total_counts, dense: bool = True):
    """log1p(CP10k), float32. counts: (n_spots, n_genes) raw; total_counts: (n_spots,).

    Dense (n_spots, n_genes) by default; ``dense=False`` with sparse counts returns a CSR matrix
    (zeros stay zeros), for a full-width matrix (~33,000 genes) that should not be densified."""
    tot = np.maximum(np.asarray(total_counts, dtype=np.float64), 1.0)
    if sp.issparse(counts) and not dense:
        X = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        X.sum_duplicates()
        X.data *= np.repeat(1e4 / tot, np.diff(X.indptr))
        np.log1p(X.data, out=X.data)
        return X.astype(np.float32)
    X = counts.toarray() if sp.issparse(counts) else np.asarray(counts, dtype=np.float32)
    return np.log1p(X * (1e4 / tot)[:, None]).astype(np.float32)


GENE_FLAVORS = ("seurat_v3", "seurat", "cell_ranger", "mean")


def select_genes(adata, n_top_genes: int | None, min_spots: int = 10, flavor: str = "seurat_v3"):
    """Return a copy restricted to genes seen in >= ``min_spots`` spots (at most a tenth of the spots,
    with a warning when that caps it, so a small slide keeps its genes) and, if ``n_top_genes`` is
    set, the top genes by ``flavor``: ``seurat_v3`` (variance of standardised raw counts, the
    choice of the M-STGCN code), ``seurat`` / ``cell_ranger`` (dispersion of log1p(CP10k)),
    ``mean`` (highest mean log1p(CP10k)).

    Writes ``var['highly_variable']`` and ``layers['lognorm']`` on the copy; ``X`` stays raw counts.
    """
    import anndata as ad
    import scanpy as sc

    if flavor not in GENE_FLAVORS:
        raise InputError(f"preprocess.flavor={flavor!r}: choose one of {GENE_FLAVORS}.")
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    floor = min(min_spots, max(1, adata.n_obs // 10))
    if floor < min_spots:
        log.warning("preprocess.min_spots=%d is more than a tenth of the slide's %d spots; genes detected in at "
                    "least %d spots are kept instead", min_spots, adata.n_obs, floor)
    keep = detected >= floor
    if keep.sum() == 0:
        raise InputError("no gene is detected in enough spots; is the count matrix empty?")
    sub = adata[:, keep].copy()
    # sparse until the genes are chosen: a full Space Ranger matrix has ~33,000 features
    logn = lognormalize(sub.X, sub.obs[keys.TOTAL_COUNTS].to_numpy(), dense=False)
    if n_top_genes and n_top_genes < sub.n_vars:
        if flavor == "mean":
            hv = np.zeros(sub.n_vars, bool)
            hv[np.argsort(-np.asarray(logn.mean(0)).ravel())[:int(n_top_genes)]] = True
        elif flavor == "seurat_v3":
            hv = seurat_v3_top_genes(sub.X, int(n_top_genes), "--set preprocess.n_top_genes=null (every detected gene)")
        else:
            tmp = ad.AnnData(X=logn, var=sub.var[[]].copy())
            sc.pp.highly_variable_genes(tmp, flavor=flavor, n_top_genes=int(n_top_genes))
            hv = tmp.var["highly_variable"].to_numpy()
        sub = sub[:, hv].copy()
        logn = logn[:, hv]
    sub.var[keys.HIGHLY_VARIABLE] = True
    sub.layers[keys.LOGNORM] = logn.toarray() if sp.issparse(logn) else logn
    return sub


def seurat_v3_top_genes(counts, n_top: int, way_out: str) -> np.ndarray:
    """Boolean mask (g,) of the ``n_top`` most variable genes of raw ``counts`` (n, g) by scanpy's
    ``seurat_v3`` flavor (variance of counts standardised by a loess fit of variance on mean).
    The loess fit fails on a handful of spots; that failure is reported as an :class:`InputError`
    that ends with ``way_out`` (which setting avoids the ranking) instead of a loess traceback. Asked for
    at least as many genes as there are, every gene is kept without ranking (nothing to choose)."""
    import anndata as ad
    import scanpy as sc

    if int(n_top) >= counts.shape[1]:
        return np.ones(counts.shape[1], dtype=bool)
    tmp = ad.AnnData(X=counts.copy())
    if tmp.n_obs < 2:   # a variance of one spot is undefined: the loess then crashes the interpreter
        raise InputError(f"choosing the {n_top} most variable genes (seurat_v3) needs at least 2 spots, and there "
                         f"{'is' if tmp.n_obs == 1 else 'are'} {tmp.n_obs}: give more spots, or {way_out}.")
    try:
        sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=int(n_top))
    except ValueError as exc:
        raise InputError(f"choosing the {n_top} most variable genes (seurat_v3) failed on {tmp.n_obs} spots: its "
                         f"loess fit of variance on mean did not converge ({str(exc).strip()[:80]}). Too few "
                         f"spots for it: give more spots, or {way_out}.") from None
    return tmp.var["highly_variable"].to_numpy()


def standardise(X: np.ndarray) -> np.ndarray:
    """Each column of X (n, d) centred and divided by its standard deviation (a constant column: centred only), in
    X's own dtype."""
    sd = X.std(0)
    return (X - X.mean(0)) / np.where(sd > 0, sd, 1)


def standardise_within(X: np.ndarray, groups) -> np.ndarray:
    """X (n, d) with each group's rows standardised on their own (:func:`standardise`): every column centred and
    scaled within each group (``groups``: (n,) labels, e.g. each spot's section), in X's own dtype."""
    X = np.asarray(X)
    groups = np.asarray(groups)
    out = np.empty_like(X)
    for group in dict.fromkeys(groups.tolist()):
        rows = groups == group
        out[rows] = standardise(X[rows])
    return out


def pca(X: np.ndarray, n_comps: int, seed: int = 0, scale: bool = True) -> np.ndarray:
    """PCA scores (n, n_comps) of X, optionally after per-feature standardisation (clipped at 10). X is taken in C
    order whatever its layout (an AnnData put together by ``anndata.concat`` holds its layers in Fortran order), so
    that an array and its copy read from disk give the same scores (float32 BLAS sums in another order otherwise)."""
    from sklearn.decomposition import PCA

    X = np.ascontiguousarray(X, dtype=np.float32)
    if scale:
        X = np.clip(standardise(X), -10, 10)
    n_comps = int(min(n_comps, X.shape[0] - 1, X.shape[1]))
    return PCA(n_components=n_comps, random_state=seed, svd_solver="randomized").fit_transform(X).astype(np.float32)


def expected_lognorm_nb(rate_cp10k: np.ndarray, theta: np.ndarray, total_counts: np.ndarray,
                        max_count: int = 400, block: int = 256) -> np.ndarray:
    """E[log1p(1e4 X / L)] for X ~ NB(mean = L * rate / 1e4, inverse dispersion theta).

    The log-normalised value a measurement of the spot at its own depth L (``total_counts``) would
    have on average under the fitted model: the denoised expression in the same units, and on the
    same footing, as ``layers['lognorm']`` (log1p of the mean overshoots for sparse genes, because
    E[log1p(X)] < log1p(E[X])). rate_cp10k: (n, g) expected counts per 10k; theta: (g,), one per gene, or
    (n, g), one per entry (a posterior's shape: :func:`pipeline.domains.posterior_lognorm`).
    Summed exactly over counts 0..K in blocks of ``block`` spots x ``block`` genes, genes grouped by
    expression level so each block's K (from its largest mean and variance, capped at ``max_count``) stays
    small. Mass beyond K below :data:`NB_TAIL_TOL` is put on K; where the cap leaves more (an abundant gene in a
    deep spot, or a widely dispersed one), that tail is summed on a grid (:func:`_nb_tail_mean`): putting it on
    K gave log1p(1e4 K / L) for every count beyond K, 0.9 too low at a mean of 1,000 counts.
    """
    import torch

    rate_np = np.asarray(rate_cp10k, np.float32)           # no copy when given float32
    L_np = np.maximum(np.asarray(total_counts, np.float32), 1.0)
    theta_np = np.asarray(theta, np.float32)
    per_entry = theta_np.ndim == 2
    if per_entry and theta_np.shape != rate_np.shape:
        raise ValueError(f"theta {theta_np.shape}: one per gene, or one per entry of the rates {rate_np.shape}")
    theta_np = theta_np if per_entry else theta_np.reshape(1, -1)     # (n or 1, g)
    order = np.argsort(rate_np.max(0))                      # genes from sparse to abundant
    L = torch.from_numpy(L_np)
    result = np.empty(rate_np.shape, np.float32)
    for g in range(0, rate_np.shape[1], block):
        genes = order[g:g + block]                          # one block of genes at a time, not a reordered copy
        th_all = torch.from_numpy(np.ascontiguousarray(theta_np[:, genes]))          # (n or 1, genes)
        mu_all = torch.from_numpy(rate_np[:, genes]) * L[:, None] / 1e4
        out = np.empty((rate_np.shape[0], len(genes)), np.float32)
        K = int(min(max_count, torch.ceil((mu_all + 10 * (mu_all + mu_all ** 2 / th_all).sqrt()).max()).item() + 1))
        k = torch.arange(K + 1, dtype=torch.float32).view(1, 1, -1)
        th = th_all.unsqueeze(-1)
        log_comb = None if per_entry else _log_nb_coefficient(k, th)                     # (1, g, K+1), spot-free
        # two (spots, genes, K+1) work arrays for the block, reused from one spot block to the next: the same
        # values as new arrays per step, without fresh memory for each (time: DEVLOG 451)
        work = [torch.empty((min(block, rate_np.shape[0]), len(genes), K + 1), dtype=torch.float32) for _ in range(2)]
        for s in range(0, rate_np.shape[0], block):
            mu = mu_all[s:s + block].unsqueeze(-1)
            logp, prod = (w[:len(mu)] for w in work)
            if per_entry:
                th = th_all[s:s + block].unsqueeze(-1)
                log_comb = _log_nb_coefficient(k, th)
            torch.add(log_comb, th * torch.log1p(-mu / (th + mu)), out=logp)
            logp += torch.mul(k, torch.log(mu / (th + mu) + 1e-30), out=prod)
            p = _exp_flushing_tiny(logp)
            tail = (1 - p.sum(-1)).clamp_min(0)           # the mass beyond K
            vals = torch.log1p(k * (1e4 / L[s:s + block]).view(-1, 1, 1))
            body = torch.mul(p, vals, out=prod).sum(-1) if K == max_count else None
            p[..., -1] += tail
            mean = torch.mul(p, vals, out=prod).sum(-1)
            if body is not None:      # K capped: a tail that matters is summed on a grid, not put on K
                far = tail > NB_TAIL_TOL
                if bool(far.any()):
                    spot, _ = far.nonzero(as_tuple=True)
                    mean[far] = body[far] + tail[far] * _nb_tail_mean(
                        mu[..., 0][far], th[..., 0].expand_as(far)[far], (1e4 / L[s:s + block])[spot], K)
            out[s:s + block] = mean.numpy()
        result[:, genes] = out
    return result


EXP_FLOOR = -87.0       # exp(-87) = 1.6e-38, just above float32's smallest normal number (1.2e-38 = exp(-87.34))


def _exp_flushing_tiny(logp):
    """exp of ``logp`` in its place, with what falls below ``exp(EXP_FLOOR)`` set to 0. The CPU's exp takes ~50x
    longer where its result is a subnormal number or underflows to 0, and in a block whose counts run to its most
    abundant gene's range most NB probabilities are such (counts far from a gene's mean; DEVLOG 451). Each is
    under 1.7e-38 and vanishes in sums beside probabilities that add up to ~1, so the expectation is the same to
    the bit (checked on DLPFC 151673, MOB1 and the demo slice)."""
    tiny = logp < EXP_FLOOR
    return logp.clamp_(min=EXP_FLOOR).exp_().masked_fill_(tiny, 0.0)


def _log_nb_coefficient(k, theta):
    """log Gamma(k + theta) - log Gamma(theta) - log k! (broadcast), each term in float64 and the difference
    returned in float32: in float32 the two Gamma terms of a large theta (a posterior's shape of thousands) lose
    their difference to rounding."""
    import torch

    k64, th64 = k.double(), theta.double()
    return (torch.lgamma(k64 + th64) - torch.lgamma(th64) - torch.lgamma(k64 + 1)).float()


NB_TAIL_TOL = 1e-6      # NB mass beyond the summed counts below which it is simply put on the last count
NB_TAIL_POINTS = 400    # points of the tail's sum


def _nb_tail_mean(mu, theta, c, K: int, chunk: int = 65536):
    """E[log1p(c X) | X > K] for X ~ NB(mu, theta), per entry (1-D torch tensors): the sum over counts beyond K
    taken as the integral of the NB's probability from K + 0.5 (Euler-Maclaurin's midpoint rule) to mu + 20
    standard deviations, on :data:`NB_TAIL_POINTS` intervals spaced evenly in log count (fine just beyond K,
    where a widely dispersed NB falls fastest), normalised to one, weighting log1p(c k). ``chunk`` entries at
    a time."""
    import torch

    out = torch.empty_like(mu)
    j = torch.arange(NB_TAIL_POINTS + 1, dtype=torch.float32).view(1, -1) / NB_TAIL_POINTS
    for a in range(0, len(mu), chunk):
        m, th, cc = (t[a:a + chunk].view(-1, 1) for t in (mu, theta, c))
        hi = torch.maximum(m + 20 * (m + m ** 2 / th).sqrt(), torch.full_like(m, K + 1.5))
        edges = (K + 0.5) * (hi / (K + 0.5)) ** j
        k = (edges[:, 1:] * edges[:, :-1]).sqrt()
        logw = (torch.lgamma(k + th) - torch.lgamma(th) - torch.lgamma(k + 1) + th * torch.log(th / (th + m))
                + k * torch.log(m / (th + m)) + torch.log(edges[:, 1:] - edges[:, :-1]))
        w = torch.exp(logw - logw.max(-1, keepdim=True).values)
        out[a:a + chunk] = (w * torch.log1p(cc * k)).sum(-1) / w.sum(-1)
    return out
