"""Check a candidate change of stage-4 settings on the development sections (MOB1-3) before it
reaches a scored slide. Writes the section "Stage 4: development check of candidate settings on MOB1-3"
of benchmarks/RESULTS.md (one section per candidate).

    python benchmarks/candidate_check_superres.py --set superres.patch_cnn.tta=1 --set superres.patch_cnn.patch_budget=5000

TriHRGE (``train_superres.py``'s library entry) is run on each MOB section with its full-resolution
H&E, under both protocols (recovery, pooling; seed ``eval.seed`` of the config), trained on the section
alone and with the other two MOB sections, once with the current settings and once with the candidate's
``--set`` overrides, on the same split and the same 250 genes. The table gives the mean over the three
sections of PCC-all and MSE per protocol x training cell, current -> candidate, and the largest fall of
a section. The rule that decides is written in benchmarks/DEVLOG.md before the run (e.g. item 88: no
cell's mean PCC-all may fall by more than 0.003); this script only measures. DLPFC and her2st, the
scored slides, are never run here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_predict import spec  # noqa: E402
from benchmarks.bench_superres import spec_overrides  # noqa: E402
from benchmarks.common import ROOT, check_shared_data, machine, table, write_section  # noqa: E402

SECTIONS = ("MOB1", "MOB2", "MOB3")
TRAINING = ("alone", "+sections")


def run_cell(name: str, protocol: str, training: str, candidate: list[str], device: str = "cpu") -> dict:
    from pipeline.config import load_config
    from pipeline.slide import load_slide
    from train_superres import super_resolve

    others = [spec(s) for s in SECTIONS if s != name] if training == "+sections" else []
    overrides = spec_overrides(spec(name)) + [f"eval.protocol={protocol}", "model.name=trihrge"] + \
        ([f"train.sections={json.dumps(others)}"] if others else []) + list(candidate)
    cfg = load_config(ROOT / "configs" / "superres.yaml", overrides)
    t = time.perf_counter()
    m = super_resolve(load_slide(cfg), cfg, device, progress=False, grid=False)["metrics"]
    return {"pcc_all": m["pcc_all"], "mse": m["mse"], "seconds": time.perf_counter() - t}


def check(candidate: list[str], sections=SECTIONS, protocols=("recovery", "pooling")) -> list[dict]:
    """Per section, protocol and training: the current settings' and the candidate's scores."""
    runs = []
    for protocol in protocols:
        for training in TRAINING:
            for name in sections:
                for label, sets in (("current", []), ("candidate", candidate)):
                    r = {"section": name, "protocol": protocol, "training": training, "settings": label,
                         **run_cell(name, protocol, training, sets)}
                    runs.append(r)
                    print(r, flush=True)
    return runs


def summarise(runs: list[dict]) -> list[dict]:
    import numpy as np

    rows = []
    for protocol in dict.fromkeys(r["protocol"] for r in runs):
        for training in TRAINING:
            cell = [r for r in runs if r["protocol"] == protocol and r["training"] == training]
            if not cell:
                continue
            by = {lab: {r["section"]: r for r in cell if r["settings"] == lab} for lab in ("current", "candidate")}
            names = list(by["current"])
            d = [by["candidate"][n]["pcc_all"] - by["current"][n]["pcc_all"] for n in names]
            mean = {lab: {k: float(np.mean([by[lab][n][k] for n in names])) for k in ("pcc_all", "mse", "seconds")}
                    for lab in by}
            rows.append({"protocol": protocol, "training": training,
                         "pcc_all (current -> candidate)": f"{mean['current']['pcc_all']:.4f} -> "
                                                           f"{mean['candidate']['pcc_all']:.4f}",
                         "change": f"{mean['candidate']['pcc_all'] - mean['current']['pcc_all']:+.4f}",
                         "per section": " / ".join(f"{x:+.4f}" for x in d),
                         "mse (current -> candidate)": f"{mean['current']['mse']:.4f} -> {mean['candidate']['mse']:.4f}",
                         "seconds per run": f"{mean['current']['seconds']:.0f} -> {mean['candidate']['seconds']:.0f}"})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="candidate", action="append", required=True, metavar="KEY=VALUE",
                   help="a setting of the candidate (repeat); the current settings are the config's defaults")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS))
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    check_shared_data(("mob",))
    measured_on = machine()     # names the commit now: the code measured, not the one when the table is written
    rows = summarise(check(args.candidate, args.sections))
    cols = list(rows[0])
    body = table(rows, cols)
    print(body)
    if not args.no_write:
        write_section(f"Stage 4: development check of candidate settings on MOB1-3 ({', '.join(args.candidate)})",
                      f"Machine: {measured_on}.\nScript: `python benchmarks/candidate_check_superres.py "
                      + " ".join(f"--set {c}" for c in args.candidate) + "`.\n\n"
                      "TriHRGE on each MOB section (full-resolution H&E), current defaults vs the candidate, same split "
                      "and genes; means over the sections. The decision rule is in DEVLOG, written before the run; "
                      "the scored slides (DLPFC, her2st) are not run here.\n\n" + body)


if __name__ == "__main__":
    main()
