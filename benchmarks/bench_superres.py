"""Benchmark for stage 4 (super-resolution). Writes the section "Stage 4" of benchmarks/RESULTS.md.

    python benchmarks/bench_superres.py                          # all slides, both protocols, all models
    python benchmarks/bench_superres.py --slides 151673 --models trihrge --protocols recovery
    python benchmarks/bench_superres.py --production-timing      # train_superres.py as a user runs it, timed
    python benchmarks/bench_superres.py --rewrite                # re-render the table from stage4_rows.json
    python benchmarks/bench_superres.py --isa --slides 151673 151674 --models trihrge   # full instruction set vs AVX2
    python benchmarks/bench_superres.py --python PATH --slides 151673 151674   # this interpreter vs another Python's venv
    python benchmarks/bench_superres.py --transfer               # a model trained on one slice, applied to the other

For each slide and protocol (recovery: a seeded random half of the spots hidden; pooling: 2x2
super-spots seen, every spot scored) the script scores, on the same split and the same genes
(top 250 by mean log-expression over what may be seen):
* the baselines: nearest observed location; Gaussian kernel with the bandwidth chosen by
  leave-one-out on the visible locations; the same kernel times an image-colour kernel (mean RGB of
  the spot patch; both bandwidths by leave-one-out), TESLA-like; for pooling also the models' first
  low-resolution candidate by itself, each spot's expected share of its nearest super-spot
  (``pipeline.superres.thinned_log_expression``), so the table shows what the learned parts add;
* the models (``train_superres.py``'s library entry, default config): TriHRGE and Diff-ST, each
  trained on the slide alone and (``+sections``) also on the dataset's other slides, with training
  time and prediction time.
DLPFC uses its low-resolution image (the only one here); her2st C2-C6 their full-resolution H&E.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchmarks.common import ROOT, SHARED, check_shared_data, commit_id, machine, table, write_section

ROWS_FILE = ROOT / "benchmarks" / "stage4_rows.json"

MODELS = ("trihrge", "trihrge+sections", "diffusion", "diffusion+sections")
COLUMNS = ["slide", "protocol", "method", "pcc_all", "pcc_heg", "mse", "ssim", "n_genes", "seconds", "train_s", "predict_s",
           "trained_on"]
SLIDES = {"151673": "dlpfc", "151674": "dlpfc", "C2": "her2st", "C3": "her2st", "C4": "her2st", "C5": "her2st",
          "C6": "her2st"}


def slide_spec(sid: str) -> dict:
    """The section spec (``data`` keys + name) of a DLPFC slice or a her2st section."""
    if SLIDES[sid] == "dlpfc":
        return {"path": str(SHARED / "dlpfc" / sid), "name": sid}
    from benchmarks.bench_predict import spec
    return spec(sid)


def spec_overrides(spec: dict) -> list[str]:
    """``--set`` overrides that point ``data`` at a section spec (and at no truth file)."""
    return ["data.path=null", "data.truth=null"] + [f"data.{k}={v}" for k, v in spec.items() if k != "name"]


def slide_overrides(sid: str) -> list[str]:
    return spec_overrides(slide_spec(sid))


def other_sections(sid: str) -> list[dict]:
    """The other slides of the same dataset (DLPFC: the other slice; her2st: the other C sections)."""
    return [slide_spec(s) for s in SLIDES if SLIDES[s] == SLIDES[sid] and s != sid and (SHARED / SLIDES[s]).exists()]


def baselines(adata, cfg, protocol: str) -> list[dict]:
    from image_process.features import spot_diameter_fullres
    from image_process.patches import choose_image, extract_patches
    from pipeline.superres import (SHARE_BANDWIDTH, kernel_predict, loo_bandwidth, make_split, nearest_predict,
                                   scoring_genes, spots_as_locations, superres_scores, take, thinned_log_expression)

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
    if split.pairs == "coarsen":
        # not one of the issue's baselines: the models' first low-resolution candidate by itself
        t = time.perf_counter()
        pred = thinned_log_expression(take(split.context, genes=gi), split.queries_xy)
        rows.append({"method": f"thinned share of the nearest super-spot (h={SHARE_BANDWIDTH} spacings)",
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
            for method in models:
                model, _, sections = method.partition("+")
                extra = [f"train.sections={json.dumps(other_sections(sid))}"] if sections else []
                cfg_m = load_config(ROOT / "configs" / "superres.yaml",
                                    slide_overrides(sid) + [f"eval.protocol={protocol}", f"model.name={model}"] + extra)
                res = super_resolve(adata, cfg_m, device, progress=False, grid=False)
                m = res["metrics"]
                rows.append({"slide": sid, "protocol": protocol, "method": method,
                             **{k: m[k] for k in ("pcc_all", "pcc_heg", "mse", "ssim", "n_genes")},
                             "seconds": m["seconds_train"] + m["seconds_predict"],
                             "train_s": m["seconds_train"], "predict_s": m["seconds_predict"],
                             "trained_on": "+".join(m["training_pairs"])})
                print(rows[-1], flush=True)
    return rows


FULL_SUFFIX = "-full"   # timing slide "151673-full": benchmarks.common.write_fullsize_visium of 151673
FULLRES_SUFFIX = "-fullres"   # "151673-fullres": the same folder with a 13,332 px full-resolution JPEG (data.image)


def timing_slide_id(slide: str) -> str:
    """The shared slide behind a timing slide's name ("151673-fullres" -> "151673")."""
    return slide.removesuffix(FULLRES_SUFFIX).removesuffix(FULL_SUFFIX)


def production_timing(models, slide: str = "151673", repeats: int = 1, versus: str | None = None) -> list[dict]:
    """``train_superres.py`` as a user runs it (no protocol: train on the slide, predict the x2 grid),
    wall time and peak memory of the whole process. ``slide`` may be "<DLPFC id>-full": the slice
    rewritten as a full-width Space Ranger folder with a 2000 px hires image (33,538 features), or
    "<DLPFC id>-fullres": that folder given a full-resolution ``data.image`` (its hires PNG upsampled to
    the 13,332 px its scale factor implies, a JPEG of quality 90: the size of the slide's real scan,
    with no new detail), so that patches are cut from a full-resolution image as for a real scan.
    With ``repeats`` > 1 each run is repeated (models interleaved) and the row gives the median run
    (by wall time) with the range of the wall times: on this machine one run varies by ~+-7%, and its
    speed drifts by ~10% over an hour. ``versus`` (a git revision): each run is followed by the same run
    of that revision's code (a temporary git worktree), so that the two are compared under the same
    drift; the rows then carry ``code`` ("this" or the revision)."""
    import tempfile

    from benchmarks.common import revision_code, run_measured, write_fullres_images, write_fullsize_visium

    rows = []
    with tempfile.TemporaryDirectory() as tmp, revision_code(versus, tmp) as versus_root:
        codes = {"this": ROOT, **({versus: versus_root} if versus else {})}
        if slide.endswith((FULL_SUFFIX, FULLRES_SUFFIX)):   # the DLPFC slice as a full-width Space Ranger folder
            folder = Path(tmp) / slide
            write_fullsize_visium(SHARED / "dlpfc" / timing_slide_id(slide), folder)
            overrides = [f"data.path={folder}", "data.truth=null"]
            if slide.endswith(FULLRES_SUFFIX):
                image = Path(tmp) / "fullres.jpg"
                write_fullres_images(folder, {image: None})
                overrides.append(f"data.image={image}")
        else:
            overrides = slide_overrides(slide)
        runs = {(code, model): [] for model in models for code in codes}
        for _ in range(max(1, int(repeats))):
            for model in models:
                for code, root in codes.items():
                    out = Path(tmp) / f"out_{model}"
                    args = ["train_superres.py", "--config", "configs/superres.yaml", "--out", out, "--force",
                            "--set", f"model.name={model}"] + [a for o in overrides for a in ("--set", o)]
                    r = run_measured(args, cwd=root)
                    m = json.loads((out / "metrics.json").read_text())
                    runs[code, model].append({"slide": slide, "model": model, "code": code, "wall_s": r["wall_s"],
                                              "peak_gb": r["peak_gb"], "train_s": m["seconds_train"],
                                              "grid_s": m["seconds_predict_grid"], "n_grid": m["n_grid"],
                                              "patch_cnn": bool(m.get("patch_cnn"))})
                    print(runs[code, model][-1], flush=True)
        for rs in runs.values():
            row = dict(sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2])      # the median run
            walls = [r["wall_s"] for r in rs]
            row["runs"] = len(rs)
            row["wall_range"] = f"{min(walls):.0f}-{max(walls):.0f}" if len(rs) > 1 else ""
            row["walls"] = " / ".join(f"{w:.0f}" for w in walls)
            if not versus:
                row.pop("code")
            rows.append(row)
    return rows


REGRID_SECTION = "Stage 4: a new superres.factor predicted with the saved model vs a full rerun"


def regrid_timing(models, slide: str = "151673", factors=(2, 3)) -> list[dict]:
    """What ``04_model.pt`` saves a user who changes only ``superres.factor``: ``train_superres.py`` (no
    protocol) at ``factors[0]`` in one folder, then at ``factors[1]`` in the same folder (the new grid
    predicted with the saved model), against a full run at ``factors[1]`` in a fresh folder; wall time and
    peak memory of each whole process, and the largest difference between the two grids' predictions."""
    import tempfile

    import anndata as ad

    from benchmarks.common import run_measured

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            def train(out, factor, *extra):
                args = ["train_superres.py", "--config", "configs/superres.yaml", "--out", out, "--set",
                        f"model.name={model}", "--set", f"superres.factor={factor}", *extra] + \
                       [a for o in slide_overrides(slide) for a in ("--set", o)]
                r = run_measured(args, cwd=ROOT)
                return r, json.loads((Path(out) / "metrics.json").read_text())
            first, again = Path(tmp) / f"{model}_saved", Path(tmp) / f"{model}_full"
            r0, _ = train(first, factors[0], "--force")
            r1, m1 = train(first, factors[1])
            r2, m2 = train(again, factors[1], "--force")
            if not m1.get("grid_from_saved_model"):
                raise RuntimeError(f"{model}: the second run retrained instead of using the saved model")
            a, b = (ad.read_h5ad(d / "04_superres.h5ad") for d in (first, again))
            same_grid = a.n_obs == b.n_obs and np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
            new = f"x{factors[1]}"
            rows.append({"slide": slide, "model": model, f"x{factors[0]}_trained_wall_s": r0["wall_s"],
                         f"{new}_from_saved_wall_s": r1["wall_s"], f"{new}_full_rerun_wall_s": r2["wall_s"],
                         "peak_gb_from_saved": r1["peak_gb"], "peak_gb_full": r2["peak_gb"], "n_grid": m2["n_grid"],
                         "same_locations": same_grid,
                         "max_abs_diff": float(np.abs(np.asarray(a.X) - np.asarray(b.X)).max()) if same_grid else None})
            print(rows[-1], flush=True)
    return rows


TRANSFER_SECTION = "Stage 4: a saved model applied to another slide (superres.model_file) vs training there"


def transfer_runs(pairs=(("151674", "151673"), ("151673", "151674")), protocols=("pooling", "recovery"),
                  model: str = "trihrge") -> list[dict]:
    """``superres.model_file`` measured: for each (source, target) slide and protocol, TriHRGE trained on the
    whole source slide (the protocol's task: no protocol for pooling, recovery for recovery; genes: the
    target's scored genes under the protocol, top 250 by mean over what the target's model may see, that the
    source has too; for recovery with the source's own scored genes cut to one, since they join the modelled
    genes and the target may lack them), then the target scored under the protocol with that model (no
    training there) and with the shipped run that trains on the target; both scored on the same genes and
    spots. Nothing is chosen."""
    import tempfile

    import anndata as ad

    from benchmarks.common import run_measured
    from data.readers import read_slide
    from pipeline.superres import make_split, scoring_genes, spots_as_locations, superres_scores

    def stage4(out, sid, *sets):
        args = ["train_superres.py", "--config", "configs/superres.yaml", "--out", out, "--force", "--set",
                f"model.name={model}", *[a for o in [*slide_overrides(sid), *sets] for a in ("--set", o)]]
        r = run_measured(args, cwd=ROOT)
        return r, json.loads((Path(out) / "metrics.json").read_text())["superres"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src, dst in pairs:
            target = read_slide(slide_spec(dst))
            source_genes = set(read_slide(slide_spec(src)).var_names)
            for protocol in protocols:
                probe = spots_as_locations(target, list(target.var_names), with_expr=False)
                visible = make_split(probe, protocol, 0).context
                genes = [g for g in scoring_genes(visible, list(target.var_names)) if g in source_genes]
                trained = Path(tmp) / f"{src}_{protocol}"
                r_src, _ = stage4(trained, src, "superres.genes=[" + ", ".join(genes) + "]",
                                  # recovery trains on the source's visible half; its own scored genes, which
                                  # join the modelled ones, cut to the one highest-mean gene (not used here)
                                  *(["eval.protocol=recovery", "eval.n_score_genes=1"] if protocol == "recovery"
                                    else []))
                scores = {}
                for how, extra in (("trained on the target", []),
                                   ("source's model", [f"superres.model_file={trained / '04_model.pt'}"])):
                    out = Path(tmp) / f"{dst}_{protocol}_{len(scores)}"
                    r, m = stage4(out, dst, f"eval.protocol={protocol}", *extra)
                    ev = ad.read_h5ad(out / "04_eval.h5ad")
                    got = superres_scores(np.asarray(ev.X), np.asarray(ev.layers["measured"]), list(ev.var_names),
                                          genes)
                    scores[how] = (got, r["wall_s"], m)
                (own, own_s, own_m), (moved, moved_s, moved_m) = scores.values()
                rows.append({"target": dst, "protocol": protocol, "model from": src, "n_genes": len(genes),
                             "pcc_all trained on target": round(own["pcc_all"], 4),
                             "pcc_all source's model": round(moved["pcc_all"], 4),
                             "pcc_heg trained / source's": f"{own['pcc_heg']:.4f} / {moved['pcc_heg']:.4f}",
                             "wall_s trained on target": round(own_s, 1), "wall_s source's model": round(moved_s, 1),
                             "wall_s training the source": round(r_src["wall_s"], 1),
                             "train_s on target / with model": f"{own_m['seconds_train']:.1f} / "
                                                               f"{moved_m['seconds_train']:.1f}"})
                print(rows[-1], flush=True)
    return rows


ISA_SECTION = ("Stage 4: the same runs on this CPU's full instruction set and limited to AVX2 "
               "(floating-point sensitivity, no choice)")


PYTHON_SECTION = "Stage 4: the same runs with another Python's library set (no choice)"


def compared_runs(slides, protocols, models, other_python: str | None = None) -> list[dict]:
    """Each (slide, protocol, model) run twice by ``train_superres.py`` with the shipped config and
    ``eval.protocol``. Without ``other_python``: on the CPU's full instruction set and with the math libraries
    limited to AVX2 (:func:`benchmarks.common.avx2_children`), so only the rounding differs, as between
    machines (empty on a CPU without AVX-512). With it: under this interpreter and under ``other_python``
    (its own library versions). Same code, inputs, split and seeds. Rows: the scores of both runs."""
    import tempfile

    from benchmarks.common import avx2_children, run_measured

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sid in slides:
            for protocol in protocols:
                for method in models:
                    model, _, sections = method.partition("+")
                    overrides = slide_overrides(sid) + [f"eval.protocol={protocol}", f"model.name={model}"] + \
                        ([f"train.sections={json.dumps(other_sections(sid))}"] if sections else [])
                    scores = {}
                    runs = ("this", "other") if other_python else ("full", "AVX2")
                    for which in runs:
                        out = Path(tmp) / f"{sid}_{protocol}_{method}_{which}"
                        args = ["train_superres.py", "--config", "configs/superres.yaml", "--out", out] + \
                            [a for o in overrides for a in ("--set", o)]
                        if which in ("full", "this"):
                            run_measured(args)
                        elif which == "other":
                            run_measured(args, python=other_python)
                        else:
                            with avx2_children() as note:
                                if note is None:
                                    return []
                                run_measured(args)
                        scores[which] = json.loads((out / "metrics.json").read_text())["superres"]
                    rows.append({"slide": sid, "protocol": protocol, "method": method,
                                 **{f"{k} ({which})": scores[which][k] for k in ("pcc_all", "pcc_heg", "mse")
                                    for which in runs}})
                    print(rows[-1], flush=True)
    return rows


def merge_rows(new: list[dict], commit: str) -> list[dict]:
    """Rows kept in ROWS_FILE across runs (a run may cover only some slides or methods); each row
    records the commit that measured it."""
    old = json.loads(ROWS_FILE.read_text()) if ROWS_FILE.exists() else []
    key = lambda r: (r["slide"], r["protocol"], r["method"])   # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(dict(r, commit=commit)): dict(r, commit=commit) for r in new})
    order = {s: i for i, s in enumerate(SLIDES)}
    rows = sorted(merged.values(), key=lambda r: (order[r["slide"]], r["protocol"] != "recovery", method_rank(r["method"])))
    ROWS_FILE.write_text(json.dumps(rows, indent=1))
    return rows


def method_rank(method: str) -> int:
    for i, prefix in enumerate(("nearest", "Gaussian kernel", "Gaussian x", "thinned share", "trihrge", "trihrge+sections",
                                "diffusion", "diffusion+sections")):
        if method == prefix or (i < 4 and method.startswith(prefix)):
            return i
    return 99


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="*", default=list(SLIDES))
    p.add_argument("--protocols", nargs="*", default=["recovery", "pooling"])
    p.add_argument("--models", nargs="*", default=list(MODELS),
                   help="any of " + " ".join(MODELS) + " ('+sections': also trained on the dataset's other slides)")
    p.add_argument("--production-timing", nargs="*", default=None, metavar="MODEL",
                   help="instead: time train_superres.py (train + x2 grid) on 151673 for these models")
    p.add_argument("--timing-slides", nargs="*", default=["151673", "C3", "151673" + FULL_SUFFIX],
                   help="slides for --production-timing (DLPFC: 600 px lowres image; her2st: full-resolution H&E; "
                        "151673-full: 151673 as a full-width Space Ranger folder with a 2000 px hires image; "
                        "151673-fullres: that folder with a 13,332 px full-resolution JPEG as data.image)")
    p.add_argument("--repeats", type=int, default=1,
                   help="--production-timing: runs per slide and model (the median is reported, with the range)")
    p.add_argument("--versus", default=None, metavar="REV",
                   help="--production-timing: alternate every run with the same run of this git revision's code "
                        "(a temporary worktree), to compare code under the machine's drift")
    p.add_argument("--workers", type=int, default=None,
                   help="--production-timing: worker processes for patch features (sets STPIPE_WORKERS; 1 = none)")
    p.add_argument("--avx2", action="store_true",
                   help="--production-timing: limit the timed runs to AVX2 instructions on an AVX-512 machine "
                        "(benchmarks.common.limit_to_avx2: the instruction set of an AVX2-only CPU, not its speed)")
    p.add_argument("--isa", action="store_true",
                   help="instead: run --slides/--protocols/--models (default trihrge) with train_superres.py on the "
                        "full instruction set and limited to AVX2, and report both runs' scores (rounding only)")
    p.add_argument("--python", default=None, metavar="PATH",
                   help="instead: run --slides/--protocols/--models (default trihrge) with train_superres.py under this "
                        "interpreter and under PATH (another Python's venv, with its own library versions)")
    p.add_argument("--regrid-timing", nargs="*", default=None, metavar="MODEL",
                   help="time a new superres.factor predicted with the saved model against a full rerun "
                        "(default models: trihrge diffusion; slide: the first of --timing-slides)")
    p.add_argument("--transfer", action="store_true",
                   help="instead: TriHRGE trained on one DLPFC slice and applied to the other (superres.model_file) "
                        "against training on it, both protocols, the same genes")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--rewrite", action="store_true", help="only re-render the stage-4 table from stage4_rows.json")
    args = p.parse_args()
    if args.rewrite:
        write_rows_section(json.loads(ROWS_FILE.read_text()), last_run_machine())   # re-rendered, not rerun
        return
    check_shared_data()
    measured_on, commit = machine(), commit_id()    # the code as it is when the runs start (the tree may change later)
    if args.transfer:
        rows = transfer_runs()
        body = table(rows, list(rows[0]))
        print(body)
        if not args.no_write:
            write_section(TRANSFER_SECTION, f"Machine: {measured_on}.\nScript: `python benchmarks/bench_superres.py "
                          "--transfer`.\n\nTriHRGE (shipped settings) trained on the whole source slice, then the "
                          "target slice scored under the protocol with that model (`superres.model_file`, no training "
                          "on the target) and by the shipped run that trains on the target's visible spots. Genes: the "
                          "protocol's scored genes of the target (top 250 by mean over what its model may see) that "
                          "the source slice has too (DLPFC's slices here hold different gene subsets); the source's "
                          "model is trained on exactly those (`superres.genes`). Both rows are scored on those genes "
                          "and the same spots. wall_s: whole processes (reading, training or not, predicting the "
                          "scored spots and the x2 grid, writing). A measurement of an option, not a choice: the "
                          "shipped run and its RESULTS rows are unchanged.\n\n" + body)
        return
    if args.regrid_timing is not None:
        models = args.regrid_timing or ["trihrge", "diffusion"]
        slide = timing_slide_id(args.timing_slides[0])
        rows = regrid_timing(models, slide)
        body = table(rows, list(rows[0]))
        print(body)
        if not args.no_write:
            write_section(REGRID_SECTION, f"Machine: {measured_on}.\nScript: `python benchmarks/bench_superres.py "
                          f"--regrid-timing {' '.join(models)} --timing-slides {slide}`.\n\n`train_superres.py` with "
                          "the shipped config and no protocol, three whole processes per model: trained at x2; then "
                          "x3 in the same --out, where only superres.factor changed, so the grid is predicted with "
                          "the saved 04_model.pt; and a full x3 run in a fresh --out. max_abs_diff: the largest "
                          "difference between the two x3 grids' predictions (log1p(CP10k)). One run each.\n\n" + body)
        return
    if args.production_timing is not None:
        if args.workers is not None:
            import os

            from image_process.process_pool import WORKERS_ENV
            os.environ[WORKERS_ENV] = str(args.workers)     # inherited by the timed train_superres.py
        if args.avx2:
            from benchmarks.common import limit_to_avx2
            measured_on += f" ({limit_to_avx2()})"
        rows = [r for sid in args.timing_slides if (SHARED / SLIDES[timing_slide_id(sid)]).exists()
                for r in production_timing(args.production_timing or ["trihrge", "diffusion"], sid, args.repeats,
                                           args.versus)]
        body = table(rows, (["code"] if args.versus else []) +
                     ["slide", "model", "wall_s", "peak_gb", "train_s", "grid_s", "n_grid", "patch_cnn", "runs",
                      "wall_range"] + (["walls"] if args.versus else []))
        print(body)
        if not args.no_write:
            title = "Stage 4: production run time (train_superres.py, no protocol)"
            script = "python benchmarks/bench_superres.py --production-timing"
            if args.repeats > 1 or args.workers is not None or args.versus or args.avx2:   # own section: the single-run table stays
                title += (f", this code vs {args.versus} (alternating runs)" if args.versus else ", repeated runs") \
                    + (f", {args.workers} worker process(es)" if args.workers is not None else "") \
                    + (", limited to AVX2" if args.avx2 else "")
                script += (f" {' '.join(args.production_timing)} --timing-slides {' '.join(args.timing_slides)}"
                           f" --repeats {args.repeats}" + (f" --workers {args.workers}" if args.workers is not None else "")
                           + (f" --versus {args.versus}" if args.versus else "") + (" --avx2" if args.avx2 else ""))
            write_section(title,
                          f"Machine: {measured_on}.\nScript: `{script}`.\n"
                          "Whole process: reading the slide, training on it, predicting the x2 grid over the tissue, "
                          "writing the outputs. patch_cnn: whether the low-res base had the patch-CNN candidate "
                          "(auto: on with a full-resolution H&E, off with DLPFC's 600 px image). peak_gb: the process's RSS, and while it has forked workers (patch features, from 454d7a5) the PSS summed over the process tree (`benchmarks.common.run_measured`).\n\n" + body)
        return
    slides = [s for s in args.slides if (SHARED / SLIDES[s]).exists()]
    if args.isa or args.python:
        from benchmarks.common import interpreters_line

        models = args.models if "--models" in sys.argv else ["trihrge"]
        rows = compared_runs(slides, args.protocols, models, other_python=args.python)
        body = table(rows, list(rows[0])) if rows else "This CPU has no AVX-512: nothing to compare."
        print(body)
        if not args.no_write:
            script = (f"python benchmarks/bench_superres.py {f'--python {args.python}' if args.python else '--isa'} "
                      f"--slides {' '.join(slides)} --protocols {' '.join(args.protocols)} --models {' '.join(models)}")
            how = (f"{interpreters_line(args.python)}\n\n`train_superres.py` with the shipped config and "
                   "`eval.protocol`, run under each interpreter. Same code, inputs, split and seeds: how far a score "
                   "can move with another Python's library set." if args.python else
                   "`train_superres.py` with the shipped config and `eval.protocol`, run twice: on the CPU's full "
                   "instruction set and with torch, NumPy, OpenBLAS and OpenCV limited to AVX2 (as on a CPU without "
                   "AVX-512). Same code, inputs, split and seeds: how far a score can move on another CPU.")
            write_section(PYTHON_SECTION if args.python else ISA_SECTION,
                          f"Machine: {measured_on}.\nScript: `{script}`.\n\n{how} Not a choice of anything.\n\n" + body)
        return
    rows = run(slides, args.protocols, args.models)
    print(table(rows, COLUMNS))
    if not args.no_write:
        write_rows_section(merge_rows(rows, commit), measured_on)


ROWS_SECTION = "Stage 4: super-resolution (recovery and pooling protocols)"


def last_run_machine() -> str:
    """The machine line of the last run as RESULTS.md records it (for --rewrite, which runs nothing)."""
    import re

    from benchmarks.common import RESULTS
    m = re.search(rf"^## {re.escape(ROWS_SECTION)}\n.*?the last run: (.*?)\. `\+sections`", RESULTS.read_text(),
                  re.S | re.M) if RESULTS.exists() else None
    return m.group(1) if m else "unknown"


def write_rows_section(rows: list[dict], last_run: str | None = None) -> None:
    """The stage-4 table from ``rows``; ``last_run``: the machine line of the run that produced the
    newest rows (default: this machine, now)."""
    write_section(ROWS_SECTION,
                  "Script: `python benchmarks/bench_superres.py` (rows are kept in `benchmarks/stage4_rows.json`; "
                  "a run with `--slides`/`--models`/`--protocols` replaces only its own rows). Each row names the "
                  f"commit that measured it; the last run: {last_run or machine()}. `+sections`: also trained on the dataset's other slides "
                  "(DLPFC: the other slice; her2st: the other four C sections), posed the same task; the scored "
                  "slide's hidden spots stay hidden. From commit b59dc10 the models' low-res base has a patch CNN "
                  "trained here as one more candidate (`superres.patch_cnn`, DEVLOG 39-40); with `use: auto` it is "
                  "on for her2st's full-resolution H&E and off for DLPFC's 600 px image, so the DLPFC pooling model "
                  "rows (older commits) are what the current code computes there too. The recovery prior changed "
                  "twice (queries between spots only, pooling untouched): a low-rank kernel from eef8dec (DEVLOG 42), "
                  "an expression-guided low-rank kernel from 5616d6b (DEVLOG 45-46).\n\n" + table(rows, COLUMNS + ["commit"]))


if __name__ == "__main__":
    main()
