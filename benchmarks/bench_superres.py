"""Benchmark for stage 4 (super-resolution). Writes the section "Stage 4" of benchmarks/RESULTS.md.

    python benchmarks/bench_superres.py                          # all slides, both protocols, both models
    python benchmarks/bench_superres.py --slides 151673 --models trihrge --protocols recovery

For each slide and protocol (recovery: a seeded random half of the spots hidden; pooling: 2x2
super-spots seen, every spot scored) the script scores, on the same split and the same genes
(top 250 by mean log-expression over what may be seen):
* the baselines: nearest observed location; Gaussian kernel with the bandwidth chosen by
  leave-one-out on the visible locations; the same kernel times an image-colour kernel (mean RGB of
  the spot patch; both bandwidths by leave-one-out), TESLA-like;
* the models (``train_superres.py``'s library entry, default config): TriHRGE and Diff-ST, with
  training time and prediction time.
DLPFC uses its low-resolution image (the only one here); her2st C2-C6 their full-resolution H&E.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchmarks.common import ROOT, SHARED, machine, table, write_section

SLIDES = {"151673": "dlpfc", "151674": "dlpfc", "C2": "her2st", "C3": "her2st", "C4": "her2st", "C5": "her2st",
          "C6": "her2st"}


def slide_overrides(sid: str) -> list[str]:
    if SLIDES[sid] == "dlpfc":
        return [f"data.path={SHARED / 'dlpfc' / sid}", "data.truth=null"]
    base = SHARED / "her2st"
    img = glob.glob(str(base / "images" / f"{sid}_*.jpg"))[0]
    return ["data.path=null", f"data.counts={base / 'counts' / (sid + '.tsv.gz')}",
            f"data.spots={base / 'spots' / (sid + '_selection.tsv')}", f"data.image={img}"]


def baselines(adata, cfg, protocol: str) -> list[dict]:
    from image_process.features import spot_diameter_fullres
    from image_process.patches import choose_image, extract_patches
    from pipeline.superres import (kernel_predict, loo_bandwidth, make_split, nearest_predict, scoring_genes,
                                   spots_as_locations, superres_scores)

    spots = spots_as_locations(adata, list(adata.var_names))
    split = make_split(spots, protocol, int(cfg["eval"]["seed"]))
    genes = list(adata.var_names)
    score = scoring_genes(split.context, genes, 250)
    gi = adata.var_names.get_indexer(score)
    ctx = split.context
    from pipeline.superres import Locations
    ctx = Locations(xy=ctx.xy, expr=ctx.expr[:, gi], spacing=ctx.spacing, array=ctx.array)
    truth = split.truth[:, gi]
    arr = spots.array[split.query_index] if spots.array is not None else None
    rows = []
    t = time.perf_counter()
    rows.append({"method": "nearest observed", **superres_scores(nearest_predict(ctx, split.queries_xy), truth, score, score, arr),
                 "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    bw, _ = loo_bandwidth(ctx)
    rows.append({"method": f"Gaussian kernel (h={bw / ctx.spacing:.2f} spacings, LOO)",
                 **superres_scores(kernel_predict(ctx, split.queries_xy, bw), truth, score, score, arr),
                 "seconds": time.perf_counter() - t})
    image = choose_image(adata, "auto")
    diam = spot_diameter_fullres(adata, cfg["image"])

    def colour(xy, size):
        p = extract_patches(image.pixels, xy * image.scale, max(2.0, size * image.scale), 8)
        return p.reshape(len(xy), -1, 3).mean(1) / 255.0

    t = time.perf_counter()
    ctx_size = diam * ctx.spacing / spots.spacing
    c_ctx, c_q = colour(ctx.xy, ctx_size), colour(split.queries_xy, diam)
    bw2, cbw = loo_bandwidth(ctx, colour=c_ctx, colour_candidates=[0.02, 0.05, 0.1, 0.2, 1e3])
    pred = kernel_predict(ctx, split.queries_xy, bw2, ctx_colour=c_ctx, dst_colour=c_q, colour_bw=cbw)
    rows.append({"method": f"Gaussian x colour kernel (h={bw2 / ctx.spacing:.2f}, h_c={cbw:g}, LOO)",
                 **superres_scores(pred, truth, score, score, arr), "seconds": time.perf_counter() - t})
    return rows


def run(slides, protocols, models, device="cpu") -> list[dict]:
    from pipeline.config import load_config
    from pipeline.slide import load_slide
    from train_superres import super_resolve

    rows = []
    for sid in slides:
        for protocol in protocols:
            cfg = load_config(ROOT / "configs" / "superres.yaml", slide_overrides(sid) + [f"eval.protocol={protocol}"])
            adata = load_slide(cfg)
            for r in baselines(adata, cfg, protocol):
                rows.append({"slide": sid, "protocol": protocol, **r})
                print(rows[-1], flush=True)
            for model in models:
                cfg_m = load_config(ROOT / "configs" / "superres.yaml",
                                    slide_overrides(sid) + [f"eval.protocol={protocol}", f"superres.model={model}"])
                res = super_resolve(adata, cfg_m, device, progress=False, grid=False)
                m = res["metrics"]
                rows.append({"slide": sid, "protocol": protocol, "method": model,
                             **{k: m[k] for k in ("pcc_all", "pcc_heg", "mse", "ssim", "n_genes")},
                             "seconds": m["seconds_train"] + m["seconds_predict"],
                             "train_s": m["seconds_train"], "predict_s": m["seconds_predict"]})
                print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="*", default=list(SLIDES))
    p.add_argument("--protocols", nargs="*", default=["recovery", "pooling"])
    p.add_argument("--models", nargs="*", default=["trihrge", "diffusion"])
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    slides = [s for s in args.slides if (SHARED / SLIDES[s]).exists()]
    rows = run(slides, args.protocols, args.models)
    body = table(rows, ["slide", "protocol", "method", "pcc_all", "pcc_heg", "mse", "ssim", "n_genes", "seconds",
                        "train_s", "predict_s"])
    print(body)
    if not args.no_write:
        cmd = "python benchmarks/bench_superres.py" + ("" if args.models == ["trihrge", "diffusion"] else
                                                       " --models " + " ".join(args.models))
        write_section("Stage 4: super-resolution (recovery and pooling protocols) - IN PROGRESS",
                      f"Machine: {machine()}.\nScript: `{cmd}`.\n\n"
                      "Stage 4 is not finished: these numbers show where it stands, not a result.\n"
                      + ("" if "diffusion" in args.models else
                         "Diff-ST is not in this table (run with `--models trihrge diffusion`; an earlier version took "
                         "about 6 minutes per DLPFC run on 2 cores, see DEVLOG item 7).\n") + "\n" + body)


if __name__ == "__main__":
    main()
