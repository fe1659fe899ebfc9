"""Diagnostic, not a method: how far spatial smoothing alone can go on the recovery protocol.

    python benchmarks/recovery_ceiling.py              # DLPFC 151673, 151674 (writes a RESULTS.md section)
    python benchmarks/recovery_ceiling.py --noise      # measurement-noise ceiling of recovery, all slides

The smoothing oracle:

The recovery protocol hides half of the spots; methods see only the other half. This oracle sees
*every other spot* (twice the density a method may see, the hidden spots' expression included):
a Gaussian kernel over all spots but the scored one, bandwidth by leave-one-out over all spots,
scored on the protocol's hidden spots with the protocol's genes; and the same for the low-rank
kernel (``pipeline.superres.low_rank_kernel``, the models' prior for recovery until DEVLOG item 45)
and the expression-guided kernel (``pipeline.superres.guided_kernel``, the prior since; with every
other spot it runs leave-one-out, so no spot's own expression reaches its estimate or any guide
used for it). It uses the scored spots' expression, so it is an upper reference for these
smoothers, never a result.

The measurement-noise ceiling (``--noise``, recovery only): a hidden spot's value is one noisy
measurement, so even a prediction that knew each spot's expected expression exactly would not
correlate perfectly with it. Each hidden spot's counts are split binomially 50/50 into halves A and
B (independent given the spot's expected counts under Poisson sampling), both log-normalised at half
the library size; per gene, r = corr(A, B) over the hidden spots is the reliability of a half-depth
measurement, so sqrt(r) is the exact ceiling for half-depth values and a lower bound for the real,
full-depth ones; sqrt(2r / (1 + r)) (Spearman-Brown) estimates the full-depth ceiling (averaged over
5 splits). A simulated slide where the exact ceiling is known (:func:`simulated_check`, last row of
the table) shows whether the two bracket it. Spot-to-spot biological variation counts as signal, so these are bounds,
not targets. Pooling has no such ceiling: its super-spots contain the scored spot's own counts.
It describes the data only; nothing is chosen by it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_superres import SLIDES, slide_overrides  # noqa: E402
from benchmarks.common import ROOT, check_shared_data, machine, table, write_section  # noqa: E402


def ceiling(sid: str) -> dict:
    from pipeline import superres as S
    from pipeline.config import load_config
    from pipeline.slide import load_slide

    cfg = load_config(ROOT / "configs" / "superres.yaml", slide_overrides(sid) + ["eval.protocol=recovery"])
    adata = load_slide(cfg)
    spots = S.spots_as_locations(adata, list(adata.var_names))
    split = S.make_split(spots, "recovery", int(cfg["eval"]["seed"]))
    score = S.scoring_genes(split.context, list(adata.var_names), 250)
    gi = adata.var_names.get_indexer(score)
    everyone = S.Locations(xy=spots.xy, expr=spots.expr[:, gi], spacing=spots.spacing, array=spots.array)
    visible = S.Locations(xy=split.context.xy, expr=split.context.expr[:, gi], spacing=split.context.spacing,
                          array=split.context.array)
    truth = split.truth[:, gi]
    bw_all, _ = S.loo_bandwidth(everyone)
    oracle = S.kernel_predict(everyone, spots.xy, bw_all, exclude_self=True)[split.query_index]
    bw_vis, _ = S.loo_bandwidth(visible)
    method = S.kernel_predict(visible, split.queries_xy, bw_vis)
    low_vis, k_vis = S.low_rank_kernel(visible, split.queries_xy, bw_vis, S.standardiser(visible.expr))
    low_all, k_all = S.low_rank_kernel(everyone, spots.xy, bw_all, S.standardiser(everyone.expr), exclude_self=True)
    guided_vis, g_vis = S.guided_kernel(visible, split.queries_xy, S.standardiser(visible.expr))
    guided_all, g_all = S.guided_kernel(everyone, spots.xy, S.standardiser(everyone.expr), exclude_self=True)
    pcc = lambda p: S.superres_scores(p, truth, score, score)["pcc_all"]   # noqa: E731
    return {"slide": sid,
            "kernel, visible half (baseline)": pcc(method),
            "kernel, every other spot (oracle)": pcc(oracle),
            "oracle bandwidth (spacings)": float(bw_all / spots.spacing),
            "low-rank kernel, visible half": pcc(low_vis), "rank": k_vis,
            "low-rank kernel, every other spot (oracle)": pcc(low_all[split.query_index]), "oracle rank": k_all,
            "guided kernel, visible half (models' prior)": pcc(guided_vis),
            "guided kernel, every other spot (oracle)": pcc(guided_all[split.query_index]),
            "guided settings (visible / oracle)": f"{_brief(g_vis)} / {_brief(g_all)}"}


def noise_ceiling(sid: str, protocol: str, n_splits: int = 5) -> dict:
    """Ceiling of PCC-all under ``protocol`` set by the scored spots' own counting noise (module docstring)."""
    import numpy as np
    import scipy.sparse as sp

    from pipeline import superres as S
    from pipeline.config import load_config
    from pipeline.slide import load_slide

    cfg = load_config(ROOT / "configs" / "superres.yaml", slide_overrides(sid) + [f"eval.protocol={protocol}"])
    adata = load_slide(cfg)
    spots = S.spots_as_locations(adata, list(adata.var_names), with_expr=False)
    split = S.make_split(spots, protocol, int(cfg["eval"]["seed"]))
    score = S.scoring_genes(split.context, list(adata.var_names), int(cfg["eval"]["n_score_genes"]))
    gi = adata.var_names.get_indexer(score)
    counts = sp.csr_matrix(adata.X)[split.query_index][:, gi].toarray().astype(np.int64)
    r = split_half_reliability(counts, spots.totals[split.query_index], np.random.default_rng(0), n_splits)
    lower, upper = np.sqrt(r), np.sqrt(2 * r / (1 + r))     # half-depth ceiling; Spearman-Brown to full depth
    return _bounds_row(sid, protocol, counts, r, f"{lower[:50].mean():.3f} / {upper[:50].mean():.3f}")


def _pcc(p, t):
    """Per-column Pearson correlation of (n, g) arrays."""
    import numpy as np
    p, t = p - p.mean(0), t - t.mean(0)
    return (p * t).sum(0) / np.sqrt((p ** 2).sum(0) * (t ** 2).sum(0) + 1e-12)


def split_half_reliability(counts, library, rng, n_splits: int):
    """Per gene, the mean over ``n_splits`` binomial 50/50 splits of ``counts`` (n, g) of the
    correlation (clipped to [0, 1]) between the two halves, each log-normalised at half ``library``."""
    import numpy as np

    from pipeline.preprocess import lognormalize
    rs = []
    for _ in range(n_splits):
        a = rng.binomial(counts, 0.5)
        rs.append(np.clip(_pcc(lognormalize(a, library / 2), lognormalize(counts - a, library / 2)), 0, 1))
    return np.mean(rs, axis=0)


def _bounds_row(slide: str, protocol: str, counts, r, last: str) -> dict:
    import numpy as np
    return {"slide": slide, "protocol": protocol, "scored spots": int(len(counts)), "genes": int(counts.shape[1]),
            "half-depth reliability (mean r)": float(r.mean()),
            "PCC-all ceiling, lower (sqrt r)": float(np.sqrt(r).mean()),
            "PCC-all ceiling, Spearman-Brown": float(np.sqrt(2 * r / (1 + r)).mean()),
            "PCC-heg ceiling, lower / Spearman-Brown": last}


def simulated_check(sid: str = "151673", n_splits: int = 5) -> dict:
    """The two bounds against the exact ceiling where it is known: Poisson counts drawn around a
    smooth map (the slide's 250 top genes kernel-smoothed, times gamma(5, 1/5) spot noise) at the
    slide's library sizes; exact ceiling = PCC of the measured values with their expectation
    (200 Monte-Carlo draws), per gene, averaged."""
    import numpy as np
    import scipy.sparse as sp

    from pipeline import superres as S
    from pipeline.config import load_config
    from pipeline.preprocess import lognormalize
    from pipeline.slide import load_slide

    adata = load_slide(load_config(ROOT / "configs" / "superres.yaml", slide_overrides(sid)))
    spots = S.spots_as_locations(adata, list(adata.var_names), with_expr=False)
    gi = adata.var_names.get_indexer(S.scoring_genes(spots, list(adata.var_names), 250))
    L = spots.totals
    share = sp.csr_matrix(adata.X)[:, gi].toarray() / L[:, None]
    smooth = S.kernel_predict(S.Locations(xy=spots.xy, expr=share, spacing=spots.spacing, array=None), spots.xy,
                              spots.spacing)
    rng = np.random.default_rng(1)
    mu = np.maximum(smooth, 0) * rng.gamma(5, 1 / 5, smooth.shape) * L[:, None]
    counts = rng.poisson(mu)

    expected = np.mean([lognormalize(rng.poisson(mu), L) for _ in range(200)], axis=0)
    exact = _pcc(expected, lognormalize(counts, L))
    r = split_half_reliability(counts, L, rng, n_splits)
    return _bounds_row(f"simulated on {sid}", "all spots", counts, r, f"exact ceiling {exact.mean():.3f}")


def _brief(g) -> str:
    """h (spacings), guide axes, guide field (spacings), guide width, rank of a GuidedKernel."""
    return f"h {g.bandwidth:g}, axes {g.guide_pcs}, field {g.guide_field}, width {g.guide_width}, rank {g.rank}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", nargs="+", default=["151673", "151674"])
    ap.add_argument("--noise", action="store_true", help="the measurement-noise ceiling instead (every slide by default)")
    args = ap.parse_args()
    check_shared_data()
    measured_on = machine()     # the code when the runs start, not when the table is written
    if args.noise:
        return main_noise(args.slides if args.slides != ["151673", "151674"] else list(SLIDES), measured_on)
    _write("Stage 4: recovery ceiling of spatial smoothing (diagnostic oracle)", [ceiling(s) for s in args.slides], measured_on, (
        "Written by `benchmarks/recovery_ceiling.py`. Recovery protocol (seed 0), mean PCC-all over the "
        "protocol's 250 genes on its hidden spots. The oracle row sees the hidden spots' neighbours among "
        "the hidden half too (every spot but the scored one), which no method may: it uses scored "
        "expression and is a reference for what each smoother can reach, not a result (the first "
        "version of this table, with the Gaussian kernel only, was read as a ceiling for smoothing in "
        "general; the low-rank rows show it was not). Guided settings: spatial width h (spacings), guide "
        "axes, guide field width (spacings), guide width (guide-noise units), rank."))


def _write(title: str, rows: list, measured_on: str, prose: str) -> None:
    for r in rows:
        print(r, flush=True)
    write_section(title, "\n".join([f"Machine: {measured_on}.", "", prose, "", table(rows, list(rows[0].keys())), ""]))


def main_noise(slides, measured_on: str):
    _write("Stage 4: measurement-noise ceiling of recovery scores (diagnostic)",
           [noise_ceiling(s, "recovery") for s in slides] + [simulated_check()], measured_on, (
        "Written by `python benchmarks/recovery_ceiling.py --noise` (see its docstring). "
        "Recovery protocol (seed 0), its hidden spots and 250 scored genes. Each hidden spot's counts split "
        "binomially 50/50 (5 splits); per gene the split-half correlation r of the two half-depth maps. "
        "sqrt(r): the exact ceiling of PCC for half-depth values, a lower bound for the full-depth ones; "
        "sqrt(2r/(1+r)) (Spearman-Brown): an estimate of the full-depth ceiling. The last row checks both "
        "on simulated counts where the exact ceiling is known (its last column). The highest PCC-all any "
        "prediction can reach given the hidden spots' counting noise lies near or between the two. Biological spot-to-spot "
        "variation counts as signal here. A diagnostic that uses the scored spots' counts: nothing is "
        "chosen by it. Pooling has no such ceiling (a super-spot holds the scored spot's own counts)."))


if __name__ == "__main__":
    main()
