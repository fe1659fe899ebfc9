"""Visium files as GEO stores them, laid out as the Space Ranger folder the pipeline reads.

GEO's supplementary files of a Visium slide sit in one flat folder, each named with the sample's prefix
and most of them gzipped (``GSM5924030_151673_filtered_feature_bc_matrix.h5``,
``..._tissue_positions_list.csv.gz``, ``..._scalefactors_json.json.gz``, ``..._tissue_hires_image.png.gz``);
a ``GSE..._RAW.tar`` unpacks every sample's files into one such folder. :func:`find_geo_samples` finds the
samples in a folder, and :func:`lay_out_geo_sample` (``python -m data.geo_layout SRC DST [--sample S]``)
writes one sample as a Space Ranger folder: ``filtered_feature_bc_matrix.h5`` (or the MEX folder) and
``spatial/`` with the positions, scale factors and images unzipped. Files that need no unzipping are
hard-linked where the file system allows (no second copy), else copied. ``data.path`` may also name such
a folder directly (:func:`data.readers.read_geo_sample` lays the sample out in a temporary folder on each
read); the layout step only saves the unzipping.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
from pathlib import Path

from data.errors import InputError

log = logging.getLogger("stpipe")

# each Space Ranger file of a sample, by the end of its GEO name (after the prefix, with or without .gz),
# and where it goes in the Space Ranger folder
GEO_FILES = {
    "filtered_feature_bc_matrix.h5": "filtered_feature_bc_matrix.h5",
    "raw_feature_bc_matrix.h5": "raw_feature_bc_matrix.h5",
    "barcodes.tsv": "filtered_feature_bc_matrix/barcodes.tsv",
    "features.tsv": "filtered_feature_bc_matrix/features.tsv",
    "genes.tsv": "filtered_feature_bc_matrix/genes.tsv",
    "matrix.mtx": "filtered_feature_bc_matrix/matrix.mtx",
    "tissue_positions_list.csv": "spatial/tissue_positions_list.csv",
    "tissue_positions.csv": "spatial/tissue_positions.csv",
    "tissue_positions.parquet": "spatial/tissue_positions.parquet",
    "scalefactors_json.json": "spatial/scalefactors_json.json",
    "tissue_hires_image.png": "spatial/tissue_hires_image.png",
    "tissue_lowres_image.png": "spatial/tissue_lowres_image.png",
}
# the MEX files stay gzipped, as Space Ranger writes them and scanpy reads them
KEEP_GZIPPED = ("barcodes.tsv", "features.tsv", "genes.tsv", "matrix.mtx")
# <prefix><separator>[filtered_feature_bc_matrix_]<end>[.gz]: some uploads keep the matrix folder's name in its
# MEX files' names (GSM..._filtered_feature_bc_matrix_barcodes.tsv.gz)
_NAME = re.compile(r"^(?P<prefix>.*?)[_.\-]?(?:filtered_feature_bc_matrix_)?(?P<end>"
                   + "|".join(re.escape(k) for k in sorted(GEO_FILES, key=len, reverse=True)) + r")(?P<gz>\.gz)?$")


def find_geo_samples(folder) -> dict[str, dict[str, Path]]:
    """The Visium samples whose files lie flat in ``folder`` named as GEO names them: {prefix: {end of
    name (a key of :data:`GEO_FILES`): file}}. Only samples with a count matrix and spot positions are
    kept; a folder with Space Ranger's own names (no prefix) gives the prefix ''."""
    samples: dict[str, dict[str, Path]] = {}
    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        m = _NAME.match(f.name) if f.is_file() else None
        if m:
            samples.setdefault(m["prefix"], {}).setdefault(m["end"], f)
    return {p: files for p, files in samples.items() if _has_counts(files) and _has_positions(files)}


def _has_counts(files: dict) -> bool:
    return any(k.endswith(".h5") for k in files) or {"barcodes.tsv", "matrix.mtx"} <= set(files)


def _has_positions(files: dict) -> bool:
    return any(k.startswith("tissue_positions") for k in files)


def choose_sample(samples: dict, folder, sample: str | None, option: str = "--sample") -> str:
    """The prefix of the one sample in ``samples`` (from :func:`find_geo_samples`), or of the one whose
    prefix contains ``sample``; refused naming the prefixes otherwise (and ``option``, what sets ``sample``)."""
    if not samples:
        raise InputError(f"{folder}: no Visium sample found (a count matrix, *filtered_feature_bc_matrix.h5 or "
                         "*barcodes/features/matrix files, and spot positions, *tissue_positions*.csv[.gz]).")
    names = ", ".join(repr(p) for p in samples)
    hits = [p for p in samples if sample is None or sample in p]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise InputError(f"{option} {sample!r} is in no sample's prefix in {folder}: it holds {names}.")
    raise InputError(f"{folder} holds {len(hits)} Visium samples ({names}): name one with {option} "
                     "(any part of its prefix that no other has).")


def lay_out_geo_sample(src, dst, sample: str | None = None, symbolic: bool = False,
                       option: str = "--sample") -> dict[Path, Path]:
    """Write the sample of ``src`` (the only one, or the one whose prefix contains ``sample``) as a Space
    Ranger folder ``dst`` (created; files already there are refused, never overwritten): gzipped positions,
    scale factors and images unzipped, the other files hard-linked (``symbolic``: symbolic links), or
    copied where links cannot be made. Returns {file written: the GEO file it comes from}."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder (give the folder holding the sample's GEO files).")
    samples = find_geo_samples(src)
    prefix = choose_sample(samples, src, sample, option)
    files = samples[prefix]
    if "filtered_feature_bc_matrix.h5" in files:   # one count matrix: the filtered .h5 before the MEX files
        files = {k: v for k, v in files.items() if k not in KEEP_GZIPPED}
    targets = {end: dst / GEO_FILES[end] for end in files}
    for end, target in targets.items():
        if end in KEEP_GZIPPED and files[end].name.endswith(".gz"):
            targets[end] = target.with_name(target.name + ".gz")
    there = [t for t in targets.values() if t.exists()]
    if there:
        raise InputError(f"{there[0]}: already exists; give a new or empty folder as the destination.")
    for end, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = files[end]
        try:
            if source.name.endswith(".gz") and end not in KEEP_GZIPPED:
                with gzip.open(source, "rb") as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            else:
                _link_or_copy(source, target, symbolic)
        except (OSError, EOFError) as exc:      # gzip.BadGzipFile is an OSError
            target.unlink(missing_ok=True)
            raise InputError(f"{source}: cannot be copied to {target} ({exc}); a damaged or cut-short "
                             "download reads so: download it again.") from None
    return {target: files[end] for end, target in targets.items()}


def _link_or_copy(source: Path, target: Path, symbolic: bool = False) -> None:
    try:
        if symbolic:
            os.symlink(source.resolve(), target)
        else:
            os.link(source, target)
    except OSError:          # another file system, or links not allowed
        shutil.copyfile(source, target)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m data.geo_layout",
                                description="Lay out one Visium sample's GEO files (a flat folder of prefixed, "
                                            "gzipped files) as the Space Ranger folder the pipeline reads.")
    p.add_argument("src", help="the folder holding the GEO files (e.g. an unpacked GSE..._RAW.tar)")
    p.add_argument("dst", help="the Space Ranger folder to write (new or empty); then set data.path to it")
    p.add_argument("--sample", default=None, help="part of the sample's prefix, when the folder holds several")
    args = p.parse_args(argv)

    def convert():
        written = lay_out_geo_sample(args.src, args.dst, args.sample)
        print(f"wrote {args.dst} ({', '.join(str(Path(t).relative_to(args.dst)) for t in written)}); "
              f"run with --set data.path={args.dst}")

    from pipeline.cli import run_main     # bad input: one line, exit status 2, as the stage scripts
    run_main(convert)


if __name__ == "__main__":
    main()
