"""Helpers shared by benchmark scripts: run a command while measuring wall time and peak memory,
describe the machine, rewrite one section of RESULTS.md, and build a full-width Space Ranger folder
from a DLPFC slice (scale tests)."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from data.datasets import data_root

ROOT = Path(__file__).resolve().parents[1]
SHARED = data_root()
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def check_shared_data(names=("dlpfc", "her2st", "mob")) -> None:
    """Check every registered file of the datasets ``names`` that is present under :data:`SHARED`
    against its sha256 in ``data/datasets.json`` (absent files are skipped, as the benchmarks skip
    what is absent). A file that differs stops the benchmark: its numbers would not be comparable
    with RESULTS.md."""
    from data.datasets import registry, verify
    from data.errors import InputError

    reg = registry()
    for name in names:
        present = [f for f in reg[name].files if (SHARED / name / f).exists()]
        try:
            verify(name, present, SHARED)
        except InputError as exc:
            raise SystemExit(f"error: {exc}") from None
        print(f"data {name}: {len(present)} of {len(reg[name].files)} registered files present, sha256 as registered",
              flush=True)


def run_measured(args: list, cwd=ROOT, python: str | None = None) -> dict:
    """Run ``python args...`` (``python``: another interpreter than this one, or None for this one); return
    wall seconds and peak memory (GB) of the process tree, polled every 0.1 s. Memory: the process's RSS
    while it runs alone; while it has child processes (the forked workers of
    :mod:`image_process.process_pool`) the sum of the tree's PSS, which counts the pages a forked child
    shares with its parent once (a sum of RSS would count them in every child).
    PSS is read at most once a second and only when the RSS sum could beat the peak: reading it costs
    ~30 ms of kernel time per 2 GB process, which at every poll would take CPU from the run timed."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([python or sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    chunks: list[str] = []      # drained as it comes: a child blocks once an unread pipe holds 64 KB
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    peak, last_pss = 0, 0.0
    while proc.poll() is None:
        try:
            children = ps.children(recursive=True)
            rss = ps.memory_info().rss
            if not children:
                peak = max(peak, rss)
            elif rss + sum(c.memory_info().rss for c in children) > peak and time.perf_counter() - last_pss >= 1.0:
                peak = max(peak, tree_pss([ps] + children))    # PSS <= the RSS sum, so only then can it beat it
                last_pss = time.perf_counter()
        except psutil.Error:
            pass
        time.sleep(0.1)
    reader.join()
    out = "".join(chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{out[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_gb": peak / 1e9, "log": out}


@contextmanager
def revision_code(rev: str | None, parent: Path):
    """The folder of a git revision's code: a temporary detached worktree under ``parent`` (removed
    on exit), for running the same benchmark on older code beside this one; None when ``rev`` is None."""
    if rev is None:
        yield None
        return
    folder = Path(parent) / "versus"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(folder), rev], cwd=ROOT, check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT)


def tree_pss(processes) -> int:
    """Sum of the proportional set sizes (bytes) of ``processes`` (psutil.Process): shared pages are
    split between the processes that map them. Falls back to RSS where PSS is not available."""
    total = 0
    for p in processes:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            total += p.memory_info().rss
    return total


def machine() -> str:
    import torch
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    simd = vector_extensions()
    return (f"{os.cpu_count()} CPU cores ({cpu}{', ' + simd if simd else ''}), torch {torch.__version__}, GPU: {gpu}; "
            f"commit {commit_id()}; {time.strftime('%Y-%m-%d')}")


LIBRARIES = ("numpy", "scipy", "pandas", "anndata", "scanpy", "sklearn", "torch", "torch_geometric")


def library_versions(python: str) -> str:
    """The interpreter ``python``'s version and its versions of :data:`LIBRARIES`, as one line."""
    code = ("import sys, importlib; print('Python ' + sys.version.split()[0] + ', ' + ', '.join("
            f"m + ' ' + importlib.import_module(m).__version__ for m in {LIBRARIES!r}))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def interpreters_line(other_python: str) -> str:
    """Two lines for a section that compares this interpreter's runs with ``other_python``'s."""
    return f"This interpreter: {library_versions(sys.executable)}.\nOther: {library_versions(other_python)}."


AVX2_ONLY_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",                         # torch's own kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",                     # torch's BLAS/LAPACK (PyPI wheels use MKL)
    "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",    # torch's convolutions
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # NumPy's dispatched loops
    "OPENBLAS_CORETYPE": "Haswell",                        # NumPy's and SciPy's OpenBLAS
}


def limit_to_avx2() -> str:
    """Make this process's children (the timed scripts) use AVX2 at most, on a machine with AVX-512:
    torch (ATen, MKL, oneDNN), NumPy, OpenBLAS and OpenCV each have a switch (``AVX2_ONLY_ENV``; OpenCV's
    ``OPENCV_CPU_DISABLE`` names the AVX-512 groups this OpenCV dispatches to). This emulates an AVX2-only
    CPU's instructions, not its clock, caches or memory: a row measured so says how much the
    instruction set alone costs. Returns the note for the machine line."""
    import os

    import cv2

    os.environ.update(AVX2_ONLY_ENV)
    groups = [f.strip("*?") for f in cv2.getCPUFeaturesLine().split() if f.strip("*?").startswith("AVX512")]
    if groups:
        os.environ["OPENCV_CPU_DISABLE"] = ",".join(groups)
    return "AVX-512 present but not used: torch (ATen, MKL, oneDNN), NumPy, OpenBLAS and OpenCV limited to AVX2"


@contextmanager
def avx2_children():
    """Within the block, children started by this process are limited to AVX2 (:func:`limit_to_avx2`);
    the environment is restored after it. Yields the note for the machine line, or None on a CPU without
    AVX-512, where the limit changes nothing."""
    if vector_extensions() != "AVX-512":
        yield None
        return
    saved = dict(os.environ)
    try:
        yield limit_to_avx2()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def vector_extensions() -> str:
    """The widest vector instructions the CPU has ('AVX-512', 'AVX2', or '' when unknown), for the
    machine line: machines under one model name ('AMD EPYC') differ in them, and CPU timings can
    differ with them (DEVLOG 108: an AVX2-only machine took ~160 s for a run timed at 117-140 s on
    earlier sessions' machines, whose extensions were not recorded)."""
    try:
        flags = set(next(l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")))
    except (OSError, StopIteration):
        return ""
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""


def commit_id() -> str:
    """Short HEAD commit, marked when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except FileNotFoundError:      # no git on this machine
        commit = ""
    if not commit:
        return "unknown (no git history here)"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True).stdout.splitlines()
    # the benchmarks' own outputs (RESULTS.md, kept rows) do not make the measured code differ
    dirty = [ln for ln in status if not ln[3:].startswith(("benchmarks/RESULTS.md", "benchmarks/stage4_rows.json"))]
    return commit + (" + uncommitted changes" if dirty else "")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``## name`` of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is written by the script it names; rerun it to refresh.\n"
    block = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


FULL_GENES = 33538     # features in a Space Ranger GRCh38 (2020-A) matrix


def write_fullsize_visium(src: Path, dst: Path, seed: int = 0, n_pad: int | None = None) -> dict:
    """A Space Ranger folder shaped like a full run, built from the DLPFC slice ``src``.

    The shared DLPFC matrices hold only the 5,000-8,500 most variable genes (~30% of each spot's UMIs).
    Here the real genes are kept and padded to ``FULL_GENES`` features (or by ``n_pad`` genes, e.g. 1) with
    synthetic genes that carry each spot's missing UMIs (``sum_umi`` of metadata.tsv minus the subset's
    total, drawn multinomially over log-normal gene rates: no spatial pattern, but the high-rate genes track
    each spot's depth), so the matrix has the width and the library sizes of a real one. Written as
    ``filtered_feature_bc_matrix.h5`` (10x HDF5 v3), ``spatial/tissue_positions.csv`` (Space Ranger >= 2.0,
    with header), the scale factors, and a 2000 px ``tissue_hires_image.png``
    (the 600 px lowres image upsampled: the hires path and its patch sizes, no new information)."""
    import json

    import cv2
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from data.readers import read_image, read_visium
    from data.synthetic import write_10x_h5, write_headered_positions

    a = read_visium(src)
    meta = pd.read_csv(src / "metadata.tsv", sep="\t", index_col=0)
    subset_total = np.asarray(a.X.sum(1)).ravel()
    missing = np.maximum(meta.loc[a.obs_names, "sum_umi"].to_numpy(float) - subset_total, 0).astype(np.int64)
    rng = np.random.default_rng(seed)
    n_pad = FULL_GENES - a.n_vars if n_pad is None else n_pad
    rates = rng.lognormal(0.0, 2.0, n_pad)
    rates /= rates.sum()
    pad = sp.csr_matrix(np.stack([rng.multinomial(m, rates) for m in missing]).astype(np.float32))
    X = sp.hstack([a.X, pad]).tocsr()
    genes = list(a.var_names) + [f"SYNTH{i:05d}" for i in range(n_pad)]

    (dst / "spatial").mkdir(parents=True, exist_ok=True)
    write_10x_h5(dst / "filtered_feature_bc_matrix.h5", X, a.obs_names, genes, genome="GRCh38")
    write_headered_positions(src / "spatial" / "tissue_positions_list.csv", dst / "spatial" / "tissue_positions.csv")
    sf = json.loads((src / "spatial" / "scalefactors_json.json").read_text())
    lowres = read_image(src / "spatial" / "tissue_lowres_image.png")
    sf["tissue_hires_scalef"] = sf["tissue_lowres_scalef"] * 2000 / lowres.shape[0]
    (dst / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    hires = cv2.resize(lowres, (2000, 2000), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(dst / "spatial" / "tissue_hires_image.png"), cv2.cvtColor(hires, cv2.COLOR_RGB2BGR))
    return {"n_spots": a.n_obs, "n_genes": len(genes), "nnz_millions": X.nnz / 1e6,
            "median_umis": float(np.median(np.asarray(X.sum(1)).ravel()))}


def write_fullres_images(folder: Path, files: dict, upscale: float = 1.0) -> tuple[int, int]:
    """A full-resolution H&E for the Space Ranger ``folder``: its hires PNG upsampled (cubic) once to
    the size its scale factor implies, times ``upscale``, and written to every path of ``files``
    (path: tifffile.imwrite options, or None for a JPEG by OpenCV, quality 90); returns (height, width)."""
    import json

    import cv2
    import tifffile

    scalef = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    hires = cv2.imread(str(folder / "spatial" / "tissue_hires_image.png"))
    f = upscale / scalef
    big = cv2.resize(hires, (round(hires.shape[1] * f), round(hires.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
    for path, options in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if options is None:
            cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
        else:
            tifffile.imwrite(path, big[..., ::-1], photometric="rgb", **options)
    return big.shape[:2]
