"""Finished runs side by side: one table and one figure of the metrics of many output folders.

    python -m pipeline.summary runs/151673 runs/151674 runs/151675 --out runs/summary
    python -m pipeline.summary runs/1516* --out runs/summary --metrics ari nmi

Reads each folder's ``metrics.json`` (any script's: stages 1-3, 4 or 5) and writes to ``--out``:

* ``summary.csv``: one row per run, ``run`` (the folder's name, or its path where two names are alike) then
  the chosen metrics and every other number of its ``metrics.json``, nested keys joined by dots
  (``seconds.domains``, ``sections.C2.pcc_all``, ``by_k.7.ari``); a key a run lacks is empty;
* ``summary.png``: each chosen metric over the runs, a box with every run as a labelled point (the papers'
  box plots of ARI over the twelve DLPFC slices);

and prints the chosen metrics per run. ``--metrics``: the columns to show (default: those of ``ari``, ``nmi``,
``pas``, ``pcc_all``, ``pcc_heg``, ``ssim`` that some run has).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from data.errors import InputError
from pipeline.cli import output_folder
from pipeline.plotting import metric_boxplots
from pipeline.stages import METRICS_FILE, atomic_write, read_metrics

DEFAULT_METRICS = ("ari", "nmi", "pas", "pcc_all", "pcc_heg", "ssim")
TABLE = "summary.csv"
FIGURE = "summary.png"


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """The numbers of a ``metrics.json`` (nested mappings included) as one flat mapping, nested keys joined by
    dots; strings, lists and true/false are left out."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def summarise(folders: list) -> pd.DataFrame:
    """One row per run folder (``run``: its name, or its path where two names are alike), one column per number
    of the runs' ``metrics.json``, in the order first met. A folder without a readable ``metrics.json`` is
    refused (not a finished run's ``--out``)."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise InputError("no run folders given: name the --out folders of finished runs, e.g. runs/151673 runs/151674")
    rows = []
    for folder in folders:
        metrics = read_metrics(folder)
        if not metrics:
            raise InputError(f"{folder / METRICS_FILE}: not found or not readable; give the --out folders of "
                             "finished runs (each has a metrics.json)")
        rows.append(flatten_metrics(metrics))
    names = [f.name for f in folders]
    if len(set(names)) < len(names):           # runs/a/151673 and runs/b/151673: the paths tell them apart
        names = [str(f) for f in folders]
    return pd.DataFrame(rows, index=pd.Index(names, name="run"))


def chosen_metrics(table: pd.DataFrame, metrics: list | None) -> list:
    """``metrics`` checked against the table's columns, or by default those of :data:`DEFAULT_METRICS` present."""
    if metrics is None:
        return [m for m in DEFAULT_METRICS if m in table.columns]
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise InputError(f"--metrics {' '.join(missing)}: no run has {'it' if len(missing) == 1 else 'them'}; the "
                         f"runs' numbers are: {', '.join(table.columns[:40])}{' ...' if len(table.columns) > 40 else ''}")
    return list(metrics)


def main(argv: list | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="output folders of finished runs (each with a metrics.json)")
    p.add_argument("--out", required=True, help="folder for summary.csv and summary.png")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics to show (default: ari nmi pas pcc_all ... present)")
    args = p.parse_args(argv)
    if not args.out.strip():
        raise InputError("--out is empty: give the folder for summary.csv and summary.png")
    table = summarise(args.runs)
    metrics = chosen_metrics(table, args.metrics)
    table = table[metrics + [c for c in table.columns if c not in metrics]]      # the chosen ones first
    out = output_folder(args.out)
    atomic_write(out / TABLE, lambda tmp: table.to_csv(tmp, float_format="%.6g"))
    metric_boxplots(table, metrics, out / FIGURE)
    with pd.option_context("display.max_rows", None, "display.width", 160, "display.float_format", "{:.3f}".format):
        print(table[metrics] if metrics else table.iloc[:, :0])
    print(f"{len(table)} runs: {out / TABLE}, {out / FIGURE}")


if __name__ == "__main__":
    from pipeline.cli import run_main

    run_main(lambda: main())
