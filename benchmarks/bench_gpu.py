"""Every stage timed on a CUDA GPU in one short run (issues 2-4: "where a GPU is lent, time it there too").

The GPU machine lent to some sessions (device tool) starts bare: it has PyTorch, torch_geometric,
timm, OpenCV, scikit-learn and pandas, but not scanpy, anndata or scikit-misc, and it cannot read
../shared/data or download anything. So the work has three steps:

1. Here, on a machine with ../shared/data and pip:  ``python benchmarks/bench_gpu.py --prepare``
   copies the data the rows read (DLPFC 151673, MOB1-3; checked against data/datasets.json) into
   ``.gpu_kit/data`` and downloads into ``.whl/`` the wheels that machine lacks (for its Python 3.12),
   ~47 MiB together; both folders are ignored by git and travel with the device tool's ``carry``.
2. There, one command (carry ``[".gpu_kit", ".whl"]``, well under its 10-minute limit on an H200)::

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
         && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --run --device cuda --out $OUT

   It writes ``$OUT/gpu_rows.json`` (and each run's log).
3. Here again: ``python benchmarks/bench_gpu.py --record <files_at>/gpu_rows.json`` writes the section
   "GPU timing" of RESULTS.md.

``--run --device cpu`` runs the same rows on this machine (to check the script; its numbers are the
CPU rows of the other sections, measured again). The rows are the issues' own timings: stages 1-3 on
151673 (ARI shown to compare with the CPU run: the GPU sums floats in another order); stage 4 as a
user runs it (no protocol: train on the slide, predict the x2 grid), TriHRGE and Diff-ST on 151673 and
TriHRGE on 151673 rewritten as a full-width Space Ranger folder with a hires image (patch CNN on);
stage 5, HESpotEx trained on MOB1+MOB2 and predicting MOB3 (development data: no test section is
scored); on CUDA only, stage 1 with the UNI preset's network (ViT-L/16, 303 M parameters; randomly
initialised weights written there, so the row times the network and says nothing of its features) in fp32
and in fp16 (``image.options.precision``), a row that fails being recorded with its error rather than
stopping the run. Nothing is chosen by these numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, SHARED, commit_id, machine, run_measured, table, write_section  # noqa: E402

KIT = ROOT / ".gpu_kit"
WHEELS = ROOT / ".whl"
DATA_FILES = {"dlpfc": "151673/", "mob": ""}        # registered files copied into the kit, by prefix
# what the device image lacks (KINDS.md's package list), for Python 3.12 there; versions as tested here
WHEEL_SPECS = ["scanpy==1.11.5", "anndata==0.12.19", "scikit-misc==0.5.3", "zarr==3.1.6", "numcodecs==0.16.6",
               "array-api-compat", "donfig", "google-crc32c", "legacy-api-wrap", "natsort", "pynndescent",
               "session-info2", "umap-learn", "crc32c", "scverse-misc", "pandas==2.3.3"]
SECTION = "GPU timing (stages 1-5, --device cuda)"


def prepare() -> None:
    """Copy the rows' data into .gpu_kit/data (checked against the registry) and fetch the wheels."""
    from data.datasets import files_of, verify

    for name, prefix in DATA_FILES.items():
        files = files_of(name, prefix)
        verify(name, files, SHARED)
        for rel in files:
            dst = KIT / "data" / name / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SHARED / name / rel, dst)
    (KIT / "commit.txt").write_text(commit_id() + "\n")
    WHEELS.mkdir(exist_ok=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
                 for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *WHEEL_SPECS], check=True)
    size = sum(p.stat().st_size for d in (KIT, WHEELS) for p in d.rglob("*") if p.is_file()) / 2 ** 20
    print(f"kit ready: {KIT} and {WHEELS}, {size:.1f} MiB (carry [\".gpu_kit\", \".whl\"]); commit {commit_id()}")


def run_rows(device: str, out: Path) -> list[dict]:
    """Run every row on ``device``; each run's metrics.json and log go under ``out``."""
    from benchmarks.bench_predict import flow, spec
    from benchmarks.common import write_fullsize_visium
    from data.datasets import files_of, verify

    data = KIT / "data" if (KIT / "data").exists() else SHARED
    for name, prefix in DATA_FILES.items():
        verify(name, files_of(name, prefix), data)
    slide = data / "dlpfc" / "151673"
    dev = ["--device", device, "--force"]
    runs = [
        ("stages 1-3", "151673", ["run_dlpfc.py", *dev, "--set", f"data.path={slide}",
                                  "--set", f"data.truth={slide / '151673_truth.txt'}"]),
        ("stage 4 trihrge", "151673", ["train_superres.py", "--config", "configs/superres.yaml", *dev,
                                       "--set", "model.name=trihrge", "--set", f"data.path={slide}"]),
        ("stage 4 diffusion", "151673", ["train_superres.py", "--config", "configs/superres.yaml", *dev,
                                         "--set", "model.name=diffusion", "--set", f"data.path={slide}"]),
        ("stage 4 trihrge", "151673 full-width, hires", None),
        ("stage 5 hespotex", "MOB1+MOB2 -> MOB3", ["predict_expression.py", "--config", "configs/predict.yaml", *dev,
                                                   "--set", f"train.sections=[{flow(spec('MOB1', data))}, "
                                                                                f"{flow(spec('MOB2', data))}]",
                                                   "--set", f"test.sections=[{flow(spec('MOB3', data))}]"]),
    ]
    if device == "cuda":     # ~60 GFLOPs a patch: minutes on a GPU, hours on 2 CPU cores
        runs += [(f"stage 1 uni {p}", "151673 (random ViT-L weights)", ("uni", p)) for p in ("fp32", "fp16")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (stage, on, args) in enumerate(runs):
            if args is None:        # the full-width folder is written here, outside the timed run
                folder = Path(tmp) / "full_151673"
                write_fullsize_visium(slide, folder)
                args = ["train_superres.py", "--config", "configs/superres.yaml", *dev, "--set", "model.name=trihrge",
                        "--set", f"data.path={folder}", "--set", "data.truth=null"]
            elif isinstance(args, tuple):     # a foundation model's preset, weights written here (not timed)
                args = _encoder_args(args, Path(tmp), slide, dev)
            run_out = Path(tmp) / f"run{i}"
            try:
                r = run_measured([*args[:1], "--out", run_out, *args[1:]])
            except RuntimeError as exc:
                if not stage.startswith("stage 1 "):
                    raise
                rows.append({"stage": stage, "data": on, "device": device, "score": f"failed: {str(exc)[-300:]}"})
                print(rows[-1], flush=True)
                continue
            (out / f"log{i}.txt").write_text(r["log"])
            m = json.loads((run_out / "metrics.json").read_text())
            rows.append(_row(stage, on, device, r, m))
            print(rows[-1], flush=True)
    return rows


def _encoder_args(which: tuple, tmp: Path, slide: Path, dev: list) -> list:
    """Stage 1 on ``slide`` with the foundation-model preset ``which[0]`` in precision ``which[1]``, its
    network's randomly initialised weights saved under ``tmp`` once (timing only)."""
    from image_process.encoders import FOUNDATION_MODELS, create_timm_model

    name, precision = which
    weights = tmp / f"{name}_random.bin"
    if not weights.exists():
        import torch
        preset = FOUNDATION_MODELS[name]
        torch.save(create_timm_model(preset["arch"], **preset["options"]).state_dict(), weights)
    return ["image_process/main.py", "--config", "configs/dlpfc.yaml", *dev, "--set", f"data.path={slide}",
            "--set", "data.truth=null", "--set", "model.n_clusters=7", "--set", f"image.encoder={name}",
            "--set", f"image.weights={weights}", "--set", f"image.options.precision={precision}"]


def _row(stage: str, on: str, device: str, r: dict, m: dict) -> dict:
    row = {"stage": stage, "data": on, "device": m.get("device", device), "wall_s": r["wall_s"],
           "host_peak_gb": r["peak_gb"], "cuda_peak_gb": m.get("cuda_peak_gb", "")}
    if stage.startswith("stage 1 "):
        row["stage_s"] = f"{m['seconds']['image_features']:.1f}"
        row["score"] = f"{m['image']['n_features']} features"
    elif stage == "stages 1-3":
        row["stage_s"] = " / ".join(f"{v:.1f}" for v in m["seconds"].values())
        row["score"] = f"ARI {m['ari']:.3f}"
    elif stage.startswith("stage 4"):
        row["stage_s"] = f"train {m['seconds_train']:.1f} / grid {m['seconds_predict_grid']:.1f}"
        row["score"] = f"{m['n_grid']} grid points"
    else:
        row["stage_s"] = " / ".join(f"{k.removeprefix('predict_')} {v:.1f}" for k, v in m["seconds"].items())
        row["score"] = f"PCC-all {m['pcc_all']:.3f}"
    return row


def record(path: Path) -> None:
    """Write the RESULTS.md section from a --run's gpu_rows.json."""
    got = json.loads(Path(path).read_text())
    cols = ["stage", "data", "device", "wall_s", "stage_s", "host_peak_gb", "cuda_peak_gb", "score"]
    write_section(SECTION, "\n".join([
        f"Machine: {got['machine']}; code: commit {got['commit']}.",
        "Script: `python benchmarks/bench_gpu.py` (--prepare here, --run on the GPU machine, --record here; "
        "see its docstring).",
        "wall_s: the whole process (imports, reading, CUDA start, training, prediction, writing). stage_s: the "
        "stages' own seconds from metrics.json. cuda_peak_gb: torch's peak allocation in that process. "
        "The score only shows the run did the same work as on CPU; nothing was chosen by it.",
        "", table(got["rows"], cols), ""]))
    print(f"wrote section '{SECTION}' of RESULTS.md")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prepare", action="store_true", help="here: copy the data and fetch the wheels")
    g.add_argument("--run", action="store_true", help="on the GPU machine: run every row")
    g.add_argument("--record", type=Path, metavar="GPU_ROWS_JSON", help="here: write RESULTS.md from a run")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu")
    args = p.parse_args()
    if args.prepare:
        prepare()
    elif args.record:
        record(args.record)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        commit = (KIT / "commit.txt").read_text().strip() if (KIT / "commit.txt").exists() else commit_id()
        rows = run_rows(args.device, args.out)
        where = machine().replace(f"commit {commit_id()}; ", "")    # the device's copy has no git history
        (args.out / "gpu_rows.json").write_text(json.dumps({"machine": where, "commit": commit, "rows": rows},
                                                           indent=1))
        print(f"wrote {args.out / 'gpu_rows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
