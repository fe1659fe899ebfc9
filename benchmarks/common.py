"""Helpers shared by benchmark scripts: run a command while measuring wall time and peak memory,
describe the machine, and rewrite one section of RESULTS.md."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def run_measured(args: list, cwd=ROOT) -> dict:
    """Run ``python args...``; return wall seconds, peak RSS (GB, process tree, polled every 0.1 s)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{out[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_gb": peak / 1e9, "log": out}


def machine() -> str:
    import torch
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, GPU: {gpu}; "
            f"commit {commit_id()}; {time.strftime('%Y-%m-%d')}")


def commit_id() -> str:
    """Short HEAD commit, marked when tracked files differ from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
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
