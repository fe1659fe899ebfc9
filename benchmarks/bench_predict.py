"""Benchmark for stage 5 (expression from the H&E image). Writes the section "Stage 5" of RESULTS.md.

    python benchmarks/bench_predict.py                       # her2st C2-C6 and MOB1-3 folds, whole-slide memory
    python benchmarks/bench_predict.py --groups mob --no-wsi
    python benchmarks/bench_predict.py --isa --groups mob      # full instruction set vs AVX2 (rounding only)
    python benchmarks/bench_predict.py --python PATH --groups mob   # this interpreter vs another Python's venv
    python benchmarks/bench_predict.py --wsi-only              # only the whole-slide time and memory
    python benchmarks/bench_predict.py --wsi-only --repeats 3 --versus REV   # and the same runs with REV's code

Leave one section out: train on the other sections of the group, predict the held-out one, score
per-gene Pearson r over its spots on the top 250 genes by mean log1p(CP10k) of the training
sections. Per fold, on the same genes:
* HESpotEx: ``predict_expression.py`` run as users run it (default config, a subprocess; its wall
  time, peak memory and metrics.json);
* ridge baseline: handcrafted patch features (RGB, stain and texture statistics at two scales, 1 and
  2 spot diameters), standardised with the training pool, alpha by leave-one-training-section-out CV;
* ridge on the same features standardised per section (an ablation: how much of HESpotEx's gain is
  the per-section standardisation alone);
* HESpotEx's graph stream alone (``predict.patch_cnn.use=false``; an ablation: what the patch CNN
  trained here adds).
Whole-slide image (its own section, ``--wsi-only`` refreshes just that): a 20,000 x 20,000 px
pyramid TIFF (tiles of a her2st H&E, written to a temporary folder, never to the project) predicted
with a model trained on C3-C6 (the C2 fold's training sections, trained with no test section, so no
section is scored): grid size, wall time, peak memory.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (ROOT, SHARED, check_shared_data, machine, revision_code, run_measured, table,
                               write_section)

GROUPS = {"her2st": ["C2", "C3", "C4", "C5", "C6"], "mob": ["MOB1", "MOB2", "MOB3"]}


def spec(name: str, root: Path = SHARED) -> dict:
    """The section spec (``data`` keys + name) of a her2st or MOB section under the data root ``root``."""
    if name.startswith("MOB"):
        base = root / "mob"
        return {"counts": str(base / f"{name}.tsv"), "spots": str(base / f"alignment_table_{name}.tsv"),
                "image": str(base / f"{name}.jpg"), "name": name}
    base = root / "her2st"
    return {"counts": str(base / "counts" / f"{name}.tsv.gz"), "spots": str(base / "spots" / f"{name}_selection.tsv"),
            "image": glob.glob(str(base / "images" / f"{name}_*.jpg"))[0], "name": name}


def flow(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def run_hespotex(train: list[str], test: str, out: Path, *settings: str, python: str | None = None) -> dict:
    args = [ROOT / "predict_expression.py", "--config", ROOT / "configs" / "predict.yaml", "--out", out, "--force",
            "--device", "cpu", "--set", "train.sections=[" + ", ".join(flow(spec(n)) for n in train) + "]",
            "--set", f"test.sections=[{flow(spec(test))}]"]
    for kv in settings:
        args += ["--set", kv]
    r = run_measured(args, python=python)
    m = json.loads((out / "metrics.json").read_text())
    return {"pcc_all": m["pcc_all"], "pcc_heg": m["pcc_heg"], "mse": m["mse"], "wall_s": r["wall_s"],
            "peak_gb": r["peak_gb"], "train_s": m["seconds"]["predict_train"],
            "features_s": m["seconds"]["predict_features"], "predict_s": m["seconds"]["predict_predict"],
            "n_train": m["n_train_spots"], "n_test": m["n_predicted_spots"]}


def ridge_scores(sections: dict, train: list[str], test: str) -> dict:
    from pipeline.expression_prediction import prediction_scores, ridge_fit_predict, top_mean_genes

    tr = [sections[n] for n in train]
    genes = top_mean_genes(tr, 250)
    measured = sections[test].expression(genes)
    (pred,), info = ridge_fit_predict(tr, [sections[test].features], genes, n_features=44)
    # ablation: the same ridge (same inner CV) on features standardised per section
    (pred_sec,), _ = ridge_fit_predict(tr, [sections[test].features], genes, n_features=44, feature_norm="section")
    return {"ridge": prediction_scores(pred, measured, genes), "alpha": info["alpha"],
            "ridge_section": prediction_scores(pred_sec, measured, genes)}


def big_pyramid(path: Path, source_jpg: str, size: int = 20000, mpp: float = 0.686, tile: int = 512) -> Path:
    """A size x size pyramid TIFF filled with mirrored tiles of a real H&E (content only; not kept)."""
    from data.readers import read_image
    from data.wsi import write_pyramid_tiff
    src = read_image(source_jpg)
    h, w = src.shape[:2]

    def tiles(step, n, _):
        for ty in range(0, n, tile):
            for tx in range(0, n, tile):
                yy = (np.arange(ty, ty + tile) * step) % (2 * h)
                xx = (np.arange(tx, tx + tile) * step) % (2 * w)
                yy = np.where(yy < h, yy, 2 * h - 1 - yy)
                xx = np.where(xx < w, xx, 2 * w - 1 - xx)
                yield src[yy[:, None], xx[None, :]]

    return write_pyramid_tiff(path, tiles, size, size, steps=(1, 4, 16), tile=tile, mpp=mpp, compression="zlib")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", default=list(GROUPS))
    ap.add_argument("--no-wsi", action="store_true")
    ap.add_argument("--wsi-only", action="store_true", help="only the whole-slide image (no fold is scored)")
    ap.add_argument("--wsi-formats", action="store_true",
                    help="only the whole-slide image as a plain JPEG beside the tiled TIFF (no fold is scored)")
    ap.add_argument("--repeats", type=int, default=1, help="whole-slide prediction runs (the median is reported)")
    ap.add_argument("--wsi-size", type=int, default=20000, metavar="PX",
                    help="side of the whole-slide pyramid TIFF (default 20000; e.g. 40000, the issue's slide that must "
                         "not be loaded whole: written to a temporary folder, ~1 GB on disk); a size other than the "
                         "default gets a section of its own")
    ap.add_argument("--isa", action="store_true",
                    help="only the folds of --groups (use: --groups mob), HESpotEx run on the CPU's full instruction set "
                         "and limited to AVX2: how far rounding alone moves the scores (a section of its own)")
    ap.add_argument("--python", default=None, metavar="PATH",
                    help="only the folds of --groups (use: --groups mob), HESpotEx run under this interpreter and under "
                         "PATH (another Python's venv, with its own library versions; a section of its own)")
    ap.add_argument("--versus", default=None, metavar="REV",
                    help="also time the whole-slide prediction with a git revision's code, alternating with this "
                         "code's runs (same model file and image), in a section of its own")
    args = ap.parse_args()
    check_shared_data()
    if args.wsi_formats:
        import shutil
        work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
        try:
            text = whole_slide_formats(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_section("Stage 5: whole-slide image, 20,000 x 20,000 px, by file format", text)
        print(text)
        return
    if args.isa or args.python:
        import shutil
        work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
        try:
            text = compared_folds(work, args.groups, args.python)
        finally:    # six runs' outputs and models
            shutil.rmtree(work, ignore_errors=True)
        what = ("with another Python's library set ({}; no choice)" if args.python else
                "on the full instruction set and limited to AVX2 ({}; floating-point sensitivity, no choice)")
        write_section("Stage 5: leave one section out " + what.format(", ".join(args.groups)), text)
        print(text)
        return
    if args.wsi_only:
        args.groups = []
    from pipeline.expression_prediction import leave_one_out_folds, load_section

    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    body = ["Leave one section out; 250 genes = top mean log1p(CP10k) of the training sections; PCC = mean "
            "per-gene Pearson r over the held-out section's spots (PCC-HEG: the 50 highest-mean genes). "
            "HESpotEx = `predict_expression.py` with the shipped config (graph stream: 3 seeds averaged; "
            "patch CNN trained here: 1 seed; the two averaged 50/50), run as a subprocess; graph only = the "
            "same run with `predict.patch_cnn.use=false` (ablation); ridge = the issue's baseline (handcrafted features at 1 and 2 spot diameters, "
            "global standardisation, alpha by inner leave-one-training-section-out CV); ridge/section = the "
            "same ridge on features standardised per section (ablation). The config was fixed on MOB "
            "(benchmarks/DEVLOG.md items 12-14) before any her2st section was scored; the patch CNN was "
            "added and its settings fixed on MOB only (DEVLOG 32) before her2st was run with it.", ""]
    for group in args.groups:
        names = GROUPS[group]
        sections = {n: load_section(spec(n), {"use": "auto", "encoder": "handcrafted"}) for n in names}
        rows = []
        for train, test in leave_one_out_folds(names):
            out = work / f"{group}_{test}"
            h = run_hespotex(train, test, out)
            g = run_hespotex(train, test, work / f"{group}_{test}_graph_only", "predict.patch_cnn.use=false")
            r = ridge_scores(sections, train, test)
            rows.append({"test": test, "HESpotEx PCC": h["pcc_all"], "HESpotEx PCC-HEG": h["pcc_heg"],
                         "HESpotEx MSE": h["mse"], "graph only PCC": g["pcc_all"], "graph only MSE": g["mse"],
                         "ridge PCC": r["ridge"]["pcc_all"],
                         "ridge PCC-HEG": r["ridge"]["pcc_heg"], "ridge MSE": r["ridge"]["mse"],
                         "ridge alpha": r["alpha"], "ridge/section PCC": r["ridge_section"]["pcc_all"],
                         "s/1000 spots (features, train, predict)":
                             f"{1000 * h['features_s'] / (h['n_train'] + h['n_test']):.1f}, "
                             f"{1000 * h['train_s'] / h['n_train']:.1f}, {1000 * h['predict_s'] / h['n_test']:.2f}",
                         "wall s": h["wall_s"], "peak GB": h["peak_gb"]})
            print(rows[-1], flush=True)
        mean = {"test": "**mean**"}
        for c in rows[0]:
            if isinstance(rows[0][c], float) and c != "ridge alpha":
                mean[c] = float(np.mean([r[c] for r in rows]))
        rows.append(mean)
        body += [f"### {group} ({', '.join(names)})", "", f"Machine: {machine()}.", "", table(rows, list(rows[0].keys())), ""]

    if args.groups:   # folds were run: their groups' tables are rewritten, the other groups' kept
        text = "\n".join(body + kept_groups(FOLDS_SECTION, args.groups))
        write_section(FOLDS_SECTION, text)
        print(text)
    if not args.no_wsi and (SHARED / "her2st").exists():
        try:
            wsi = whole_slide_timing(work, args.repeats, args.versus, args.wsi_size)
        finally:   # the pyramid TIFF (0.2-1 GB) and the runs' outputs
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        title = f"Stage 5: whole-slide image, {args.wsi_size:,} x {args.wsi_size:,} px"
        write_section(title + (f", this code vs {args.versus} (alternating runs)" if args.versus else ""), wsi)
        print(wsi)


FOLDS_SECTION = "Stage 5: expression from the H&E image (HESpotEx), leave one section out"


def kept_groups(section: str, run: list[str]) -> list[str]:
    """The ``### group`` tables of ``section`` in RESULTS.md for the groups not in ``run``, each headed by the
    machine line it was measured on (an older layout's one line for the whole section is copied into each),
    so that rerunning one group does not drop the others' numbers."""
    import re

    from benchmarks.common import RESULTS

    text = RESULTS.read_text() if RESULTS.exists() else ""
    found = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not found:
        return []
    old = found.group(1)
    header = re.search(r"^Machine: .*$", old.split("\n### ")[0], re.M)
    kept = []
    for block in re.split(r"^(?=### )", old, flags=re.M)[1:]:
        group = block[4:].split(" ", 1)[0]
        if group in run:
            continue
        if "\nMachine: " not in block and header:
            title, rest = block.split("\n", 1)
            block = f"{title}\n\n{header.group(0)}\n{rest}"
        kept.append(block.rstrip() + "\n")
    return kept


def compared_folds(work: Path, groups: list[str], other_python: str | None = None) -> str:
    """Each leave-one-section-out fold of ``groups`` run twice by ``predict_expression.py`` with the shipped
    config. Without ``other_python``: on the CPU's full instruction set and with the math libraries limited
    to AVX2 (:func:`benchmarks.common.avx2_children`), so only the rounding differs, as between machines.
    With it: under this interpreter and under ``other_python`` (its own library versions). Same code, inputs
    and seeds. Returns the section's text (machine and commit taken before the runs)."""
    from benchmarks.common import avx2_children, interpreters_line
    from pipeline.expression_prediction import leave_one_out_folds

    if other_python:
        first, second = "this", "other"
        header = (f"Machine: {machine()}.\nScript: `python benchmarks/bench_predict.py --python {other_python} "
                  f"--groups {' '.join(groups)}`.\n\n{interpreters_line(other_python)}\n\n"
                  "HESpotEx with the shipped config per fold, run under each interpreter. Same code, inputs and "
                  "seeds: how far a score can move with another Python's library set. Not a choice of anything.\n\n")
    else:
        first, second = "full", "AVX2"
        header = (f"Machine: {machine()}.\nScript: `python benchmarks/bench_predict.py --isa --groups "
                  f"{' '.join(groups)}`.\n\nHESpotEx with the shipped config per fold, run twice: on the CPU's full "
                  "instruction set and with torch, NumPy, OpenBLAS and OpenCV limited to AVX2 (as on a CPU without "
                  "AVX-512). Same code, inputs and seeds: how far a score can move on another CPU. Not a choice of "
                  "anything.\n\n")
    rows = []
    for group in groups:
        for train, test in leave_one_out_folds(GROUPS[group]):
            a = run_hespotex(train, test, work / f"{test}_{first}")
            if other_python:
                b = run_hespotex(train, test, work / f"{test}_{second}", python=other_python)
            else:
                with avx2_children() as note:
                    if note is None:
                        return header + "This CPU has no AVX-512: nothing to compare."
                    b = run_hespotex(train, test, work / f"{test}_{second}")
            rows.append({"test": test, **{f"{name} ({run})": r[key] for name, key in
                                         (("PCC", "pcc_all"), ("PCC-HEG", "pcc_heg"), ("MSE", "mse"))
                                         for run, r in ((first, a), (second, b))}})
            print(rows[-1], flush=True)
    return header + table(rows, list(rows[0]))


def mirrored_image(source_jpg: str, size: int = 20000) -> np.ndarray:
    """The content of :func:`big_pyramid`'s level 0 as one (size, size, 3) RGB array (1.2 GB at 20,000 px)."""
    from data.readers import read_image
    src = read_image(source_jpg)
    h, w = src.shape[:2]
    idx = np.arange(size)
    yy, xx = idx % (2 * h), idx % (2 * w)
    yy = np.where(yy < h, yy, 2 * h - 1 - yy)
    xx = np.where(xx < w, xx, 2 * w - 1 - xx)
    out = np.empty((size, size, 3), np.uint8)
    for start in range(0, size, 2048):          # row blocks: no second full-size index array
        out[start:start + 2048] = src[yy[start:start + 2048][:, None], xx[None, :]]
    return out


def whole_slide_formats(work: Path) -> str:
    """The 20,000 px whole slide of :func:`whole_slide_timing` given to ``predict_expression.py`` as a plain
    JPEG (decoded whole: what a user with such a scan gets) and as the tiled pyramid TIFF (read tile by
    tile), with the same model (trained on C3-C6, no test section: nothing is scored). Returns the
    section's text (machine and commit taken before the runs)."""
    import cv2
    header = f"Machine: {machine()}.\nScript: `python benchmarks/bench_predict.py --wsi-formats`.\n\n"
    model_dir = work / "wsi_model"
    run_measured([ROOT / "predict_expression.py", "--config", ROOT / "configs" / "predict.yaml", "--out", model_dir,
                  "--force", "--device", "cpu", "--set",
                  "train.sections=[" + ", ".join(flow(spec(n)) for n in ("C3", "C4", "C5", "C6")) + "]",
                  "--set", "test.sections=[]"])
    files = {"tiled pyramid TIFF (zlib, 512 px tiles)": big_pyramid(work / "wsi_20000.tif", spec("C3")["image"])}
    rgb = mirrored_image(spec("C3")["image"])
    jpg = work / "wsi_20000.jpg"
    cv2.imwrite(str(jpg), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    del rgb
    files["plain JPEG (quality 90)"] = jpg
    rows = []
    for label, path in files.items():
        out = work / f"wsi_{path.suffix[1:]}"
        r = run_measured([ROOT / "predict_expression.py", "--config", ROOT / "configs" / "predict.yaml",
                          "--out", out, "--force", "--device", "cpu", "--set", "train.sections=[]",
                          "--set", f"test.sections=[{{image: {path}, name: WSI}}]", "--set", "wsi.mpp=0.686",
                          "--set", f"predict.model_file={model_dir / '05_model.pt'}"])
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"file": label, "file MB": round(path.stat().st_size / 1e6, 1), "grid points": m["n_predicted_spots"],
                     "wall s": round(r["wall_s"], 1), "peak GB": round(r["peak_gb"], 2)})
        print(rows[-1], flush=True)
    return (header + "The same 20,000 x 20,000 px content (mirrored tiles of the C3 H&E, 1.2 GB as RGB) predicted by "
            "`predict_expression.py` with one model trained on C3-C6 (no test section, nothing scored), `wsi.mpp=0.686`; "
            "peak = the whole process tree. A JPEG cannot be read by region, so it is decoded whole; the tiled "
            "TIFF is read tile by tile. Issue target: <= 4 GB for a 20,000 px image.\n\n" + table(rows, list(rows[0])))


def whole_slide_timing(work: Path, repeats: int = 1, versus: str | None = None, size: int = 20000) -> str:
    """Train on C3-C6 (no test section: nothing is scored), then time ``predict_expression.py`` with
    that model on a ``size`` x ``size`` px pyramid TIFF made of the C3 H&E, ``repeats`` times; with
    ``versus`` (a git revision) each run is followed by the same run with that revision's code.
    Returns the section's text (machine and commit taken before the runs)."""
    header = f"Machine: {machine()}.\nScript: `python benchmarks/bench_predict.py --wsi-only" + \
        (f" --repeats {repeats}" if repeats > 1 else "") + (f" --versus {versus}" if versus else "") + \
        (f" --wsi-size {size}" if size != 20000 else "") + "`.\n\n"
    model_dir = work / "wsi_model"
    run_measured([ROOT / "predict_expression.py", "--config", ROOT / "configs" / "predict.yaml", "--out", model_dir,
                  "--force", "--device", "cpu", "--set",
                  "train.sections=[" + ", ".join(flow(spec(n)) for n in ("C3", "C4", "C5", "C6")) + "]",
                  "--set", "test.sections=[]"])
    t = time.perf_counter()
    tif = big_pyramid(work / f"wsi_{size}.tif", spec("C3")["image"], size=size)
    t_write = time.perf_counter() - t
    runs: dict[str, list] = {"this": [], **({versus: []} if versus else {})}
    with revision_code(versus, work) as versus_root:
        for i in range(max(1, repeats)):
            for code, root in (("this", ROOT), *(((versus, versus_root),) if versus else ())):
                out = work / f"wsi_{code}_{i}"
                r = run_measured([root / "predict_expression.py", "--config", root / "configs" / "predict.yaml",
                                  "--out", out, "--force", "--device", "cpu", "--set", "train.sections=[]",
                                  "--set", f"test.sections=[{{image: {tif}, name: WSI}}]",
                                  "--set", f"predict.model_file={model_dir / '05_model.pt'}"], cwd=root)
                m = json.loads((out / "metrics.json").read_text())
                runs[code].append({**r, "n": m["n_predicted_spots"],
                                   "per_1000": m["seconds_per_1000_spots"]["predict"]})
                print(code, i, runs[code][-1]["wall_s"], runs[code][-1]["peak_gb"], flush=True)
    mine = runs["this"]
    mid = sorted(mine, key=lambda r: r["wall_s"])[len(mine) // 2]
    walls = ", ".join(f"{r['wall_s']:.0f}" for r in mine)
    text = (header + f"A tiled pyramid TIFF (0.686 um/px, her2st's scale; content: mirrored tiles of the C3 H&E; "
            f"written in {t_write:.0f} s to a temporary folder) predicted by `predict_expression.py` with a model "
            f"trained on C3-C6 (the C2 fold's training sections; trained with no test section, nothing scored): "
            f"{mid['n']} grid points (200 um spacing over the detected tissue), wall {mid['wall_s']:.0f} s"
            + (f" (median of {len(mine)}: {walls} s)" if len(mine) > 1 else "")
            + f", peak memory {max(r['peak_gb'] for r in mine):.2f} GB (whole process tree; the image itself would be "
            f"{size * size * 3 / 1e9:.1f} GB decoded; target <= 4 GB for a 20,000 px one), "
            f"{mid['per_1000']:.1f} s per 1,000 grid points.")
    if versus:
        rows = [{"code": code, "runs (wall s, in order)": ", ".join(f"{r['wall_s']:.1f}" for r in rs),
                 "median wall s": float(np.median([r["wall_s"] for r in rs])),
                 "peak GB": max(r["peak_gb"] for r in rs), "grid points": rs[0]["n"]}
                for code, rs in runs.items()]
        text += ("\n\nEach run of this code was followed by the same run with the code of "
                 f"{versus} (same model file, same image).\n\n" + table(rows, list(rows[0])))
    return text

if __name__ == "__main__":
    main()
