"""Diagnostic, not a method: how far spatial smoothing alone can go on the recovery protocol.

    python benchmarks/recovery_ceiling.py              # DLPFC 151673, 151674 (writes a RESULTS.md section)

The recovery protocol hides half of the spots; methods see only the other half. This oracle sees
*every other spot* (twice the density a method may see, the hidden spots' expression included):
a Gaussian kernel over all spots but the scored one, bandwidth by leave-one-out over all spots,
scored on the protocol's hidden spots with the protocol's genes; and the same for the low-rank
kernel (``pipeline.superres.low_rank_kernel``, the models' prior for recovery until DEVLOG item 45)
and the expression-guided kernel (``pipeline.superres.guided_kernel``, the prior since; with every
other spot it runs leave-one-out, so no spot's own expression reaches its estimate or any guide
used for it). It uses the scored spots' expression, so it is an upper reference for these
smoothers, never a result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_superres import slide_overrides  # noqa: E402
from benchmarks.common import ROOT, machine, table, write_section  # noqa: E402


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


def _brief(g) -> str:
    """h (spacings), guide axes, guide field (spacings), guide width, rank of a GuidedKernel."""
    return f"h {g.bandwidth:g}, axes {g.guide_pcs}, field {g.guide_field}, width {g.guide_width}, rank {g.rank}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", nargs="+", default=["151673", "151674"])
    args = ap.parse_args()
    rows = [ceiling(s) for s in args.slides]
    for r in rows:
        print(r, flush=True)
    body = "\n".join([
        f"Machine: {machine()}.", "",
        "Written by `benchmarks/recovery_ceiling.py`. Recovery protocol (seed 0), mean PCC-all over the "
        "protocol's 250 genes on its hidden spots. The oracle row sees the hidden spots' neighbours among "
        "the hidden half too (every spot but the scored one), which no method may: it uses scored "
        "expression and is a reference for what each smoother can reach, not a result (the first "
        "version of this table, with the Gaussian kernel only, was read as a ceiling for smoothing in "
        "general; the low-rank rows show it was not). Guided settings: spatial width h (spacings), guide "
        "axes, guide field width (spacings), guide width (guide-noise units), rank.", "",
        table(rows, list(rows[0].keys())), ""])
    write_section("Stage 4: recovery ceiling of spatial smoothing (diagnostic oracle)", body)


if __name__ == "__main__":
    main()
