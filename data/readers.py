"""Readers: every file the pipeline reads from a user goes through this module.

Supported inputs (see README "Input keys"):

* a Space Ranger output folder (``filtered_feature_bc_matrix.h5`` or the MEX folder
  ``filtered_feature_bc_matrix/``; without them the ``raw_`` ones, cut to the spots marked
  ``in_tissue=1``; ``spatial/tissue_positions_list.csv`` (no header) or
  ``spatial/tissue_positions.csv`` (header), ``spatial/scalefactors_json.json``, hires/lowres PNGs);
* a Visium HD run (``binned_outputs/square_XXXum/``: ``filtered_feature_bc_matrix.h5`` and
  ``spatial/tissue_positions.parquet``): one bin size, ``data.bin_um``, read as is or summed from a
  finer one (:func:`read_spaceranger`);
* an ``.h5ad`` file with raw counts in ``X`` (or ``layers['counts']``) and ``obsm['spatial']`` (or an AnnData
  ``.zarr`` folder);
* a SpatialData store (:mod:`data.spatialdata_store`; spatialdata need not be installed);
* a sample's files as GEO stores them (:mod:`data.geo_layout`);
* a legacy Spatial Transcriptomics section: a spots x genes count table whose spot ids are
  ``"<x>x<y>"`` array coordinates, plus a selection/alignment table with ``x, y, pixel_x, pixel_y``
  (and optionally ``selected``).

All readers return an AnnData with raw integer counts in ``X`` (CSR, float32), ``obs['total_counts']``,
``obs['array_row'/'array_col']`` where known, ``obsm['spatial']`` = (x, y) in full-resolution pixels
and ``uns['spatial'][library_id]`` with ``images`` (hires/lowres uint8 RGB, when present),
``scalefactors`` and ``metadata['fullres_path']`` (path of a full-resolution image, never loaded here).
Problems raise :class:`data.errors.InputError` naming the file and the fix.
"""
from __future__ import annotations

import gzip
import itertools
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data import keys
from data.errors import InputError

VISIUM_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col",
                           "pxl_row_in_fullres", "pxl_col_in_fullres"]
IMAGE_SCALEFACTORS = ("tissue_hires_scalef", "tissue_lowres_scalef")
FULLRES_IMAGE_KEYS = ("fullres", "fulres", "full_res", "full")   # names tools give a full-resolution image
log = logging.getLogger("stpipe")
ST_SPOT_ID = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*(\d+(?:\.\d+)?)\s*$", re.IGNORECASE)   # 10x13, 10X13


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def read_slide(data_cfg: dict):
    """Read the slide described by a ``data`` config section.

    Keys: ``path`` (Space Ranger folder, a folder of a sample's GEO files (:func:`read_geo_sample`;
    ``name`` picks one sample of several), an .h5ad or AnnData .zarr, or a SpatialData store (``name`` picks
    a table or region of several)) or ``counts`` + ``spots`` (legacy ST);
    optional ``image`` (full-resolution image overriding the folder's), ``truth`` (label file),
    ``truth_column`` (its label column, or with no ``truth`` the obs column of an .h5ad holding them),
    ``truth_missing`` (labels meaning "not annotated"), ``name`` (library id), ``bin_um`` (Visium HD:
    the bin side in micrometres, see :func:`read_spaceranger`).
    """
    data_cfg = dict(data_cfg or {})
    check_input_files(data_cfg)
    if data_cfg.get("bin_um") and not (data_cfg.get("path") and Path(data_cfg["path"]).is_dir()):
        raise InputError(f"data.bin_um={data_cfg['bin_um']!r} applies to a Visium HD Space Ranger folder only; "
                         "unset it for this input.")
    image = data_cfg.get("image")
    if data_cfg.get("path"):
        path = Path(data_cfg["path"])
        hest = hest_sample(path, data_cfg.get("name"))
        if hest is not None and data_cfg.get("bin_um"):
            raise InputError(f"{path}: data.bin_um is for a Visium HD Space Ranger folder; this is a HEST-1k sample, "
                             "whose spots are read as its .h5ad holds them. Unset data.bin_um.")
        if hest is not None:
            adata = read_h5ad(hest[0])
            if not image and hest[1] is not None:
                image = hest[1]
                log.info("%s: HEST-1k sample %r; its whole-slide image %s is the full-resolution image", path,
                         hest[0].stem, image)
        elif path.is_dir():
            adata = _read_folder(path, data_cfg)
        elif path.suffix == ".h5ad":
            adata = read_h5ad(path, library_id=data_cfg.get("name"))
        else:
            root = _spaceranger_root_of(path)
            hint = f"; this file is part of a Space Ranger folder: set data.path={root}" if root else \
                FOREIGN_FORMATS.get(path.suffix.lower(), "") or _what_a_file_is(path)
            raise InputError(f"{path}: data.path must be a Space Ranger output folder, an .h5ad file, an AnnData "
                             f".zarr folder or a SpatialData store{hint}.")
    elif data_cfg.get("counts"):
        if not data_cfg.get("spots"):
            raise InputError("data.counts is set but data.spots is not: a legacy ST section needs the "
                             "spot selection/alignment table (x, y, pixel_x, pixel_y) as data.spots.")
        adata = read_legacy_st(data_cfg["counts"], data_cfg["spots"], library_id=data_cfg.get("name"))
    else:
        raise InputError("No input given: set data.path (Space Ranger folder or .h5ad) or "
                         "data.counts + data.spots (legacy ST), e.g. --set data.path=/path/to/slide")
    if data_cfg.get("image_affine") is not None and not data_cfg.get("image"):
        raise InputError("data.image_affine places data.image on the spots; set data.image too, or unset "
                         "data.image_affine.")
    if image:
        attach_fullres_image(adata, image, data_cfg.get("image_affine") if data_cfg.get("image") else None)
    missing = data_cfg.get("truth_missing", ["undetermined"]) or []
    if data_cfg.get("truth"):
        adata.obs[keys.TRUTH] = read_truth(data_cfg["truth"], adata, missing_labels=missing,
                                           column=data_cfg.get("truth_column"))
    elif data_cfg.get("truth_column"):
        if not (data_cfg.get("path") and Path(data_cfg["path"]).suffix == ".h5ad"):
            raise InputError("data.truth_column without data.truth names a column of an .h5ad's obs; for this "
                             "input give the label file as data.truth.")
        adata.obs[keys.TRUTH] = truth_from_obs(adata, data_cfg["truth_column"], data_cfg["path"], missing)
    log.info("%s: %d spots x %d genes; %s%s", data_cfg.get("path") or data_cfg["counts"], adata.n_obs, adata.n_vars,
             describe_images(adata),
             f"; {int(adata.obs[keys.TRUTH].notna().sum())} spots annotated" if keys.TRUTH in adata.obs else "")
    return adata


HEST_WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff")   # wsis/<id><suffix> of a HEST-1k folder


def hest_sample(path: Path, name=None) -> tuple[Path, Path | None] | None:
    """(the sample's ``.h5ad``, its whole-slide image or None) when ``data.path`` is in HEST-1k's layout, else
    None. HEST-1k (and ``hest``'s downloads) keep each sample as ``st/<id>.h5ad`` (counts, ``obsm['spatial']`` in
    the whole-slide image's pixels, a thumbnail as ``uns['spatial']['ST']['images']['downscaled_fullres']``)
    beside ``wsis/<id>.tif`` (the pyramidal H&E) and ``metadata/<id>.json``. ``path`` may be the folder above
    ``st/`` (``name``, ``data.name``, picks the sample when it holds several; with one, it is only the
    section's name) or one ``st/<id>.h5ad``."""
    path = Path(path)
    if path.is_dir():
        if (path / "spatial").is_dir() or not (path / "st").is_dir():
            return None
        ids = sorted(p.name[:-len(".h5ad")] for p in (path / "st").glob("*.h5ad"))
        if not ids:
            return None
        shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
        if name is None and len(ids) > 1:
            raise InputError(f"{path}: a HEST-1k folder of {len(ids)} samples ({shown}); pick one with data.name=<id>.")
        if name is not None and str(name) not in ids and len(ids) > 1:
            raise InputError(f"{path}: a HEST-1k folder without sample {str(name)!r} in st/ (it has {shown}).")
        h5ad = path / "st" / f"{ids[0] if len(ids) == 1 else name}.h5ad"
    elif path.suffix == ".h5ad" and path.parent.name == "st" and (path.parent.parent / "wsis").is_dir():
        h5ad = path
    else:
        return None
    sample = h5ad.name[:-len(".h5ad")]
    wsi = next((w for w in (h5ad.parent.parent / "wsis" / f"{sample}{suffix}" for suffix in HEST_WSI_SUFFIXES)
                if w.exists()), None)
    if wsi is None:
        log.warning("%s: HEST-1k sample %r has no wsis/%s.tif; it is read with its thumbnail only", h5ad.parent.parent,
                    sample, sample)
    return h5ad, wsi


def data_files(data_cfg: dict) -> list:
    """The files a (resolved) ``data`` mapping or section spec reads but its labels, for stage fingerprints:
    ``path``, ``counts``, ``spots``, ``image``; a HEST-1k folder stands for its sample's ``.h5ad`` and
    whole-slide image only, so that the other samples' files do not count."""
    files = [data_cfg[k] for k in ("path", "counts", "spots", "image") if data_cfg.get(k)]
    hest = hest_sample(Path(data_cfg["path"]), data_cfg.get("name")) if data_cfg.get("path") else None
    if hest is not None:
        files = [f for f in files if f != data_cfg["path"]] + [f for f in hest if f is not None]
    return files


# files of other tools that data.path may be given, with the way to a readable one
FOREIGN_FORMATS = {
    ".rds": "; this is an R object (Seurat): save it as .h5ad once, e.g. with SeuratDisk (SaveH5Seurat, then "
            "Convert(dest = 'h5ad')), keeping raw counts in X and spot centres in obsm['spatial'], or give the Space "
            "Ranger folder it was made from",
    ".h5seurat": "; this is a Seurat file: convert it once with SeuratDisk's Convert(dest = 'h5ad'), keeping raw "
                 "counts in X and spot centres in obsm['spatial'], or give the Space Ranger folder it was made from",
    ".loom": "; this is a loom file: anndata.read_loom(...) then write_h5ad(...) converts it, with spot centres "
             "stored in obsm['spatial']",
}


def _read_folder(path: Path, data_cfg: dict):
    """``data.path`` naming a folder: a sample's GEO files (flat, no ``spatial/``), an AnnData ``.zarr``, a
    SpatialData store (:func:`data.spatialdata_store.read_spatialdata`), else a Space Ranger folder
    (standard or Visium HD)."""
    name, bin_um = data_cfg.get("name"), data_cfg.get("bin_um")
    if not (path / "spatial").is_dir() and _geo_samples_in(path):
        if bin_um:
            raise InputError(f"{path}: data.bin_um is for a Visium HD Space Ranger folder; this folder holds "
                             "a sample's GEO files (fixed spots). Unset data.bin_um.")
        return read_geo_sample(path, name, name, name_picks_only_of_several=True)
    kind = zarr_store_kind(path)
    if kind in ("spatialdata", "anndata") and bin_um:
        raise InputError(f"{path}: data.bin_um is for a Visium HD Space Ranger folder; this is a zarr store. Unset "
                         "data.bin_um (in a SpatialData store, data.name picks the table of one bin size).")
    if kind == "spatialdata":
        from data.spatialdata_store import read_spatialdata
        return conform_anndata(read_spatialdata(path, name), path)
    if kind == "anndata":
        return read_h5ad(path, library_id=name)
    return read_spaceranger(path, library_id=name or path.name, bin_um=bin_um)


def anndata_version() -> str:
    """The installed anndata's version (its ``__version__`` is deprecated)."""
    from importlib.metadata import version
    return version("anndata")


def _anndata_reads_zarr3() -> bool:
    """Whether the installed anndata reads zarr 3 stores (0.12 on; older releases fail or refuse zarr 3)."""
    major, minor = (int(p) for p in re.findall(r"\d+", anndata_version())[:2])
    return (major, minor) >= (0, 12)


SPATIALDATA_ELEMENTS = ("images", "labels", "points", "shapes", "tables")   # a SpatialData store's top-level groups


def zarr_store_kind(folder: Path) -> str | None:
    """'anndata' for a folder written by ``AnnData.write_zarr`` (groups ``obs`` and ``var`` beside the zarr
    metadata), 'spatialdata' for a SpatialData store (groups such as ``tables``, ``images``, ``shapes``), None
    for anything else (a Space Ranger folder)."""
    folder = Path(folder)
    if not any((folder / m).exists() for m in (".zgroup", ".zattrs", "zarr.json")):
        return None
    if (folder / "obs").is_dir() and (folder / "var").is_dir():
        return "anndata"
    return "spatialdata" if any((folder / g).is_dir() for g in SPATIALDATA_ELEMENTS) else None


def _geo_samples_in(folder: Path) -> bool:
    from data.geo_layout import find_geo_samples
    return bool(find_geo_samples(folder))


INPUT_FILE_KEYS = ("path", "counts", "spots", "image", "truth")


def check_input_files(data_cfg: dict, where: str = "data") -> None:
    """Refuse, before any work, a file named by a ``data`` mapping (or by a section spec: ``where`` =
    e.g. ``"test.sections C2"``) that does not exist, naming the key and the closest names in its
    folder (a typo in a test section's path used to surface only after the model had trained); and one
    that names both kinds of input, ``path`` and a legacy ST section's ``counts``/``spots``."""
    legacy = [k for k in ("counts", "spots") if data_cfg.get(k)]
    if data_cfg.get("path") and legacy:
        # run_dlpfc.py's config sets data.path: --set data.counts=... --set data.spots=... ran on its slide
        if where == "data":
            raise InputError(f"data.path ({data_cfg['path']}) and data.{legacy[0]} ({data_cfg[legacy[0]]}) are both "
                             "set, and a slide is read from one of them: data.path, or data.counts + data.spots (a "
                             "legacy ST section). Unset the other, a config file's value too: --set data.path=null, "
                             "or --set data.counts=null --set data.spots=null.")
        raise InputError(f"{where}: path and {legacy[0]} are both given, and a section is read from one of them: path, "
                         "or counts + spots (a legacy ST section). Keep one.")
    for key in INPUT_FILE_KEYS:
        value = data_cfg.get(key)
        if not value or Path(value).exists():
            continue
        path = Path(value)
        label = f"data.{key}" if where == "data" else f"{where}: {key}"
        advice = (" Point data.path at a Space Ranger output folder, an .h5ad file or a SpatialData store."
                  if key == "path" and where == "data" else "")
        if not path.expanduser().is_absolute():
            advice += (f" A relative path is looked for from the working directory ({Path.cwd()}), the "
                       "repository and the config file's folder.")
        raise InputError(f"{path}: no such file or folder ({label}).{_closest_names_hint(path)}{advice}")


def _closest_names_hint(path: Path, n: int = 3) -> str:
    """A sentence naming up to ``n`` entries of ``path``'s folder that look like what was meant:
    names that start with its stem (``C2.jpg`` -> ``C2_5714_HE_BT_C2.jpg``), else the closest by
    difflib; "" when there are none."""
    import difflib

    folder = path.parent
    if not folder.is_dir():
        return f" The folder {folder} does not exist either." if str(folder) not in ("", ".") else ""
    try:
        names = sorted(q.name for q in folder.iterdir())
    except OSError:
        return ""
    stem = path.name.split(".")[0]
    close = [m for m in names if len(stem) >= 2 and m.startswith(stem) and m != path.name][:n] \
        or difflib.get_close_matches(path.name, names, n=n, cutoff=0.6)
    return f" Close names in {folder}: {', '.join(close)}." if close else ""


COUNT_MATRICES = ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix",
                  "raw_feature_bc_matrix.h5", "raw_feature_bc_matrix")


def _spaceranger_root_of(path: Path) -> Path | None:
    """The Space Ranger folder that ``path`` (a subfolder such as ``spatial/``, or a file in it: its
    ``filtered_feature_bc_matrix.h5``, a MEX file, ``spatial/tissue_positions.csv``) lies in, or None."""
    for folder in list(path.parents)[:2]:
        if (folder / "spatial").is_dir() and any((folder / m).exists() for m in COUNT_MATRICES + HD_CELL_MATRICES):
            return folder
    return None


TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".csv.gz")     # text tables, as a legacy ST section's counts and spots are
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".ndpi")   # an H&E, given as data.image
READ_AS_LEGACY_ST = ("a legacy ST section is read from data.counts (its spots x genes table) and data.spots (its spot "
                     "table, with pixel_x and pixel_y), not data.path")
READ_AS_IMAGE = ("an H&E image is given as data.image, beside the slide's counts (data.path, or data.counts + "
                 "data.spots)")
SCANNED_ENTRIES = 500      # entries of a folder looked at for what it holds (a home folder given as data.path)


def _is_slide(entry: Path) -> bool:
    """Whether ``entry`` is something ``data.path`` reads as one slide: an ``.h5ad`` file, or a folder that is a
    Space Ranger folder (its ``outs/``, a Visium HD run), an AnnData or SpatialData zarr store, or a sample's
    GEO files."""
    if entry.is_file():
        return entry.name.endswith(".h5ad")
    return (any((f / "spatial").is_dir() or (f / "binned_outputs").is_dir() or is_hd_cell_folder(f)
                for f in (entry, entry / "outs"))
            or zarr_store_kind(entry) is not None or _geo_samples_in(entry))


def _what_a_folder_holds(folder: Path, n: int = 3) -> str:
    """A sentence for the error of a ``data.path`` folder that holds no count matrix of its own: the slides one
    level down (a folder of slides given instead of one of them), else the text tables in it or its subfolders,
    which are read as a legacy ST section's ``data.counts`` and ``data.spots``, else its images (``data.image``);
    "" when it holds none of these."""
    def shown(paths):
        return ", ".join(str(p) for p in paths[:n]) + (", ..." if len(paths) > n else "")

    try:
        entries = sorted(folder.iterdir())[:SCANNED_ENTRIES]
        slides = [e for e in entries if _is_slide(e)]
        tables = [f for e in entries for f in (sorted(e.iterdir()) if e.is_dir() else [e])
                  if f.is_file() and f.name.lower().endswith(TABLE_SUFFIXES)]
    except OSError:
        return ""
    if len(slides) == 1:
        return f" It holds one slide, {slides[0].name}: set data.path={slides[0]}"
    if slides:
        return (f" It holds {len(slides)} slides ({shown([e.name for e in slides])}): set data.path to one of them, "
                f"e.g. data.path={slides[0]}")
    if tables:
        return f" It holds tables ({shown([t.relative_to(folder) for t in tables])}): {READ_AS_LEGACY_ST}"
    images = [e for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
    return f" It holds images ({shown([e.name for e in images])}): {READ_AS_IMAGE}" if images else ""


def _what_a_file_is(path: Path) -> str:
    """The hint for a ``data.path`` file that no reader takes but that is a table or an image of a slide."""
    name = path.name.lower()
    return (f"; this is a table: {READ_AS_LEGACY_ST}" if name.endswith(TABLE_SUFFIXES) else
            f"; this is an image: {READ_AS_IMAGE}" if name.endswith(IMAGE_SUFFIXES) else "")


def describe_images(adata) -> str:
    """'image: hires 2000x1885 px (x0.151 of full resolution), full resolution 13332x11225 px' or
    'no image', for the log line that says what was read."""
    lib = keys.library_id(adata)
    if lib is None:
        return "no image"
    entry = adata.uns[keys.SPATIAL_UNS][lib]
    sf = entry.get("scalefactors", {})
    parts = [f"{k} {v.shape[1]}x{v.shape[0]} px (x{sf.get(f'tissue_{k}_scalef', float('nan')):.3g} of full resolution)"
             for k, v in entry.get("images", {}).items()]
    shape = entry.get("metadata", {}).get("fullres_shape")
    if shape:
        parts.append(f"full resolution {shape[1]}x{shape[0]} px ({entry['metadata']['fullres_path']})")
    return "image: " + ", ".join(parts) if parts else "no image"


# ------------------------------------------------------------------------------------------
# Visium / Space Ranger
# ------------------------------------------------------------------------------------------
def spaceranger_outs(folder: Path) -> Path:
    """The folder holding the Space Ranger results: ``folder`` itself, or its ``outs/`` when ``folder``
    is the run folder (``spaceranger count --id=...`` writes its results to ``<id>/outs/``)."""
    has_results = lambda f: ((f / "filtered_feature_bc_matrix.h5").exists()
                             or (f / "filtered_feature_bc_matrix").is_dir() or (f / "binned_outputs").is_dir())
    if not has_results(folder) and has_results(folder / "outs"):
        log.info("%s: reading its Space Ranger results folder outs/", folder)
        folder = folder / "outs"
    return folder


# ------------------------------------------------------------------------------------------
# Visium HD (square bins)
# ------------------------------------------------------------------------------------------
HD_LEVEL_FOLDER = re.compile(r"^square_(\d+)um$")
HD_LARGE_SLIDE = 60_000   # bins; above this, stages 1-3 take > ~7 min and > ~8 GB on 2 cores (RESULTS, scale table)


def read_spaceranger(path, library_id: str | None = None, bin_um=None):
    """Read a Space Ranger folder: standard Visium (55 um spots) or a Visium HD run.

    Visium HD writes one folder per bin size, ``binned_outputs/square_002um``, ``square_008um``,
    ``square_016um`` (each with its matrix and ``spatial/tissue_positions.parquet``). ``path`` may be
    the run folder, its ``outs/``, ``binned_outputs/`` or one ``square_XXXum`` folder. ``bin_um`` picks
    the bin side in micrometres: one of the run's sizes, or a whole multiple of one, whose bins are then
    summed k x k (:func:`aggregate_square_bins`; e.g. 48 = 3 x 3 bins of 16 um). Given a whole run and
    no ``bin_um``, the error lists the sizes and how many bins each has under tissue. ``bin_um`` on a
    standard Visium folder is an error."""
    folder = spaceranger_outs(Path(path))
    if is_hd_cell_folder(folder):
        if bin_um:
            raise InputError(f"{folder}: data.bin_um picks a bin size of a Visium HD run; this is its cell segmentation "
                             "(segmented_outputs/), read as cells. Unset data.bin_um, or set data.path to the run's "
                             "outs/ to read its bins.")
        return read_hd_cells(folder, library_id)
    levels = visium_hd_levels(folder)
    if not levels and (folder / "spatial" / "tissue_positions.parquet").exists() and _level_size(folder):
        levels = {_level_size(folder): folder}          # one level's folder given directly
        bin_um = bin_um or _level_size(folder)
    if not levels:
        if bin_um:
            raise InputError(f"{folder}: data.bin_um={bin_um!r} is for Visium HD output (binned_outputs/); this "
                             "is a standard Visium folder with fixed 55 um spots. Unset data.bin_um.")
        return read_visium(folder, library_id)
    level, size, k = choose_hd_level(folder, levels, bin_um)
    adata = read_visium(level, library_id)
    _complete_bin_scalefactors(adata, size)
    if k > 1:
        adata = aggregate_square_bins(adata, k)
    sf = keys.scalefactors(adata)
    log.info("%s: Visium HD, %g um bins%s", level, sf["bin_size_um"],
             f" (summed {k} x {k} from {sf['bin_size_um'] / k:g} um)" if k > 1 else "")
    if adata.n_obs > HD_LARGE_SLIDE:
        log.warning("%s: %d bins under tissue. Stages 1-3 took ~6 min and ~7 GB for 50,000 spots on 2 CPU cores "
                    "and grow about linearly; data.bin_um=%d would give ~%d bins.", level, adata.n_obs,
                    2 * int(sf["bin_size_um"]), adata.n_obs // 4)
    return adata


def visium_hd_levels(folder: Path) -> dict:
    """{bin side in um: its folder} of a Visium HD run's ``binned_outputs/`` (``folder`` is ``outs/``
    or ``binned_outputs/`` itself); {} when ``folder`` is not HD output."""
    binned = folder / "binned_outputs" if (folder / "binned_outputs").is_dir() else folder
    levels = {}
    for sub in sorted(binned.iterdir()) if binned.is_dir() else []:
        m = HD_LEVEL_FOLDER.match(sub.name)
        if m and sub.is_dir():
            levels[int(m.group(1))] = sub
    return levels


def choose_hd_level(folder: Path, levels: dict, bin_um) -> tuple:
    """(level folder, its bin size in um, k): the level read and the k x k summing that gives ``bin_um``."""
    if not bin_um:
        segmented = [f / "segmented_outputs" for f in (folder, folder.parent)
                     if is_hd_cell_folder(f / "segmented_outputs")]
        cells = (f" Or read Space Ranger's cells instead of bins: data.path={segmented[0]}." if segmented else "")
        sizes = ", ".join(f"{b} um ({_bins_under_tissue(f)} bins under tissue)" for b, f in sorted(levels.items()))
        raise InputError(f"{folder}: Visium HD output with bins of {sizes}. Choose one with data.bin_um=<um> "
                         f"(e.g. --set data.bin_um={max(levels)}); a whole multiple of a size sums its bins "
                         f"(e.g. {3 * max(levels)} = 3 x 3 bins of {max(levels)} um), which a laptop CPU needs "
                         f"for a whole capture area.{cells}")
    try:
        ok = float(bin_um) > 0 and float(bin_um).is_integer()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"data.bin_um={bin_um!r}: expected a whole number of micrometres (the bin side).")
    bin_um = int(float(bin_um))
    sources = [b for b in levels if bin_um % b == 0]
    if not sources:
        raise InputError(f"{folder}: data.bin_um={bin_um} is neither a bin size of this Visium HD output "
                         f"({', '.join(f'{b} um' for b in sorted(levels))}) nor a whole multiple of one.")
    source = max(sources)           # bin_um itself when the run has it
    return levels[source], source, bin_um // source


def _complete_bin_scalefactors(adata, bin_um: int) -> None:
    """Every stage reads a bin's size from the scale factors: ``bin_size_um`` (else its level's folder
    name) and ``spot_diameter_fullres`` = the bin side in full-resolution px (else the length of one
    array step, from the array -> pixel map fitted on the bins)."""
    lib = keys.library_id(adata)
    sf = adata.uns[keys.SPATIAL_UNS][lib].setdefault("scalefactors", {})
    sf.setdefault("bin_size_um", float(bin_um))
    if not sf.get("spot_diameter_fullres") and adata.n_obs >= 3:
        A = np.c_[adata.obs[[keys.ARRAY_COL, keys.ARRAY_ROW]].to_numpy(float), np.ones(adata.n_obs)]
        coef = np.linalg.lstsq(A, np.asarray(adata.obsm[keys.SPATIAL], float), rcond=None)[0]
        sf["spot_diameter_fullres"] = float(np.linalg.norm(coef[:2], axis=1).mean())


def _level_size(level: Path):
    """The bin side (um) of one HD level's folder: ``bin_size_um`` of its scale factors, else its name
    (``square_016um``); None when neither says."""
    sf = _read_scalefactors(level / "spatial" / "scalefactors_json.json")
    size = sf.get("bin_size_um")
    if isinstance(size, (int, float)) and size > 0:
        return int(round(float(size)))
    m = HD_LEVEL_FOLDER.match(level.name)
    return int(m.group(1)) if m else None


def _bins_under_tissue(level: Path) -> str:
    """The number of bins in a level's filtered matrix (from its HDF5 header, without reading it)."""
    try:
        import h5py
        with h5py.File(level / "filtered_feature_bc_matrix.h5", "r") as f:
            return f"{int(f['matrix/shape'][1]):,}"
    except Exception:       # a MEX folder, or an unreadable file: the count is only a hint
        return "?"


def aggregate_square_bins(adata, k: int, min_coverage: float = 0.5):
    """Square bins (Visium HD) summed k x k into bins k times larger; returns a new AnnData.

    Block = (array_row // k, array_col // k). Counts are summed; a block is kept when at least
    ``min_coverage`` of its k^2 bins are in ``adata`` (under tissue), so the tissue edge keeps blocks that
    are mostly tissue and drops slivers (their counts would come from a few bins). Each block is placed at
    its centre on the lattice: the mean position of its bins moved by the array -> pixel map (fitted by
    least squares on all bins) from their mean array index to the block's centre index, exact for any
    rotation and scale of the array on the image. Writes ``obs['array_row'/'array_col']`` (block
    indices), ``obs_names`` as Space Ranger names bins (``s_048um_00012_00034-1``), ``obsm['spatial']``
    (full-resolution px), and multiplies ``spot_diameter_fullres`` and ``bin_size_um`` of the scale
    factors by k."""
    import anndata as ad

    k = int(k)
    rows = adata.obs[keys.ARRAY_ROW].to_numpy(int)
    cols = adata.obs[keys.ARRAY_COL].to_numpy(int)
    xy = np.asarray(adata.obsm[keys.SPATIAL], float)
    block = np.c_[rows // k, cols // k]
    uniq, member = np.unique(block, axis=0, return_inverse=True)
    member = member.ravel()
    n_blocks = len(uniq)
    S = sp.csr_matrix((np.ones(len(member), np.float32), (member, np.arange(len(member)))),
                      shape=(n_blocks, len(member)))                # blocks x bins, 1 where a bin is in a block
    size = np.asarray(S.sum(1)).ravel()
    keep = size >= min_coverage * k * k
    if not keep.any():
        bin_um = keys.scalefactors(adata).get("bin_size_um")
        unit = f"bins of {bin_um:g} um" if bin_um else "bins"
        raise InputError(f"data.bin_um={f'{bin_um * k:g}' if bin_um else '?'}: no block of {k} x {k} {unit} has "
                         f"{100 * min_coverage:.0f}% of its bins under tissue (the tissue spans "
                         f"{np.ptp(rows) + 1} x {np.ptp(cols) + 1} {unit}, {adata.n_obs:,} of them under it); choose a "
                         "smaller data.bin_um.")
    A = np.c_[cols, rows, np.ones(len(rows))]
    coef = np.linalg.lstsq(A, xy, rcond=None)[0]              # (3, 2): (col, row, 1) -> (x, y)
    mean_idx = (S @ np.c_[cols, rows]) / size[:, None]
    centre_idx = uniq[:, ::-1] * k + (k - 1) / 2.0             # (col, row) of the block centre
    pos = (S @ xy) / size[:, None] + (centre_idx - mean_idx) @ coef[:2]
    X = sp.csr_matrix(S[keep] @ adata.X, dtype=np.float32)
    lib = keys.library_id(adata)
    uns = {keys.SPATIAL_UNS: {lib: dict(adata.uns[keys.SPATIAL_UNS][lib])}} if lib is not None else {}
    sf = dict(keys.scalefactors(adata))
    bin_um = sf.get("bin_size_um")
    for key in ("spot_diameter_fullres", "bin_size_um"):
        if key in sf:
            sf[key] = float(sf[key]) * k
    label = f"{int(round(bin_um * k)):03d}um" if bin_um else f"x{k}"
    names = [f"s_{label}_{r:05d}_{c:05d}-1" for r, c in uniq[keep]]
    obs = pd.DataFrame({keys.ARRAY_ROW: uniq[keep, 0], keys.ARRAY_COL: uniq[keep, 1], "in_tissue": 1},
                       index=pd.Index(names))
    out = ad.AnnData(X=X, obs=obs, var=adata.var.copy(), uns=uns)
    out.obsm[keys.SPATIAL] = pos[keep]
    if lib is not None:
        entry = out.uns[keys.SPATIAL_UNS][lib]
        entry["scalefactors"] = sf
        entry["metadata"] = dict(entry.get("metadata", {}), binned_from_um=bin_um, binned_k=k)
    log.info("summed %d bins into %d blocks of %d x %d; %d edge blocks left out (under %.0f%% of their bins "
             "under tissue)", adata.n_obs, int(keep.sum()), k, k, int((~keep).sum()), 100 * min_coverage)
    _finish_counts(out, f"{k} x {k} blocks")
    return out


def _first_of_exact_repeats(rows: pd.DataFrame, key, path, what: str, values: str) -> np.ndarray:
    """Mask (len(rows),) keeping one row per ``key`` value: a row repeated exactly under the same key (a
    file appended to twice by a script) is kept once, with a warning; a key whose rows differ is
    refused naming it (``what``: "barcode", "spot"; ``values``: what differs, for the message)."""
    key = pd.Index(key)
    if not key.has_duplicates:
        return np.ones(len(key), bool)
    distinct = rows.reset_index(drop=True).assign(_key=key.to_numpy()).drop_duplicates()
    if distinct["_key"].duplicated().any():
        k = distinct["_key"][distinct["_key"].duplicated()].iloc[0]
        raise InputError(f"{path}: {what} {k!r} has more than one row, with different {values}; each {what} must be "
                         "one row. Use the file as it was written.")
    keep = ~key.duplicated()
    log.warning("%s: %d row(s) repeat an earlier row exactly; kept once", path, int((~keep).sum()))
    return np.asarray(keep)


# ------------------------------------------------------------------------------------------
# Visium HD cells (Space Ranger 4's segmentation)
# ------------------------------------------------------------------------------------------
HD_CELL_MATRICES = ("filtered_feature_cell_matrix.h5", "filtered_feature_cell_matrix")
HD_CELL_POLYGONS = ("cell_segmentations.geojson", "graphclust_annotated_cell_segmentations.geojson")
HD_CELL_BARCODE = re.compile(r"^cellid_0*(\d+)-\d+$")        # cellid_000000042-1 -> 42


def is_hd_cell_folder(folder: Path) -> bool:
    """Whether ``folder`` is Space Ranger 4's ``segmented_outputs/`` of a Visium HD run (it holds the cells'
    count matrix)."""
    return any((folder / m).exists() for m in HD_CELL_MATRICES)


def read_hd_cells(folder, library_id: str | None = None):
    """Read the cells of a Visium HD run as Space Ranger 4 segments them (``outs/segmented_outputs/``): one
    observation per cell, which the stages treat as a spot.

    Files: the count matrix ``filtered_feature_cell_matrix.h5`` (or its MEX folder; barcodes
    ``cellid_000000042-1``); the cells' outlines ``cell_segmentations.geojson`` (else
    ``graphclust_annotated_cell_segmentations.geojson``): a GeoJSON FeatureCollection, one feature per cell with
    ``properties.cell_id`` (42 or its barcode) and a Polygon or MultiPolygon in full-resolution pixels (x, y) of
    the microscope image; and ``spatial/`` (``scalefactors_json.json``, hires/lowres PNGs; else the run's
    ``outs/spatial/``). Writes ``obsm['spatial']`` = each cell's centroid (full-resolution px, x, y; the
    area-weighted centroid of its outer rings), ``obs['cell_area_px']`` (its outline's area, full-resolution
    px^2) and ``scalefactors['spot_diameter_fullres']`` = the median diameter of a circle of a cell's area,
    which sets stage 1's patch. Cells lie on no array, so the graphs join them by pixel distance. Every cell of
    the matrix must have an outline (outlines of cells not in the matrix are ignored)."""
    import anndata as ad

    folder = Path(folder)
    library_id = library_id or folder.parent.name or folder.name
    h5, mex = (folder / m for m in HD_CELL_MATRICES)
    counts, barcodes, genes, counts_file = _read_10x_matrix(h5, mex)
    polygons_file = next((folder / n for n in HD_CELL_POLYGONS if (folder / n).exists()), None)
    if polygons_file is None:
        raise InputError(f"{folder}: the cells' count matrix is here but not their outlines "
                         f"({' or '.join(HD_CELL_POLYGONS)}), which place each cell on the image. Copy the run's whole "
                         "segmented_outputs/ folder.")
    centres, areas = _cell_centroids(polygons_file)
    keys_of_cells = pd.Index([_cell_key(b) for b in barcodes])
    rows = centres.index.get_indexer(keys_of_cells)
    if (rows < 0).any():
        bad = np.flatnonzero(rows < 0)
        raise InputError(f"{counts_file}: {len(bad)} of {len(barcodes)} cells (e.g. {str(barcodes[bad[0]])!r}) have "
                         f"no outline in {polygons_file}. The count matrix and the segmentation come from different "
                         "runs: use one run's segmented_outputs/ as Space Ranger wrote it.")
    obs = pd.DataFrame(index=pd.Index(barcodes, name=None))
    obs[keys.CELL_AREA] = areas[rows]
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=unique_gene_names(genes, counts_file)))
    adata.obsm[keys.SPATIAL] = centres.to_numpy(float)[rows]
    dirs = [folder / "spatial", folder.parent / "spatial"]
    sf_file = next((d / "scalefactors_json.json" for d in dirs if (d / "scalefactors_json.json").exists()),
                   dirs[0] / "scalefactors_json.json")
    _attach_spaceranger_images(adata, library_id, folder, dirs, sf_file)
    sf = adata.uns[keys.SPATIAL_UNS][library_id]["scalefactors"]
    for key in ("spot_diameter_fullres", "bin_size_um"):      # the run's bin sizes, not a cell's
        sf.pop(key, None)
    sizes = 2 * np.sqrt(areas[rows][areas[rows] > 0] / np.pi)
    if len(sizes):
        sf["spot_diameter_fullres"] = float(np.median(sizes))
    _check_coordinates(adata, polygons_file, "the cells' centroids")
    _finish_counts(adata, counts_file)
    if adata.n_obs > HD_LARGE_SLIDE:
        log.warning("%s: %d cells. Stages 1-3 took ~6 min and ~7 GB for 50,000 spots on 2 CPU cores and grow about "
                    "linearly; the run's bins summed to 32-48 um (data.path=%s, data.bin_um=48) are far fewer.",
                    folder, adata.n_obs, folder.parent)
    log.info("%s: Visium HD cells (Space Ranger's segmentation), median diameter %.1f full-resolution px%s",
             folder, sf.get("spot_diameter_fullres", float("nan")),
             f" ({sf['spot_diameter_fullres'] * sf['microns_per_pixel']:.1f} um)" if sf.get("microns_per_pixel") else "")
    return adata


def _cell_key(value):
    """A cell's id as an int (42 for ``42``, ``"42"`` or ``"cellid_000000042-1"``), else the text itself."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    m = HD_CELL_BARCODE.match(text)
    return int(m.group(1)) if m else int(text) if text.isdigit() else text


def _cell_centroids(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(centroids (x, y) indexed by cell id, areas in px^2) of a GeoJSON FeatureCollection of cell outlines: each
    cell's outer rings (a Polygon's, or every part of a MultiPolygon; holes are not subtracted), their shoelace
    centroids weighted by their areas; the vertices' mean where the area is zero."""
    try:
        collection = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid GeoJSON ({exc}); a file cut short by an interrupted copy reads so: copy "
                         "it again.") from None
    features = collection.get("features") if isinstance(collection, dict) else None
    if not features:
        raise InputError(f"{path}: no features; expected a GeoJSON FeatureCollection with one outline per cell.")
    ids, rings, owner = [], [], []
    for i, f in enumerate(features):
        props, geom = (f or {}).get("properties") or {}, (f or {}).get("geometry") or {}
        if "cell_id" not in props:
            raise InputError(f"{path}: feature {i} has no properties.cell_id; Space Ranger writes one per cell.")
        ids.append(_cell_key(props["cell_id"]))
        parts = {"Polygon": [geom.get("coordinates")], "MultiPolygon": geom.get("coordinates")}.get(geom.get("type"))
        try:
            outer = [p[0] for p in parts]
            if not all(len(r) for r in outer):
                raise ValueError
        except (TypeError, IndexError, ValueError):
            raise InputError(f"{path}: cell {props['cell_id']!r} has no Polygon or MultiPolygon outline "
                             f"(geometry type {geom.get('type')!r}).") from None
        rings += outer
        owner += [i] * len(outer)
    index = pd.Index(ids)
    if index.duplicated().any():
        raise InputError(f"{path}: cell {str(index[index.duplicated()][0])!r} has more than one outline; use the file "
                         "as Space Ranger wrote it.")
    lengths = np.array([len(r) for r in rings])
    try:
        pts = np.array(list(itertools.chain.from_iterable(rings)), dtype=float)
    except (TypeError, ValueError):
        pts = np.zeros(0)
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise InputError(f"{path}: an outline has vertices that are not (x, y) numbers.")
    pts = pts[:, :2]
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    nxt = np.arange(1, len(pts) + 1)
    nxt[starts + lengths - 1] = starts                    # each ring closes on its first vertex
    x, y = pts[:, 0], pts[:, 1]
    cross = x * y[nxt] - x[nxt] * y
    signed = np.add.reduceat(cross, starts) / 2           # per ring
    mx, my = np.add.reduceat((x + x[nxt]) * cross, starts) / 6, np.add.reduceat((y + y[nxt]) * cross, starts) / 6
    owner = np.asarray(owner)
    n = len(features)
    area = np.bincount(owner, np.abs(signed), minlength=n)
    ok = np.abs(signed) > 1e-12
    sign = np.where(ok, np.sign(signed), 0.0)              # |a| * (m / a) = sign(a) * m
    centre = np.c_[np.bincount(owner, sign * mx, minlength=n), np.bincount(owner, sign * my, minlength=n)]
    flat = area <= 1e-12
    centre[~flat] /= area[~flat, None]
    if flat.any():                                        # no area: the mean of its vertices
        vertex_owner = np.repeat(owner, lengths)
        counts = np.bincount(vertex_owner, minlength=n)
        mean = np.c_[np.bincount(vertex_owner, x, minlength=n), np.bincount(vertex_owner, y, minlength=n)]
        centre[flat] = mean[flat] / counts[flat, None]
    return pd.DataFrame(centre, index=index, columns=["x", "y"]), area


def read_visium(folder, library_id: str | None = None):
    """Read a Space Ranger output folder (see module docstring for the files used)."""
    import anndata as ad

    folder = Path(folder)
    library_id = library_id or folder.name
    counts, barcodes, genes, counts_file = _read_10x_counts(folder)
    positions, pos_file = _read_visium_positions(folder)
    raw = counts_file.name.startswith("raw_")
    repeated = pd.Index(barcodes)[pd.Index(barcodes).duplicated()].unique()
    if len(repeated):
        raise InputError(f"{counts_file}: {len(repeated)} barcode(s) occur more than once (e.g. {str(repeated[0])!r}); "
                         "every spot must be one column of the matrix. Is the file damaged, or two runs joined? "
                         "Use the matrix Space Ranger wrote.")
    positions = positions[_first_of_exact_repeats(positions, positions.index, pos_file, "barcode", "positions")]

    missing = ~pd.Index(barcodes).isin(positions.index)
    if missing.any():
        example = str(barcodes[np.flatnonzero(missing)[0]])
        hint = ""
        stripped = pd.Index([b.rsplit("-", 1)[0] for b in barcodes])
        if stripped.isin(positions.index.map(lambda b: b.rsplit("-", 1)[0])).mean() > 0.9:
            hint = " The barcodes differ only in their '-N' suffix: use files from the same Space Ranger run."
        elif len(positions) < len(barcodes):
            hint = (f" It lists only {len(positions)} spots, fewer than the matrix's {len(barcodes)} (Space Ranger lists "
                    "every spot of the array): is it complete, not cut short by an interrupted copy?")
        raise InputError(
            f"{counts_file}: {missing.sum()} of {len(barcodes)} barcodes (e.g. {example!r}) are not in "
            f"{pos_file}. The count matrix and the spatial folder come from different slides or runs.{hint}")
    positions = positions.loc[barcodes]
    off = positions["in_tissue"].to_numpy() == 0
    if raw:       # every array barcode: keep those under tissue, which is what the filtered matrix holds
        if off.all():
            raise InputError(f"{pos_file}: no spot of {counts_file} is marked in_tissue=1.")
        log.warning("%s: only the raw matrix is here; keeping the %d of its %d spots marked in_tissue=1 in %s "
                    "(what Space Ranger's filtered matrix holds)", folder, int((~off).sum()), len(off), pos_file.name)
        counts, barcodes, positions = counts[~off], barcodes[~off], positions[~off]
        off = off[~off]
    if off.mean() > 0.01:
        raise InputError(
            f"{pos_file}: {off.sum()} of the {len(barcodes)} spots in {counts_file} are marked in_tissue=0 there, "
            "but a filtered matrix holds only spots under tissue. The spatial/ folder belongs to another slide "
            "(every Visium positions file lists all array barcodes, so they always 'match').")
    if off.any():
        log.warning("%s: %d spots of the matrix are marked in_tissue=0", pos_file, off.sum())

    obs = pd.DataFrame(index=pd.Index(barcodes, name=None))
    obs[keys.ARRAY_ROW] = positions["array_row"].to_numpy(int)
    obs[keys.ARRAY_COL] = positions["array_col"].to_numpy(int)
    obs["in_tissue"] = positions["in_tissue"].to_numpy(int)
    var = pd.DataFrame(index=unique_gene_names(genes, counts_file))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm[keys.SPATIAL] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)

    image_dirs = [folder / "spatial"]
    if folder.parent.name == "binned_outputs":          # an HD level without its own copy of the images
        image_dirs.append(folder.parent.parent / "spatial")
    _attach_spaceranger_images(adata, library_id, folder, image_dirs, folder / "spatial" / "scalefactors_json.json")
    _finish_counts(adata, counts_file)
    return adata


def _attach_spaceranger_images(adata, library_id: str, folder: Path, image_dirs: list, sf_file: Path) -> None:
    """Write ``uns['spatial'][library_id]``: the scale factors of ``sf_file`` and the hires/lowres PNGs, each
    from the first of ``image_dirs`` holding it (an image without its scale factor is refused)."""
    scalefactors = _read_scalefactors(sf_file)
    images, image_files = {}, {}
    for key in ("hires", "lowres"):
        img_path = next((d / f"tissue_{key}_image.png" for d in image_dirs
                         if (d / f"tissue_{key}_image.png").exists()), None)
        if img_path is None:
            continue
        image_files[key] = str(img_path)
        if f"tissue_{key}_scalef" not in scalefactors:
            raise InputError(f"{img_path} exists but {sf_file} "
                             + (f"has no 'tissue_{key}_scalef': add the scale factor Space Ranger wrote."
                                if sf_file.exists() else
                                "is missing: copy it from the Space Ranger run's outs/spatial/ (it says "
                                "how the image's pixels relate to the spot positions)."))
        images[key] = read_image(img_path)
    adata.uns[keys.SPATIAL_UNS] = {library_id: {
        "images": images, "scalefactors": scalefactors,
        "metadata": {"source": str(folder), "image_files": image_files}}}


@contextmanager
def _quiet_name_warnings():
    """Silence anndata's multi-line "names are not unique" UserWarning while reading: repeated gene names
    are said in one line (:func:`unique_gene_names`), repeated spot names refused in one."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* names are not unique", category=UserWarning)
        yield


def _read_10x_counts(folder: Path):
    """The count matrix of a Space Ranger folder: ``(X, barcodes, gene names, file)``; repeated gene
    names are kept (the caller renames them, :func:`unique_gene_names`)."""
    h5 = folder / "filtered_feature_bc_matrix.h5"
    mex = folder / "filtered_feature_bc_matrix"
    if not h5.exists() and not mex.is_dir():
        # 10x's dataset pages name the matrix by the dataset (V1_Human_Lymph_Node_filtered_feature_bc_matrix.h5)
        # beside the unpacked spatial/ folder, as scanpy's read_visium(count_file=...) reads it
        named = sorted(folder.glob("?*_filtered_feature_bc_matrix.h5"))
        if len(named) > 1:
            raise InputError(f"{folder}: {len(named)} count matrices ({', '.join(f.name for f in named)}); keep the "
                             "one of this slide, or give each slide its own folder.")
        if named:
            h5 = named[0]
            log.info("%s: reading the count matrix %s", folder, h5.name)
    if not h5.exists() and not mex.is_dir():         # only the raw matrix: read_visium keeps the tissue spots
        for name in COUNT_MATRICES[2:]:
            if (folder / name).exists() and (folder / "spatial").is_dir():
                h5, mex = (folder / name, mex) if name.endswith(".h5") else (h5, folder / name)
                break
    if not h5.exists() and not mex.is_dir():
        root = _spaceranger_root_of(folder)
        hint = f" It looks like a subfolder of a Space Ranger folder: set data.path={root}" if root else \
            _what_a_folder_holds(folder)
        raise InputError(f"{folder}: no count matrix. Expected {h5.name} or the folder {mex.name}/ "
                         f"(matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz) as written by Space Ranger.{hint}")
    return _read_10x_matrix(h5, mex)


def _read_10x_matrix(h5: Path, mex: Path):
    """``(X, barcodes, gene names, file)`` of a 10x count matrix: ``h5`` when it exists, else the MEX folder
    ``mex`` (genes by symbol, as the .h5 names them)."""
    import scanpy as sc

    source = h5 if h5.exists() else mex
    if not h5.exists():
        for name in ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"):
            if not (mex / name).exists() and not (mex / name.replace(".gz", "")).exists() \
                    and not (name.startswith("features") and (mex / "genes.tsv").exists()):
                raise InputError(f"{mex / name}: missing from the 10x MEX folder.")
    try:
        with _quiet_name_warnings():
            a = sc.read_10x_h5(h5) if h5.exists() else sc.read_10x_mtx(mex, var_names="gene_ids", make_unique=False)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py, gzip, scipy.io and pandas raise many types
        if not h5.exists():       # name the MEX file at fault where one is cut short or empty (GEO names its own)
            source = next((f for f in sorted(mex.iterdir()) if _gzip_damaged(f)), source)
        raise InputError(f"{source}: cannot be read as a 10x count matrix ({_last_line(exc)}); a truncated or damaged "
                         "file (an interrupted copy) reads so: copy it again.") from None
    if not h5.exists() and "gene_symbols" in a.var:    # genes by symbol, as the .h5 names them; the id where none
        symbols = a.var["gene_symbols"].astype(object)
        empty = (symbols.isna() | (symbols.astype(str).str.strip() == "")).to_numpy()
        if empty.any():
            log.info("%s: %d of %d features have no gene symbol in features.tsv; their ids name them (e.g. %s)",
                     source, int(empty.sum()), len(empty), a.var_names[np.argmax(empty)])
        a.var_names = np.where(empty, np.asarray(a.var_names, dtype=str), symbols.astype(str).to_numpy())
    X = sp.csr_matrix(a.X, dtype=np.float32)
    return X, np.asarray(a.obs_names, dtype=str), np.asarray(a.var_names, dtype=str), source


def _gzip_damaged(path: Path) -> bool:
    """Whether ``path`` is a gzip file that is empty or does not decompress to its end (read through once,
    only when a read has failed)."""
    if path.suffix != ".gz":
        return False
    try:
        with gzip.open(path, "rb") as f:
            if not f.read(1):
                return True
            while f.read(1 << 20):
                pass
    except (OSError, EOFError):
        return True
    return False


def read_geo_sample(folder, sample: str | None = None, library_id: str | None = None,
                    name_picks_only_of_several: bool = False):
    """Read a Visium sample whose files lie flat in ``folder`` named as GEO names them (prefixed, mostly
    gzipped; an unpacked ``GSE..._RAW.tar`` holds several samples: ``sample``, ``data.name``, picks one by
    part of its prefix). The sample is laid out in a temporary Space Ranger folder
    (:func:`data.geo_layout.lay_out_geo_sample`: links, and the small gzipped files unzipped) and read by
    :func:`read_visium`; errors name the GEO files. ``library_id``: default the sample's prefix. With
    ``name_picks_only_of_several`` (``data.name``, which also names the library and a stage-5 section), a
    folder of one sample is read whatever ``sample`` says."""
    import tempfile

    from data.geo_layout import choose_sample, find_geo_samples, lay_out_geo_sample

    folder = Path(folder)
    samples = find_geo_samples(folder)
    if name_picks_only_of_several and len(samples) == 1:
        sample = None
    prefix = choose_sample(samples, folder, sample, option="data.name")
    with tempfile.TemporaryDirectory(prefix="stpipe_geo_") as tmp:
        written = lay_out_geo_sample(folder, Path(tmp) / "sample", prefix, symbolic=True, option="data.name")
        try:
            adata = read_visium(Path(tmp) / "sample", library_id or prefix)
        except InputError as exc:            # name the user's files, not the temporary ones
            message = str(exc)
            for target, source in sorted(written.items(), key=lambda kv: -len(str(kv[0]))):
                message = message.replace(str(target), str(source))
            raise InputError(message.replace(str(Path(tmp) / "sample"), str(folder))) from None
    entry = adata.uns[keys.SPATIAL_UNS][keys.library_id(adata)]
    by_name = {t.name: str(s) for t, s in written.items()}
    entry["metadata"] = {**entry["metadata"], "source": str(folder),
                         "image_files": {k: by_name.get(Path(v).name, v)
                                         for k, v in entry["metadata"].get("image_files", {}).items()}}
    log.info("%s: read sample %r from its GEO files", folder, prefix)
    return adata


def _read_visium_positions(folder: Path):
    old = folder / "spatial" / "tissue_positions_list.csv"
    new = folder / "spatial" / "tissue_positions.csv"
    parquet = folder / "spatial" / "tissue_positions.parquet"     # Visium HD (Space Ranger >= 3)
    what = "Space Ranger's spot positions table"
    if new.exists():
        df = read_text_table(new, what)
        src = new
        if set(VISIUM_POSITION_COLUMNS) <= set(map(str, df.columns)):
            df = df[VISIUM_POSITION_COLUMNS]    # by name: a tool that rewrote the file may have reordered them
        else:
            df = read_text_table(new, what, header=None)  # some tools write the new name without a header
            if df.shape[1] >= 6 and pd.to_numeric(df.iloc[0, 2:6], errors="coerce").isna().all():
                raise InputError(f"{new}: its header ({', '.join(map(str, df.iloc[0, :6]))}) does not name the "
                                 f"columns Space Ranger writes: {', '.join(VISIUM_POSITION_COLUMNS)}; rename them.")
    elif old.exists():
        df = read_text_table(old, what, header=None)
        src = old
    elif parquet.exists():
        src = parquet
        try:
            df = pd.read_parquet(parquet)
        except ImportError:
            raise InputError(f"{parquet}: reading parquet needs pyarrow (pip install pyarrow; it is in "
                             "requirements.txt).") from None
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a damaged file
            raise InputError(f"{parquet}: cannot be read as Space Ranger's spot positions table ({_last_line(exc)}); a "
                             "file cut short, e.g. by an interrupted copy, reads so: copy it again.") from None
        if not set(VISIUM_POSITION_COLUMNS) <= set(map(str, df.columns)):
            raise InputError(f"{parquet}: expected the columns {', '.join(VISIUM_POSITION_COLUMNS)}; found "
                             f"{', '.join(map(str, df.columns[:6]))}.")
        df = df[VISIUM_POSITION_COLUMNS]
    else:
        packed = sorted(folder.glob("*spatial.tar.gz"))    # as 10x's dataset pages give it
        hint = f" {packed[0].name} is here: unpack it in {folder} (tar -xzf {packed[0].name})." if packed else ""
        raise InputError(f"{folder / 'spatial'}: no spot positions. Expected tissue_positions_list.csv "
                         "(Space Ranger < 2.0), tissue_positions.csv (>= 2.0) or, for Visium HD, "
                         f"tissue_positions.parquet in the spatial/ folder.{hint}")
    if df.shape[1] < 6:
        raise InputError(f"{src}: expected 6 columns ({', '.join(VISIUM_POSITION_COLUMNS)}), found {df.shape[1]}.")
    df = df.iloc[:, :6]
    df.columns = VISIUM_POSITION_COLUMNS
    try:
        for c in VISIUM_POSITION_COLUMNS[1:]:
            df[c] = pd.to_numeric(df[c])
    except ValueError as exc:
        raise InputError(f"{src}: non-numeric value in the position columns ({exc}).") from None
    empty = df[VISIUM_POSITION_COLUMNS[1:]].isna().any(axis=1)
    if empty.any():
        raise InputError(f"{src}: {int(empty.sum())} row(s) with an empty or NA position value (first: barcode "
                         f"{df.loc[empty.idxmax(), 'barcode']!r}); every row needs in_tissue, array row/col and "
                         "pixel row/col.")
    flag = ~df["in_tissue"].isin([0, 1])
    if flag.any():
        raise InputError(f"{src}: in_tissue must be 1 (under tissue) or 0 on every row; barcode "
                         f"{df.loc[flag.idxmax(), 'barcode']!r} has {df.loc[flag.idxmax(), 'in_tissue']:g}.")
    df["barcode"] = df["barcode"].astype(str)
    return df.set_index("barcode"), src


def _read_scalefactors(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        sf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(sf, dict):
        raise InputError(f"{path}: expected a JSON object of scale factors ({{\"tissue_hires_scalef\": ..., "
                         f"\"spot_diameter_fullres\": ...}}, as Space Ranger writes it); found {_clip(json.dumps(sf))}.")
    # only the image scale factors read here are checked: CytAssist runs add others
    # (e.g. regist_target_img_scalef) that this pipeline never uses
    for k, v in sf.items():
        if k in IMAGE_SCALEFACTORS and not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise InputError(f"{path}: {k}={v!r}; an image scale factor must be a number in (0, 1] "
                             "(image pixels per full-resolution pixel).")
    v = sf.get("spot_diameter_fullres")
    if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
        raise InputError(f"{path}: spot_diameter_fullres={v!r}; it must be a number above 0 (the spot's diameter "
                         "in full-resolution pixels). Fix the file, or give the patch size as "
                         "--set image.patch_size_fullres=PIXELS.")
    return sf


# ------------------------------------------------------------------------------------------
# .h5ad
# ------------------------------------------------------------------------------------------
def unique_gene_names(names, source) -> pd.Index:
    """``names`` (gene names) made unique as scanpy's ``var_names_make_unique`` does (the second ``TBCE``
    becomes ``TBCE-1``), saying so: genes are chosen by name (``plot.genes``, ``superres.genes``,
    ``predict.genes``), so a user looking for a repeated symbol needs to know it was renamed.
    Gene-symbol matrices often repeat a few."""
    import anndata as ad

    names = pd.Index(np.asarray(names, dtype=str))
    if not names.has_duplicates:
        return names
    dup = names[names.duplicated()].unique()
    log.info("%s: %d gene name(s) occur more than once (e.g. %s); the repeats are renamed NAME-1, NAME-2, ... "
             "as scanpy's var_names_make_unique does", source, len(dup), ", ".join(map(repr, dup[:3])))
    return ad.utils.make_index_unique(names)


def read_h5ad(path, library_id: str | None = None):
    """Read an .h5ad (or a folder written by ``AnnData.write_zarr``) with raw counts (``X``,
    ``layers['counts']``, or ``adata.raw`` when ``X`` holds normalised values) and ``obsm['spatial']``. Spots marked ``obs['in_tissue'] = 0`` (a raw matrix)
    are left out, with a warning.

    ``uns['spatial']`` follows scanpy/squidpy: one entry per library with ``images`` (``hires`` /
    ``lowres``; uint8, or floats in [0, 1] as scanpy's ``read_visium`` stores them: converted to
    uint8 RGB here) and their ``tissue_{hires,lowres}_scalef`` in ``scalefactors``. A file holding
    several libraries (slides concatenated) is cut to the one named ``library_id`` (``data.name``),
    its spots found by ``obs['library_id']`` (or another obs column whose values are the library
    ids); without a name it is refused, since using the first slide silently would be wrong.
    """
    import anndata as ad

    path = Path(path)
    if path.is_dir() and not _anndata_reads_zarr3():
        raise InputError(f"{path}: an AnnData .zarr folder, which anndata {anndata_version()} cannot read beside zarr 3 "
                         "(needed here for tiled TIFFs): anndata 0.12 or newer can (pip install -U anndata), or save "
                         "the AnnData as .h5ad (adata.write_h5ad) and give that.")
    try:
        with _quiet_name_warnings():
            adata = ad.read_zarr(path) if path.is_dir() else ad.read_h5ad(path)
    except Exception as exc:  # h5py and zarr raise many types
        kind = "an AnnData .zarr" if path.is_dir() else ".h5ad"
        raise InputError(f"{path}: cannot be read as {kind} ({exc}).") from None
    return conform_anndata(adata, path, library_id)


def conform_anndata(adata, path: Path, library_id: str | None = None):
    """An AnnData read from ``path`` (an .h5ad, an AnnData .zarr, a SpatialData store's table) checked and
    brought to what every reader returns (see the module docstring and :func:`read_h5ad`): one library,
    unique spot names, raw counts in ``X`` (from ``layers['counts']`` or ``raw`` when ``X`` is not counts),
    spots under tissue, ``obsm['spatial']`` as (x, y), gene symbols as names, images as uint8 RGB with their
    scale factors, array coordinates."""
    adata = _one_library(adata, path, library_id)
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise InputError(f"{path}: {len(dup)} spot names occur more than once (e.g. {list(dup[:3])}); labels, "
                         "training splits and outputs are matched by spot name, so they must be unique. A file "
                         "joining several slides needs them told apart (e.g. the library id as a prefix, "
                         "adata.obs_names_make_unique(), or data.name to read one slide).")
    if "counts" in adata.layers:
        adata.X = adata.layers["counts"]
    elif adata.raw is not None and not _integer_valued(adata.X) and _integer_valued(adata.raw.X):
        log.info("%s: X is not counts; reading the raw counts in adata.raw", path)
        raw = adata.raw.to_adata()
        for key, value in adata.obsm.items():
            raw.obsm[key] = value
        raw.uns = dict(adata.uns)
        adata = raw
    if keys.SPATIAL not in adata.obsm:
        raise InputError(f"{path}: obsm['spatial'] is missing; store spot centres as (x, y) "
                         f"full-resolution pixels in obsm['spatial']{_spatial_candidates(adata)}.")
    off = np.zeros(adata.n_obs, bool)
    if "in_tissue" in adata.obs:       # 0/1 in any type: a float 0.0 (a column that once held NaN) is off tissue
        flags, bad = zero_one_flags(adata.obs["in_tissue"])
        if bad is not None:
            raise InputError(f"{path}: obs['in_tissue'] must be 1 (under tissue) or 0 for every spot, as Space Ranger "
                             f"writes it; spot {adata.obs_names[bad]!r} has {str(adata.obs['in_tissue'].iloc[bad])!r}. "
                             "Set it to 0/1 (or true/false), or delete the column when every spot is under tissue.")
        off = flags == 0
    if off.any():
        if off.all():
            raise InputError(f"{path}: every spot is marked obs['in_tissue']=0 (none under tissue).")
        log.warning("%s: %d of %d spots are marked obs['in_tissue']=0 (off the tissue, as in "
                    "Space Ranger's raw matrix); they are left out", path, off.sum(), len(off))
        adata = adata[~off].copy()
    adata.obsm[keys.SPATIAL] = _spatial_xy(adata.obsm[keys.SPATIAL], path)
    _check_coordinates(adata, path, "obsm['spatial']")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    _symbols_for_ensembl_ids(adata, path)
    adata.var_names = unique_gene_names(adata.var_names, path)
    if not adata.uns.get(keys.SPATIAL_UNS):
        adata.uns[keys.SPATIAL_UNS] = {path.stem: {"images": {}, "scalefactors": {}, "metadata": {}}}
    _check_uns_images(adata, path)
    _check_array_columns(adata, path)
    if keys.ARRAY_COL not in adata.obs or keys.ARRAY_ROW not in adata.obs:
        _infer_array(adata, path)
    _finish_counts(adata, path, hint="" if _integer_valued(adata.X) else _count_layer_candidates(adata),
                   library_sizes=adata.obs.get(keys.TOTAL_COUNTS))
    return adata


ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# var columns where tools keep gene symbols beside Ensembl ids (scanpy's read_visium/read_10x with
# gene_ids as var_names, CELLxGENE, Seurat conversions), in the order they are tried
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "gene_names", "symbol", "Symbol",
                  "SYMBOL", "gene_short_name", "gene")


def _symbols_for_ensembl_ids(adata, path: Path) -> None:
    """Gene symbols as ``var_names`` when an .h5ad names its genes by Ensembl id and keeps the symbols
    in a ``var`` column (:data:`SYMBOL_COLUMNS`), as a Space Ranger folder is read (and scanpy's
    ``read_visium`` does by default): genes are chosen by symbol in the config (``plot.genes``,
    ``superres.genes``, ``predict.genes``), and stage 4/5 sections must share gene names, so an .h5ad
    by id beside a folder by symbol shared no gene. The ids are kept in ``var['gene_ids']``; a gene
    without a symbol keeps its id. Nothing changes when most names are not Ensembl ids or no column
    holds symbols (MOB's count tables: ids only)."""
    names = pd.Index(adata.var_names.astype(str))
    if not len(names) or names.str.match(ENSEMBL_ID).mean() < 0.9:
        return
    for col in SYMBOL_COLUMNS:
        if col not in adata.var:
            continue
        values = adata.var[col].astype(object)
        text = values.map(lambda v: v.strip() if isinstance(v, str) else "")
        usable = (text != "") & ~text.str.match(ENSEMBL_ID) & ~text.str.lower().isin(["nan", "na", "none"])
        if usable.mean() < 0.5 or text[usable].nunique() < 0.9 * usable.sum():   # not names (a feature type)
            continue
        adata.var["gene_ids"] = names.to_numpy()
        adata.var_names = pd.Index(np.where(usable.to_numpy(), text.to_numpy(), names.to_numpy()).astype(str))
        log.info("%s: genes are named by Ensembl id; using the symbols in var[%r] as gene names, as a Space "
                 "Ranger folder is read (%d of %d genes have one; the ids are kept in var['gene_ids']; to keep "
                 "the ids as names, drop that column)", path, col, int(usable.sum()), len(names))
        return


SPATIAL_COLUMN_PAIRS = (("x", "y"), ("X", "Y"), ("imagecol", "imagerow"), ("pxl_col_in_fullres", "pxl_row_in_fullres"),
                        ("sdimx", "sdimy"), ("x_centroid", "y_centroid"), ("center_x", "center_y"),
                        ("pixel_x", "pixel_y"))


def _spatial_xy(stored, path) -> np.ndarray:
    """``obsm['spatial']`` of an .h5ad as float (n, 2) (x, y): a data frame's values, the first two
    columns of a wider array (a third is z, as squidpy allows; it is said and dropped). Fewer than two
    columns, or values that are not numbers, are refused naming the file."""
    values = stored.to_numpy() if isinstance(stored, pd.DataFrame) else np.asarray(stored)
    if values.ndim != 2 or values.shape[1] < 2:
        raise InputError(f"{path}: obsm['spatial'] has shape {values.shape}; it must hold each spot's centre as "
                         "two columns (x, y) in full-resolution pixels.")
    try:
        xy = np.asarray(values[:, :2], dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{path}: obsm['spatial'] holds values that are not numbers (e.g. {_clip(str(list(values[0, :2])))}); "
                         "it must hold each spot's centre (x, y) in full-resolution pixels.") from None
    if values.shape[1] > 2:
        log.info("%s: obsm['spatial'] has %d columns; the first two are taken as (x, y) full-resolution pixels",
                 path, values.shape[1])
    return xy


def _spatial_candidates(adata) -> str:
    """Where else such a file may keep the spot centres (other obsm keys, obs column pairs), as a
    hint with the line that moves them, or ""."""
    found = [f"adata.obsm['spatial'] = adata.obsm[{k!r}][:, :2]" for k, v in adata.obsm.items()
             if np.ndim(v) == 2 and np.shape(v)[1] >= 2 and "spatial" in str(k).lower()]
    found += [f"adata.obsm['spatial'] = adata.obs[[{x!r}, {y!r}]].to_numpy()" for x, y in SPATIAL_COLUMN_PAIRS
              if x in adata.obs and y in adata.obs]
    return f"; this file may hold them elsewhere: {found[0]}" if found else ""


def _count_layer_candidates(adata) -> str:
    """A hint for an .h5ad whose ``X`` is not counts: the pipeline's own stage-4 or stage-5 prediction (which
    has none), or the layers of ``adata`` that hold integer counts; "" when there is nothing to say."""
    made_by = {keys.PREDICTION: "stage 5's prediction (predict_expression.py)",
               keys.SUPERRES: "stage 4's super-resolved map (train_superres.py)"}
    for key, what in made_by.items():
        if key in adata.uns:
            return (f" This file is {what}: X holds predicted log1p(CP10k), with no counts behind it, so stages 1-3 "
                    "(whose decoder models counts) cannot take it. To find regions in it, cluster it directly, e.g. "
                    "with scanpy: sc.pp.pca(a); sc.pp.neighbors(a); sc.tl.leiden(a).")
    named = [k for k, v in adata.layers.items() if k is not None and _integer_valued(v)]   # None: anndata 0.13's X
    return (f" This file's layers[{named[0]!r}] holds integers: if those are the raw counts, store them as "
            f"layers['counts'] (adata.layers['counts'] = adata.layers[{named[0]!r}])." if named else "")


def _one_library(adata, path: Path, library_id: str | None):
    """``adata`` cut to one library of a multi-library .h5ad (see :func:`read_h5ad`)."""
    libs = list(adata.uns.get(keys.SPATIAL_UNS) or {})
    if library_id is None and len(libs) <= 1:
        return adata
    if library_id is None:
        raise InputError(f"{path}: uns['spatial'] holds {len(libs)} libraries ({', '.join(map(str, libs[:5]))}"
                         f"{', ...' if len(libs) > 5 else ''}); name the slide to use with data.name=<library id>.")
    if str(library_id) not in map(str, libs):
        if len(libs) <= 1:
            return adata    # a single-slide file: data.name is only the section's name
        raise InputError(f"{path}: data.name={library_id!r} is not among the libraries in uns['spatial'] "
                         f"({', '.join(map(str, libs))}).")
    columns = ["library_id"] + [c for c in adata.obs.columns if c != "library_id"]
    for col in columns:
        if col not in adata.obs:
            continue
        values = adata.obs[col].astype(str)
        if values.isin(list(map(str, libs))).all() and (values == str(library_id)).any():
            entry = adata.uns[keys.SPATIAL_UNS][next(lib for lib in libs if str(lib) == str(library_id))]
            adata = adata[(values == str(library_id)).to_numpy()].copy()
            adata.uns[keys.SPATIAL_UNS] = {str(library_id): entry}
            return adata
    raise InputError(f"{path}: uns['spatial'] holds {len(libs)} libraries but no obs column (e.g. "
                     f"obs['library_id']) says which spots belong to {library_id!r}.")


def _check_array_columns(adata, path: Path) -> None:
    """``obs['array_row'/'array_col']`` as whole numbers; when some are missing (NaN), not numbers or
    not whole, both columns are dropped with a warning, and :func:`_infer_array` recovers them from
    ``obsm['spatial']`` as for a file without them (a NaN row index ended deep inside numpy: the
    spacing's least squares in stage 1, the grid's size in stage 4)."""
    if keys.ARRAY_COL not in adata.obs or keys.ARRAY_ROW not in adata.obs:
        return
    arr = np.column_stack([pd.to_numeric(adata.obs[c].astype(object), errors="coerce").to_numpy(float)
                           for c in (keys.ARRAY_COL, keys.ARRAY_ROW)])
    bad = ~np.isfinite(arr).all(1)
    bad[~bad] = (arr[~bad] % 1 != 0).any(1)
    if not bad.any():
        adata.obs[keys.ARRAY_COL], adata.obs[keys.ARRAY_ROW] = arr[:, 0].astype(int), arr[:, 1].astype(int)
        return
    log.warning("%s: obs['array_row'/'array_col'] are missing or not whole numbers for %d spot(s) (first: %r); "
                "both are ignored and recovered from obsm['spatial'] where the spots lie on a lattice",
                path, int(bad.sum()), str(adata.obs_names[np.flatnonzero(bad)[0]]))
    del adata.obs[keys.ARRAY_COL], adata.obs[keys.ARRAY_ROW]


def _infer_array(adata, path: Path) -> None:
    """``obs['array_row'/'array_col']`` recovered from ``obsm['spatial']`` when the spots lie on a
    Visium (hexagonal) or ST (square) lattice (:func:`data.lattice.infer_array_coordinates`);
    recorded as ``uns['spatial'][lib]['metadata']['array_inferred']`` = 'hex' | 'square'. Other layouts
    keep no array: the stages fall back to pixel distances, and stage 4's pooling says it needs one."""

    from data.lattice import infer_array_coordinates

    found = infer_array_coordinates(adata.obsm[keys.SPATIAL])
    if found is None:
        log.info("%s: no array_row/array_col in obs and the spots are not on a regular "
                 "lattice; going on with pixel positions only", path)
        return
    array, kind = found
    adata.obs[keys.ARRAY_COL], adata.obs[keys.ARRAY_ROW] = array[:, 0], array[:, 1]
    entry = adata.uns[keys.SPATIAL_UNS][keys.library_id(adata)]
    entry.setdefault("metadata", {})["array_inferred"] = kind
    log.info("%s: no array_row/array_col in obs; recovered them from obsm['spatial'] "
             "(%s lattice)", path, "hexagonal" if kind == "hex" else "square")


def _one_number(v):
    """A scale factor as a Python number when it is a number stored as a NumPy scalar or a one-element
    array (as some writers leave them in ``uns``); anything else unchanged, for the checks to name."""
    if isinstance(v, (np.ndarray, np.generic, list, tuple)):
        a = np.asarray(v)
        if a.size == 1 and np.issubdtype(a.dtype, np.number) and a.dtype != bool:
            return a.reshape(()).item()
    return v


def _check_uns_images(adata, path: Path) -> None:
    """Images under ``uns['spatial'][lib]['images']`` as uint8 RGB, each with its scale factor."""
    lib = keys.library_id(adata)
    entry = adata.uns[keys.SPATIAL_UNS][lib]
    images = dict(entry.get("images") or {})
    scalefactors = {k: _one_number(v) for k, v in dict(entry.get("scalefactors") or {}).items()}
    fullres = [k for k in images if str(k).lower() in FULLRES_IMAGE_KEYS]
    if fullres:
        # a full-resolution image kept in the file (stLearn's quality='fulres' stores it as 'fulres'): read as
        # image.use=fullres; without a scale factor of its own it is at scale 1, by its name
        name = "fullres" if "fullres" in images else fullres[0]
        images["fullres"] = images.pop(name)
        scalefactors["tissue_fullres_scalef"] = scalefactors.pop(f"tissue_{name}_scalef", 1.0)
        log.info("%s: uns['spatial'][%r]['images'][%r] is read as the full-resolution image (scale %s)",
                 path, lib, name, scalefactors["tissue_fullres_scalef"])
    for k in (*IMAGE_SCALEFACTORS, "tissue_fullres_scalef", *(f"tissue_{k}_scalef" for k in images)):
        v = scalefactors.get(k)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1):
            raise InputError(f"{path}: uns['spatial'][{lib!r}]['scalefactors'][{k!r}]={v!r}; an image scale factor must "
                             "be a number in (0, 1] (image pixels per full-resolution pixel).")
    # another key with its own tissue_<key>_scalef, as scanpy's img_key allows (HEST-1k's 'downscaled_fullres'):
    # read as hires, else lowres, where the file has none, the finer first
    named = sorted((k for k in images if k not in keys.IMAGE_KINDS and f"tissue_{k}_scalef" in scalefactors),
                   key=lambda k: -scalefactors[f"tissue_{k}_scalef"])
    for k, kind in zip(named, [kind for kind in ("hires", "lowres") if kind not in images]):
        images[kind] = images.pop(k)
        scalefactors[f"tissue_{kind}_scalef"] = scalefactors.pop(f"tissue_{k}_scalef")
        log.info("%s: uns['spatial'][%r]['images'][%r] is read as the %s image (scale %s)", path, lib, k, kind,
                 scalefactors[f"tissue_{kind}_scalef"])
    unread = [k for k in images if k not in keys.IMAGE_KINDS]
    if unread:
        log.warning("%s: uns['spatial'][%r]['images'] holds %s, which %s not read: images are taken from the keys "
                    "'hires' and 'lowres' (each with tissue_<key>_scalef in scalefactors), 'fullres', and another key "
                    "with its own tissue_<key>_scalef where hires or lowres is free. Rename it to use it%s.", path,
                    lib, ", ".join(map(repr, unread)), "is" if len(unread) == 1 else "are",
                    "" if any(k in images for k in keys.IMAGE_KINDS) else " (the slide has no other image)")
    entry["scalefactors"] = scalefactors
    for kind in keys.IMAGE_KINDS:
        if kind not in images:
            continue
        where = f"{path}: uns['spatial'][{lib!r}]['images'][{kind!r}]"
        if f"tissue_{kind}_scalef" not in scalefactors:
            raise InputError(f"{where} has no 'tissue_{kind}_scalef' in uns['spatial'][{lib!r}]['scalefactors']: "
                             "add the scale factor Space Ranger wrote (scalefactors_json.json), or drop the image.")
        images[kind] = as_rgb_uint8(images[kind], where)
    entry["images"] = images


# ------------------------------------------------------------------------------------------
# legacy Spatial Transcriptomics
# ------------------------------------------------------------------------------------------
# a legacy ST count table and selection table are taken as one section's when at least this share of
# the table's spots are in the other table, both ways (every her2st and MOB pair here: >= 0.984; the
# her2st tables of two different sections, same patient included: < 0.95, down to 0.94 for F1/F2 with
# the forward share alone). Spot ids are array coordinates, which repeat across sections, so a count
# table with a neighbouring section's selection table used to run on the spots they share.
ST_MATCH = 0.95


def read_legacy_st(counts_path, spots_path, library_id: str | None = None):
    """Read a legacy ST section: counts table (spot ids ``"XxY"``) + selection table.

    ``obsm['spatial']`` = (pixel_x, pixel_y) from the selection table (full-resolution pixels of
    the section's H&E); ``obs['array_col'/'array_row']`` = (x, y) array coordinates. Only spots
    present in both tables (and ``selected == 1`` when that column exists) are kept.
    """
    import anndata as ad

    counts_path, spots_path = Path(counts_path), Path(spots_path)
    check_input_files({"counts": counts_path, "spots": spots_path})
    table = read_text_table(counts_path, "a spots x genes count table", index_col=0)
    ids = table.index.astype(str)
    if _fraction_st_ids(ids) < 0.5:
        if _fraction_st_ids(table.columns.astype(str)) >= 0.5:
            table = table.T  # genes x spots
            ids = table.index.astype(str)
        else:
            raise InputError(f"{counts_path}: spot ids must look like '<x>x<y>' (e.g. '10x21'); "
                             f"found {_clip(ids[0])!r}. Is this a legacy ST count table?")
    spots = _lower_case_columns(read_text_table(spots_path, "a spot selection table"),
                                ("x", "y", "pixel_x", "pixel_y", "selected"))
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need.issubset(spots.columns):
        raise InputError(f"{spots_path}: needs columns x, y, pixel_x, pixel_y; found {list(spots.columns)}.")
    xy_cols = spots[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(xy_cols.to_numpy(float)).all():
        row = int(np.argmax(~np.isfinite(xy_cols.to_numpy(float)).all(axis=1)))
        raise InputError(f"{spots_path}: the array coordinates x, y must be numbers on every row "
                         f"(row {row + 2} of the file has {spots.loc[spots.index[row], ['x', 'y']].tolist()}).")
    pixels = spots[["pixel_x", "pixel_y"]].apply(pd.to_numeric, errors="coerce")
    words = (pixels.isna() & spots[["pixel_x", "pixel_y"]].notna()).any(axis=1).to_numpy()
    if words.any():      # empty cells go on to the check of finite coordinates, which names the spot
        row = int(np.argmax(words))
        raise InputError(f"{spots_path}: pixel_x, pixel_y must be numbers (full-resolution pixels); row {row + 2} "
                         f"of the file has {', '.join(map(str, spots.loc[spots.index[row], ['pixel_x', 'pixel_y']]))}.")
    spots = spots.assign(pixel_x=pixels["pixel_x"], pixel_y=pixels["pixel_y"])
    if "selected" in spots.columns:
        spots = spots.assign(selected=_selected_flags(spots["selected"], spots_path))
    spots = spots.assign(spot_id=[f"{int(round(x))}x{int(round(y))}" for x, y in zip(spots["x"], spots["y"])])
    repeated = spots[spots["spot_id"].duplicated(keep=False)]
    if len(repeated):
        moved = repeated.groupby("spot_id")[["pixel_x", "pixel_y"]].agg(np.ptp).max(axis=1)
        if (moved > 1.0).any():
            raise InputError(f"{spots_path}: spot {moved.index[np.argmax(moved.to_numpy() > 1.0)]!r} (array x, y) is listed "
                             "more than once with different pixel positions; each spot must have one row.")
    spots = spots.drop_duplicates("spot_id").set_index("spot_id")
    norm_ids = pd.Index([_st_key(s) for s in ids])
    keep_rows = _first_of_exact_repeats(table, norm_ids, counts_path, "spot", "counts")
    table, ids, norm_ids = table[keep_rows], ids[keep_rows], norm_ids[keep_rows]
    known = norm_ids.isin(spots.index)
    if known.sum() == 0:
        raise InputError(f"{counts_path}: none of its {len(ids)} spot ids (e.g. {_clip(ids[0])!r}) is in "
                         f"{spots_path} (e.g. {spots.index[0]!r}). Are they the same section?")
    if known.mean() < ST_MATCH:
        raise InputError(f"{counts_path}: {(~known).sum()} of its {len(ids)} spots (e.g. "
                         f"{_clip(ids[np.flatnonzero(~known)[0]])!r}) are not in {spots_path}, so the two tables look "
                         "like different sections (array coordinates repeat across sections). Give the selection "
                         "table of the same section.")
    if "selected" in spots.columns:
        spots = spots[spots["selected"].astype(int) == 1]
    counted = spots.index.isin(norm_ids)
    if len(spots) and counted.mean() < ST_MATCH:      # none selected: refused below
        raise InputError(f"{spots_path}: {(~counted).sum()} of its {len(spots)} spots under tissue (e.g. "
                         f"{spots.index[np.flatnonzero(~counted)[0]]!r}) have no row in {counts_path}, so the two "
                         "tables look like different sections (array coordinates repeat across sections). Give the "
                         "count table of the same section; if it was filtered on purpose, mark the spots it "
                         "dropped selected=0 in the selection table.")
    gaps = [f"{n} {what}" for n, what in (((~known).sum(), "count-table spot(s) not in the selection table"),
                                           ((~counted).sum(), "selected spot(s) without counts")) if n]
    if gaps:
        log.info("%s + %s: %s, left out", counts_path.name, spots_path.name, " and ".join(gaps))
    keep = norm_ids.isin(spots.index)
    if keep.sum() == 0:
        raise InputError(f"{spots_path}: no spot of {counts_path} is marked selected (under tissue).")
    table = table.loc[keep]
    norm_ids = norm_ids[keep]
    spots = spots.loc[norm_ids]
    empty = table.isna().sum(axis=1).to_numpy()
    if empty.any():      # named here: the check of finite counts below cannot say which spot or why
        row = int(np.argmax(empty > 0))
        raise InputError(f"{counts_path}: the row of spot {_clip(str(table.index[row]))!r} has {empty[row]} empty "
                         f"cell(s) of its {table.shape[1]} genes (the last row of a file cut short, e.g. by an "
                         "interrupted copy, ends so: copy it again; a table written with empty cells for 0 needs "
                         "them filled with 0).")
    values = table.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"{counts_path}: non-numeric counts.")
    obs = pd.DataFrame(index=pd.Index(norm_ids.astype(str)))
    obs[keys.ARRAY_COL] = spots["x"].round().to_numpy(int)
    obs[keys.ARRAY_ROW] = spots["y"].round().to_numpy(int)
    adata = ad.AnnData(X=sp.csr_matrix(values.astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=unique_gene_names(table.columns, counts_path)))
    adata.obsm[keys.SPATIAL] = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    _check_coordinates(adata, spots_path, "pixel_x/pixel_y")
    library_id = library_id or counts_path.name.split(".")[0]
    adata.uns[keys.SPATIAL_UNS] = {library_id: {"images": {}, "scalefactors": {},
                                                "metadata": {"source": str(counts_path)}}}
    _finish_counts(adata, counts_path)
    return adata


# what a 0/1 flag column (ST's ``selected``, Visium's ``in_tissue``) may hold, in any case and padded
FLAG_VALUES = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}


def zero_one_flags(values) -> tuple[np.ndarray | None, int | None]:
    """A flag column as 0/1 integers (1/0 as integers, floats or text, true/false in any case, booleans)
    and None; or None and the position of the first value that is none of those (a word such as
    ``yes``, 2, an empty cell), which callers refuse naming it: a spot must not be kept or dropped by
    a guess."""
    text = pd.Series(np.asarray(values, dtype=object)).astype(str).str.strip().str.lower()
    flags = text.map(FLAG_VALUES)
    if flags.isna().any():
        return None, int(np.argmax(flags.isna().to_numpy()))
    return flags.to_numpy(int), None


def _selected_flags(values: pd.Series, path) -> np.ndarray:
    """A selection table's ``selected`` column as 0/1 integers (:func:`zero_one_flags`); anything else is
    refused naming the row."""
    flags, bad = zero_one_flags(values)
    if bad is not None:
        raise InputError(f"{path}: the selected column must be 1 (under tissue) or 0 on every row; row {bad + 2} of "
                         f"the file has {str(values.iloc[bad])!r}.")
    return flags


def _lower_case_columns(table: pd.DataFrame, names) -> pd.DataFrame:
    """``table`` with a column spelled in another case or padded (``X``, ``Pixel_X ``) renamed to the
    name of ``names`` it stands for, when exactly one column does and the name itself is absent."""
    rename = {}
    for name in names:
        if name not in table.columns:
            hits = [c for c in table.columns if str(c).strip().lower() == name]
            if len(hits) == 1:
                rename[hits[0]] = name
    return table.rename(columns=rename) if rename else table


def _fraction_st_ids(ids) -> float:
    return float(np.mean([bool(ST_SPOT_ID.match(str(s))) for s in ids])) if len(ids) else 0.0


def _st_key(spot_id: str) -> str:
    m = ST_SPOT_ID.match(spot_id)
    return f"{int(round(float(m.group(1))))}x{int(round(float(m.group(2))))}" if m else spot_id


# ------------------------------------------------------------------------------------------
# images and labels
# ------------------------------------------------------------------------------------------
TIFF_SUFFIXES = (".tif", ".tiff", ".btf")


def refuse_gzipped_image(path: Path) -> None:
    """An image file that is gzip-compressed (GEO serves images as ``.png.gz`` / ``.tif.gz``) is refused with
    the fix: an image is read in parts or patch by patch, which a gzip stream does not allow. A folder (an
    OME-Zarr image) is no gzip stream."""
    if Path(path).is_dir():
        return
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return
    plain = path.with_suffix("") if path.suffix.lower() == ".gz" else path.with_name(path.name + ".unzipped")
    raise InputError(f"{path}: the image is gzip-compressed (as GEO serves images); unzip it once, e.g. "
                     f"gunzip -c {path} > {plain}, and give {plain.name} instead.")


def read_image(path) -> np.ndarray:
    """Read an RGB image (PNG/JPG/TIFF) as uint8 (H, W, 3). 16-bit images are rescaled.

    A TIFF (a full-resolution H&E is usually one, often GBs) is read by :func:`_read_tiff` without
    decoder copies: an uncompressed one is memory-mapped (read-only; pixels are read from disk as
    patches touch them), a compressed one is decoded tile by tile into one array (peak = the image).
    A JPEG is decoded by :func:`_read_jpeg` into one array (peak = the image; OpenCV held ~2x).
    OpenCV's TIFF reader held ~3.3x the image at its peak; its PNG reader holds ~2x while
    decoding, which is why README suggests a tiled TIFF for very large images."""
    import cv2

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found.")
    refuse_gzipped_image(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        img = _read_tiff(path)
        if img is not None:
            return as_rgb_uint8(img, path)
    cv2.setNumThreads(1)
    _check_decodable_whole(path)
    warn_if_orientation_tag(path)
    if path.suffix.lower() in JPEG_SUFFIXES:
        data = path.read_bytes()
        check_jpeg_complete(data, path)
        img = _read_jpeg(data)
        del data
        if img is not None:
            return as_rgb_uint8(img, path)
    try:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error:        # OpenCV 5 raises where 4.x returned None (a damaged file, say)
        img = None
    if img is None:
        try:
            import tifffile
            img = tifffile.imread(str(path))
        except Exception:
            img = None
        if img is None or np.asarray(img).size == 0:
            raise InputError(f"{path}: cannot be read as an image (PNG, JPG or TIFF expected; a damaged or "
                             "incompletely copied file reads so too).") from None
        if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
            img = np.moveaxis(img, 0, -1)
    else:
        if img.ndim == 3 and img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)   # in place: a full-res H&E is GBs
        elif img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)      # the alpha channel goes on: composited onto white
    return as_rgb_uint8(img, path)


EXIF_ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
                     5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
                     7: "mirrored and rotated 90 degrees", 8: "rotated 90 degrees counter-clockwise"}


def warn_if_orientation_tag(path: Path) -> int:
    """Warn when a JPEG's EXIF orientation tag tells viewers to show it turned or mirrored (a photo, or
    an export from some viewers): the pipeline reads pixels as stored in the file and takes spot positions
    in that frame, so positions measured on the picture as a viewer shows it would not match. Returns the tag (1 = as stored; 0 = no tag, not a JPEG, or unreadable). Only the
    file's first segments are read (the EXIF block comes before the image data)."""
    import struct

    from PIL import Image
    if path.suffix.lower() not in JPEG_SUFFIXES:
        return 0
    with open(path, "rb") as f:
        head = f.read(1 << 17)
    tag, at = 0, 2
    if head[:2] != b"\xff\xd8":
        return 0
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker, length = head[at + 1], struct.unpack(">H", head[at + 2:at + 4])[0]
        if marker == 0xDA:                               # start of the image data: no EXIF before it
            break
        segment = head[at + 4:at + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            try:
                exif = Image.Exif()
                exif.load(segment)
                tag = int(exif.get(0x0112, 0) or 0)
            except Exception:                            # a damaged EXIF block: the pixels are still read
                tag = 0
            break
        at += 2 + length
    if tag in EXIF_ORIENTATIONS:
        log.warning("%s: its EXIF orientation tag (%d) tells viewers to show it %s; it is read as stored in the "
                    "file, and spot positions are taken in that frame. If they were measured on the picture as "
                    "a viewer shows it, save the image upright without the tag.", path, tag,
                    EXIF_ORIENTATIONS[tag])
    return tag


def refuse_if_flat(img, source) -> None:
    """Refuse an image (uint8 RGB (H, W, 3), an array or a memory map) of one flat colour: every one of ~10^6
    evenly spaced pixels within 2 levels of the others in each channel. It holds no tissue (a blank export,
    a placeholder, the wrong file), so every spot would get the same features and the image graph would join
    spots at random; before this check such an image ran through with only the greyscale warning."""
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 1e6)))
    sample = np.asarray(img[::step, ::step], np.int16).reshape(-1, img.shape[2] if img.ndim == 3 else 1)
    if sample.size and int(np.ptp(sample, axis=0).max()) <= 2:
        colour = ", ".join(str(int(v)) for v in np.median(sample, axis=0))
        raise InputError(f"{source}: the image is one flat colour (RGB {colour} everywhere): it shows no tissue, as "
                         "a blank export or the wrong file would. Give the slide's H&E (stages 1-3 also run without an "
                         "image: --set image.use=none).")


def warn_if_grey(img, source) -> None:
    """Warn when an image (uint8 RGB (H, W, 3), an array or a memory map) has no colour: a greyscale
    export, or a fluorescence channel given for the H&E. Every stage still runs, but the colour and
    stain features (haematoxylin/eosin, the nucleus segmentation's stain channel) carry nothing.
    Judged on ~10^6 evenly spaced pixels: every one with its three channels within 2 grey levels."""
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 1e6)))
    sample = np.asarray(img[::step, ::step], np.int16)
    if sample.size and int(np.ptp(sample, axis=2).max()) <= 2:
        log.warning("%s: the image has no colour (greyscale); an H&E is expected. Colour and stain features "
                    "(and stage 5's nucleus segmentation) carry no information from it.", source)


JPEG_SUFFIXES = (".jpg", ".jpeg")


def check_jpeg_complete(data: bytes, path) -> None:
    """Refuse a JPEG whose data stop before its end-of-image marker: libjpeg and OpenCV decode a
    truncated file (an interrupted copy or download) without an error, the missing part grey (128), so
    every spot there got features of flat grey. The marker (FF D9) must follow the last start of scan
    (FF DA; neither can occur inside the compressed data, where an FF byte is followed by 00); an
    embedded EXIF thumbnail's own marker comes before the image's scans."""
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise InputError(f"{path}: the JPEG ends before its image data do (no end-of-image marker after the last "
                         "scan): the file is truncated, e.g. an interrupted copy or download; copy it again.")


def _read_jpeg(data: bytes):
    """A JPEG (its file's bytes) decoded by imagecodecs' libjpeg-turbo straight into its output array: the peak is the
    image plus the file, where OpenCV's decoder held ~2x the image (a 20,000 px H&E: 1.23 vs 2.39 GB,
    2.4 vs 3.1 s; the pixels of every real JPEG here, her2st C2-C6 and MOB1-3, and of that 20,000 px
    test image are identical to OpenCV's). Grey or RGB only; None for anything else (CMYK, 12-bit, a
    damaged file), which then goes to OpenCV as before."""
    try:
        import imagecodecs
        img = imagecodecs.jpeg8_decode(data)
    except Exception:       # imagecodecs raises its own error types
        return None
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        return None
    return img


def opencv_max_pixels() -> int:
    """The most pixels OpenCV decodes in one image (its default, 2**30, or ``OPENCV_IO_MAX_IMAGE_PIXELS``)."""
    import os

    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
    except ValueError:
        return 1 << 30


def _check_decodable_whole(path: Path) -> None:
    """Refuse, naming the fix, a JPEG/PNG with more pixels than OpenCV decodes (2**30 by default, e.g.
    a 33,000 px square scan). Such a file can only be decoded whole (neither format can be read in
    parts), so the way on is a tiled TIFF, which :mod:`data.wsi` reads block by block. The size comes
    from the file's header; a file whose header cannot be read is left to the decoder."""
    size = _header_size(path)
    if size is None or size[0] * size[1] <= opencv_max_pixels():    # no header: the decoder's own check follows
        return
    h, w = size
    raise InputError(
        f"{path}: {w:,} x {h:,} px ({h * w * 3 / 1e9:.1f} GB as RGB) is too large to decode as one "
        f"{path.suffix.lstrip('.').upper() or 'image'} (at most {opencv_max_pixels():,} pixels; a JPEG or PNG cannot "
        f"be read in parts). Rewrite it once as a tiled TIFF, which is read block by block and never whole: "
        f"`python -m data.wsi {path} {path.with_suffix('.tif')}` (needs ~{h * w * 4 / 1e9:.1f} GB of memory, once; "
        "or libvips: `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`), and give that file instead.")


def tiff_level0(tf):
    """(level 0 of the first image series, its first page) of an open ``tifffile.TiffFile``."""
    series = tf.series[0]
    level = series.levels[0] if getattr(series, "levels", None) else series
    return level, (level.keyframe if hasattr(level, "keyframe") else tf.pages[0])


def _read_tiff(path: Path):
    """Level 0 of a TIFF's first image series as (H, W, channels) or (H, W) -- a read-only memory map
    when the pixels are stored uncompressed and contiguous, else decoded by tifffile (with imagecodecs
    for LZW/JPEG/JPEG 2000 tiles) straight into one array. None when tifffile cannot read it
    (the caller falls back to OpenCV): a palette image, an unknown codec, a damaged file."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            level, page = tiff_level0(tf)
            if page.photometric not in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.MINISBLACK,
                                        tifffile.PHOTOMETRIC.YCBCR) or len(level.shape) not in (2, 3):
                return None
            axes = level.axes
            if len(tf.series) == 1 and len(level.pages) == 1 and page.is_memmappable and axes in ("YXS", "YX"):
                return tifffile.memmap(str(path), mode="r", series=0, level=0)
            img = level.asarray()
    except Exception as exc:  # noqa: BLE001 - let OpenCV try (it names the file if it fails too)
        log.debug("tifffile cannot read %s (%s); trying OpenCV", path, exc)
        return None
    if img.ndim == 3 and axes == "SYX":      # planar RGB (3, H, W)
        img = np.moveaxis(img, 0, -1)
    return img


BIT_DEPTHS = (8, 10, 12, 14, 16)


def uint16_bit_depth(top: int, source) -> int:
    """The bit depth of a 16-bit image whose largest value is ``top``: the smallest of 8, 10, 12, 14 and
    16 bits that holds it (a 12-bit camera's image stored in 16 bits is scaled by 255 / 4095, not
    255 / 65535, which left a near-black image; an H&E's bright background puts its maximum near the
    depth's top), with a warning naming ``source`` below 16."""
    bits = next(b for b in BIT_DEPTHS if int(top) < (1 << b))
    if bits < 16:
        log.warning("%s: a 16-bit image whose largest value is %d: read as %d-bit (scaled by 255/%d)",
                    source, top, bits, (1 << bits) - 1)
    return bits


def _uint16_to_uint8(img, source, bits: int | None = None) -> np.ndarray:
    """A uint16 image as uint8, scaled by its bit depth (``bits``; None: :func:`uint16_bit_depth` of its
    own largest value, which a region of a larger image must not use). ``v * 255 // (2**bits - 1)``: for
    16 bits that is ``v // 257``. Converted in blocks of rows, so a memory-mapped image is never held as
    floats (8 bytes a sample)."""
    if bits is None:
        bits = uint16_bit_depth(int(img.max()) if img.size else 0, source)
    full = (1 << bits) - 1
    out = np.empty(img.shape, np.uint8)
    rows = max(1, (1 << 22) // max(1, int(np.prod(img.shape[1:]))))
    for y in range(0, img.shape[0], rows):
        out[y:y + rows] = np.minimum(img[y:y + rows].astype(np.uint32) * 255 // full, 255)
    return out


def as_rgb_uint8(img, source, bits: int | None = None) -> np.ndarray:
    """An image array as uint8 RGB (H, W, 3): 16-bit values are rescaled by their bit depth
    (:func:`_uint16_to_uint8`; ``bits``, that of the whole image a region is cut from; so are 16-bit values
    held in a wider integer type), floats in [0, 1] (what scanpy's ``read_visium`` stores in
    ``uns['spatial']``) are multiplied by 255, other floats are taken as 0-255 and values beyond that
    (a normalised image) are refused; grey is repeated to three channels, and an alpha channel is composited onto white
    (:func:`alpha_on_white`). ``source`` names the image in errors (a file, or the ``uns`` entry it came
    from)."""
    img = np.asarray(img)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)) or min(img.shape[:2]) < 2:
        raise InputError(f"{source}: an image must be (height, width) or (height, width, 3 or 4), "
                         f"not an array of shape {img.shape}.")
    if img.dtype == np.uint16:
        img = _uint16_to_uint8(img, source, bits)
    elif img.dtype == bool or not np.issubdtype(img.dtype, np.number):
        raise InputError(f"{source}: image pixels must be numbers, not {img.dtype}.")
    elif np.issubdtype(img.dtype, np.integer) and img.dtype != np.uint8 and img.size and img.min() >= 0 \
            and 255 < img.max() <= 65535:
        img = _uint16_to_uint8(img.astype(np.uint16), source, bits)     # 16-bit values in a wider integer type
    elif img.dtype != np.uint8:
        img = np.asarray(img, np.float64)
        if not np.isfinite(img).all():
            raise InputError(f"{source}: the image holds NaN or infinite pixels.")
        lo, hi = (float(img.min()), float(img.max())) if img.size else (0.0, 0.0)
        if lo < -0.5 or hi > 255.5:      # clipping would silently blacken or whiten it
            raise InputError(f"{source}: pixel values run from {lo:.4g} to {hi:.4g}; an H&E image holds 0-255 (or "
                             "0-1 as floats, or 16-bit integers). A normalised or standardised image cannot be read "
                             "as one: give the image as saved by the scanner or Space Ranger.")
        img = np.clip(img * (255 if hi <= 1 else 1), 0, 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        return alpha_on_white(img)
    return np.ascontiguousarray(img[..., :3])


def alpha_on_white(rgba: np.ndarray, premultiplied: bool = False, rows: int = 2048) -> np.ndarray:
    """uint8 RGBA composited onto white, as RGB: an image exported with a transparent background often holds
    black under it, which dropping the alpha channel would turn into dark 'tissue' for the tissue mask and
    the features. Straight alpha (PNG, TIFF) by default; ``premultiplied`` for OpenSlide's regions, whose
    colour is already scaled by alpha. Done a band of ``rows`` rows at a time, only on the pixels that are
    not opaque, so a large image gets no full-size temporary."""
    rgb = np.ascontiguousarray(rgba[..., :3])
    for top in range(0, rgba.shape[0], rows):
        alpha = rgba[top:top + rows, :, 3]
        part = alpha < 255
        if not part.any():
            continue
        a = alpha[part].astype(np.uint32)[:, None]
        band = rgb[top:top + rows]
        colour = band[part].astype(np.uint32)
        blended = np.minimum(colour + (255 - a), 255) if premultiplied else (colour * a + 255 * (255 - a) + 127) // 255
        band[part] = blended.astype(np.uint8)
    return rgb


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file without decoding the pixels where the format allows."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found (data.image).")
    refuse_gzipped_image(path)
    size = _header_size(path)
    if size is not None:
        return size
    from data.wsi import open_whole_slide   # a whole-slide format (.svs, .ndpi, ...), a TIFF PIL refuses, an OME-Zarr folder

    with open_whole_slide(path) as slide:
        w, h = slide.size
    return h, w


def _header_size(path) -> tuple[int, int] | None:
    """(height, width) from the image's header (Pillow reads no pixels), or None when Pillow cannot
    open the file. Pillow's own size guard is lifted: large images are the point here, and the callers
    check sizes themselves."""
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():     # a damaged file: the callers' errors name it, PIL's warning would not
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.height, im.width
    except Exception:  # noqa: BLE001 - not a format Pillow knows, or damaged
        return None


def attach_fullres_image(adata, image_path, affine=None) -> None:
    """Record a full-resolution image for the slide (loaded later by stage 1, never stored here).

    Writes ``uns['spatial'][lib]['metadata']['fullres_path']`` and ``['fullres_shape']``. The image is in
    ``obsm['spatial']``'s pixels, unless ``affine`` (``data.image_affine``: 2x3, the image's pixel (x, y) to
    those pixels; a registered H&E) places it there: then it is kept as ``['fullres_placement']`` and the
    stages read the image resampled into the spots' frame (:class:`data.wsi.PlacedImage`). A placement the
    slide's own image had (a SpatialData store's) is replaced.
    """
    lib = keys.library_id(adata)
    if lib is None:
        adata.uns[keys.SPATIAL_UNS] = {"slide": {"images": {}, "scalefactors": {}, "metadata": {}}}
        lib = "slide"
    meta = adata.uns[keys.SPATIAL_UNS][lib].setdefault("metadata", {})
    meta.pop(keys.FULLRES_PLACEMENT, None)
    meta.update(fullres_metadata(image_path, None if affine is None else image_affine(affine)))


def fullres_metadata(image_path, placement=None) -> dict:
    """The ``uns['spatial'][lib]['metadata']`` entries naming a full-resolution image (read by the stages, never
    here): ``fullres_path``; ``fullres_shape``, its (height, width) in ``obsm['spatial']``'s pixels (with a
    placement, the frame it is resampled into); and ``fullres_placement`` when ``placement`` (a 2x3 affine
    from the image's px to those pixels) is given."""
    out = {"fullres_path": str(Path(image_path))}
    if placement is None:
        out["fullres_shape"] = list(image_size(image_path))
        return out
    from data.wsi import PlacedImage, open_whole_slide
    with PlacedImage(open_whole_slide(image_path), placement) as placed:
        out["fullres_shape"] = [placed.size[1], placed.size[0]]
    out[keys.FULLRES_PLACEMENT] = np.asarray(placement, float).reshape(-1, 3)[:2].tolist()
    return out


def image_affine(value) -> np.ndarray:
    """``data.image_affine`` as a 2x3 array: [[a, b, tx], [c, d, ty]] (or 3x3 ending in [0, 0, 1]) taking the
    image's pixel (x, y) to (a x + b y + tx, c x + d y + ty) in the spots' full-resolution pixels; refused
    when it is not such a matrix or does not map the plane onto itself (not invertible)."""
    try:
        m = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        m = None
    ok = m is not None and m.shape in ((2, 3), (3, 3)) and np.isfinite(m).all() \
        and (m.shape == (2, 3) or np.allclose(m[2], [0, 0, 1]))
    if not ok or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise InputError(f"data.image_affine={value!r}: give the 2x3 affine [[a, b, tx], [c, d, ty]] taking data.image's "
                         "pixel (x, y) to the spots' full-resolution pixels (a x + b y + tx, c x + d y + ty), invertible; "
                         "e.g. [[1, 0, 250], [0, 1, 80]] for an image cropped 250 px from the left and 80 from the top.")
    return m[:2]


def read_truth(path, adata, missing_labels=("undetermined",), column: str | None = None) -> pd.Series:
    """Ground-truth labels aligned to ``adata.obs_names`` (NaN = not annotated).

    Formats:

    * two columns, no header: barcode, label (``151673_truth.txt``);
    * a labelled-coordinates table with a header ``x, y`` (array coordinates, possibly fractional)
      and ``label`` (her2st); ``column`` names another label column;
    * any table with a header, the labels in the column named ``column`` (``data.truth_column``, e.g.
      ``layer_guess`` in spatialLIBD's ``metadata.tsv``), the spots in a column named ``barcode``
      (``barcodes``, ``spot``, ``spot_id``), else in R's row names (a header one field shorter than
      the rows, as ``write.table`` writes it), else in the first column. Such a table without
      ``column`` is refused with its likely label columns, since its second column is rarely the label.

    Labels in ``missing_labels`` or empty count as not annotated.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: truth file not found (data.truth).")
    table = _read_label_table(path, header=0)
    lower = {str(c).strip().lower(): c for c in table.columns}
    label_col = _find_column(table, column, path) if column else lower.get("label")
    if "x" in lower and "y" in lower and label_col is not None:
        x = pd.to_numeric(table[lower["x"]], errors="coerce")
        y = pd.to_numeric(table[lower["y"]], errors="coerce")
        if x.isna().any() or y.isna().any():
            raise InputError(f"{path}: its x and y columns must be array coordinates (numbers); "
                             f"row {int(np.flatnonzero(x.isna() | y.isna())[0]) + 2} is not.")
        ids = [f"{int(round(a))}x{int(round(b))}" for a, b in zip(x, y)]
        labels = pd.Series(table[label_col].to_numpy(object), index=ids)
        _check_one_label_per_spot(labels, path)
        labels = labels[~labels.index.duplicated()]
        obs_ids = pd.Index([_st_key(s) for s in adata.obs_names.astype(str)])
        aligned = labels.reindex(obs_ids)
    else:
        if column:
            labels = pd.Series(table[label_col].to_numpy(object), index=_label_table_spots(table))
        elif table.shape[1] == 1 and not isinstance(table.index, pd.RangeIndex):   # R: row names + one column
            labels = pd.Series(table.iloc[:, 0].to_numpy(object), index=table.index.astype(str).to_numpy())
        else:
            n_columns = table.shape[1] + (not isinstance(table.index, pd.RangeIndex))
            if n_columns > 2:
                raise InputError(
                    f"{path}: a table of {n_columns} columns; say which one holds the labels with "
                    f"data.truth_column=NAME ({_label_column_candidates(table)}).")
            df = _read_label_table(path, header=None)
            if df.shape[1] < 2:
                raise InputError(f"{path}: expected two columns (barcode, label).")
            labels = pd.Series(df.iloc[:, 1].to_numpy(), index=df.iloc[:, 0].astype(str).to_numpy())
        labels.index = pd.Index(labels.index.astype(str)).str.strip()      # " AAAC-1" from a hand-edited file
        _check_one_label_per_spot(labels, path)
        labels = labels[~labels.index.duplicated()]
        aligned = labels.reindex(adata.obs_names.astype(str))
        if aligned.notna().sum() == 0:
            labels = _match_barcode_suffix(path, labels, adata.obs_names.astype(str))
            aligned = labels.reindex(adata.obs_names.astype(str))
    found = aligned.notna().sum()
    if found == 0:
        raise InputError(f"{path}: none of its spots matches the slide's spots "
                         f"(e.g. {labels.index[0]!r} vs {adata.obs_names[0]!r}). Is it the same slide?")
    annotated = labels.index[~_not_annotated(labels, missing_labels)]
    _check_truth_belongs_to_slide(path, annotated, set(aligned.dropna().index))
    truth = _as_truth(aligned, adata.obs_names, missing_labels)
    if _last_line_unended(path):
        log.warning("%s: its last line has no line end, as a file cut short (an interrupted copy) ends: if it was, "
                    "its last label (%r, spot %r) may be cut and the spots after it are missing (%d of the slide's "
                    "%d spots are annotated). A file saved without a final line end reads the same; then nothing "
                    "is wrong.", path, _clip(str(labels.iloc[-1])), _clip(str(labels.index[-1])),
                    int(truth.notna().sum()), adata.n_obs)
    return truth


def _last_line_unended(path: Path) -> bool:
    """Whether a plain text file's last byte is not a line end (gzip files: False; one cut short fails to
    decompress instead)."""
    if path.suffix == ".gz" or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)      # the last byte
        return f.read(1) not in (b"\n", b"\r")


def truth_from_obs(adata, column: str, source, missing_labels=("undetermined",)) -> pd.Series:
    """Labels already in ``adata.obs[column]`` (an ``.h5ad`` input with ``data.truth_column`` and no
    ``data.truth``), as :func:`read_truth` returns them."""
    if column not in adata.obs:
        near = [c for c in adata.obs.columns if str(c).lower() == str(column).lower()]
        hint = f"; did you mean {near[0]!r}?" if near else \
            f"; its columns: {', '.join(map(str, list(adata.obs.columns)[:12]))}"
        raise InputError(f"{source}: obs has no column {column!r} (data.truth_column){hint}. For a Space Ranger "
                         "folder or an ST section, give the labels as a file in data.truth.")
    values = adata.obs[column]
    aligned = pd.Series(values.astype(object).where(values.notna(), np.nan).to_numpy(), index=adata.obs_names)
    if _not_annotated(aligned, missing_labels).all():
        raise InputError(f"{source}: obs[{column!r}] (data.truth_column) annotates no spot.")
    return _as_truth(aligned, adata.obs_names, missing_labels)


def _as_truth(aligned: pd.Series, obs_names, missing_labels) -> pd.Series:
    """Labels as strings in a categorical aligned to ``obs_names``, NaN where not annotated."""
    aligned = _stripped(aligned)
    unannotated = _not_annotated(aligned, missing_labels)
    aligned = aligned.map(str)
    aligned[unannotated] = np.nan
    return pd.Series(pd.Categorical(aligned.to_numpy()), index=obs_names)


def _text_encoding(path: Path) -> str:
    """A text table's encoding from its byte-order mark: ``utf-16`` (Excel's "Unicode Text" export),
    ``utf-8-sig`` (UTF-8 with a mark), else ``utf-8``. gzip-compressed files are looked into."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(3)
    except (OSError, EOFError):
        return "utf-8"                      # pandas names the problem when it reads the file
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    return "utf-8-sig" if head == b"\xef\xbb\xbf" else "utf-8"


def _guess_separator(path: Path, encoding: str = "utf-8") -> str:
    """The delimiter of a text table (gzip-compressed or not), from its first line: tab, else comma,
    else runs of spaces. The file's name is not trusted: a ``.csv.gz`` or ``.txt`` may hold either."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding, errors="replace") as f:
        first = f.readline()
    return "\t" if "\t" in first else "," if "," in first else r"\s+"


def _last_line(exc: Exception) -> str:
    """The useful last line of a parser's message (pandas' can span several)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _clip(text: str, n: int = 40) -> str:
    """``text`` cut to ``n`` characters for an error message (a misread row can be a whole line)."""
    return text if len(text) <= n else text[:n] + "..."


def read_text_table(path: Path, what: str, **read_csv_options) -> pd.DataFrame:
    """A delimited text table (gzip or not; delimiter by :func:`_guess_separator`) read by pandas, or one
    line naming the file and ``what`` it should be (e.g. "a label table") when pandas cannot parse it, or
    when it holds no rows (empty, or a header line alone: how a cut-short copy often ends)."""
    encoding = _text_encoding(path)
    try:
        table = pd.read_csv(path, sep=_guess_separator(path, encoding), encoding=encoding, **read_csv_options)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot be read as {what}: it is not UTF-8 text ({_last_line(exc)}); save it as "
                         "UTF-8 (or plain) text.") from None
    except pd.errors.EmptyDataError:
        table = None
    except (pd.errors.ParserError, OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot be read as {what} ({_last_line(exc)}).") from None
    if table is None or len(table) == 0:      # every caller needs rows (a header alone used to fail on row 0)
        held = "it is empty" if table is None else "it holds a header line and no rows under it"
        raise InputError(f"{path}: cannot be read as {what}: {held} (a file cut short, e.g. by an interrupted "
                         "copy, ends so; copy it again).")
    return table


def _read_label_table(path: Path, header):
    """A label table as strings (empty cells stay ""), its delimiter guessed by ``_guess_separator``."""
    table = read_text_table(path, "a label table", header=header, dtype=str, keep_default_na=False,
                            na_values=["NA", "NaN", "nan", "N/A", "<NA>"])
    if isinstance(table.index, pd.MultiIndex):      # pandas' reading of rows longer than the header by 2+
        raise InputError(f"{path}: cannot be read as a label table (its header has {table.shape[1]} fields, "
                         f"its rows {table.shape[1] + table.index.nlevels}).")
    return table


def _find_column(table, column: str, path: Path):
    """The column of ``table`` named ``column`` (exactly, else ignoring case), or a clear error."""
    if column in table.columns:
        return column
    near = [c for c in table.columns if str(c).strip().lower() == str(column).strip().lower()]
    if near:
        return near[0]
    raise InputError(f"{path}: no column {column!r} for data.truth_column ({_label_column_candidates(table)}).")


def _label_table_spots(table) -> pd.Index:
    """Spot ids of a label table with a header: a barcode/spot column, else R row names, else column 1."""
    for c in table.columns:
        if str(c).strip().lower() in ("barcode", "barcodes", "spot", "spot_id", "spots"):
            return pd.Index(table[c].astype(str))
    if not isinstance(table.index, pd.RangeIndex):
        return pd.Index(table.index.astype(str))
    return pd.Index(table.iloc[:, 0].astype(str))


def _label_column_candidates(table) -> str:
    """'columns with a few distinct values: layer_guess (7), ...' -- the likely label columns."""
    hint = re.compile(r"label|layer|annot|truth|region|domain|cluster|type|class|tissue", re.I)
    few = [c for c in table.columns if 2 <= table[c].nunique() <= 50]
    few = [f"{c} ({table[c].nunique()})" for c in sorted(few, key=lambda c: not hint.search(str(c)))]
    if few:
        return "columns with a few distinct values: " + ", ".join(few[:8]) + (", ..." if len(few) > 8 else "")
    return "its columns: " + ", ".join(map(str, list(table.columns)[:12]))


def _match_barcode_suffix(path: Path, labels: pd.Series, obs_names: pd.Index) -> pd.Series:
    """``labels`` re-keyed by the slide's barcodes when the two differ only in Space Ranger's ``-N``
    suffix (e.g. a truth file written without it): each stripped barcode must name one spot."""
    strip = lambda names: pd.Index([str(b).rsplit("-", 1)[0] if "-" in str(b) else str(b) for b in names])
    obs_stripped = strip(obs_names)
    if obs_stripped.has_duplicates:
        return labels
    lab_stripped = strip(labels.index)
    if lab_stripped.has_duplicates or lab_stripped.isin(obs_stripped).mean() < 0.9:
        return labels
    log.info("%s: its barcodes match the slide's once the '-N' suffix is ignored (e.g. %r vs %r)",
             path, labels.index[0], obs_names[0])
    by_stripped = pd.Series(obs_names.to_numpy(), index=obs_stripped)
    renamed = by_stripped.reindex(lab_stripped).to_numpy()       # unmatched ones keep their own id, so
    keys_ = np.where(pd.isna(renamed), labels.index.to_numpy(), renamed)   # the stray-spot check still sees them
    return pd.Series(labels.to_numpy(), index=keys_)


def _check_one_label_per_spot(labels: pd.Series, path) -> None:
    """Refuse a label table that gives one spot two different labels (which one scores would be a
    guess); a line repeated with the same label is fine."""
    if not labels.index.has_duplicates:
        return
    pairs = pd.DataFrame({"spot": labels.index, "label": _stripped(labels).map(str).to_numpy()}).drop_duplicates()
    twice = pairs["spot"][pairs["spot"].duplicated()]
    if len(twice):
        spot = twice.iloc[0]
        raise InputError(f"{path}: spot {spot!r} has more than one label ({', '.join(pairs.loc[pairs['spot'] == spot, 'label'])}); "
                         "each spot must have one.")


def _stripped(labels: pd.Series) -> pd.Series:
    """Labels with the spaces around text removed (``"Layer1 "`` from a hand-edited file is ``"Layer1"``)."""
    return labels.astype(object).map(lambda v: v.strip() if isinstance(v, str) else v)


def _not_annotated(labels: pd.Series, missing_labels) -> np.ndarray:
    """True where a label means "not annotated": empty, NaN, or one of ``missing_labels`` (spaces around
    the text ignored)."""
    return (labels.isna() | _stripped(labels).isin([str(m).strip() for m in missing_labels] + [""])).to_numpy()


def _check_truth_belongs_to_slide(path, annotated: pd.Index, on_slide: set) -> None:
    """Refuse a truth file whose annotated spots are largely not spots of this slide.

    Matching ids alone do not prove the file belongs to the slide: Visium barcodes name array positions
    and repeat on every slide, and legacy ST ids are array coordinates, so another slide's file matches
    most spots and would score silently against the wrong labels. A slide's own file annotates only its
    spots (the DLPFC and her2st files of ../shared/data: at most 3 of ~300 annotated spots missing
    from the counts), while an adjacent slide's misses ~4% (151674's file on 151673: 150 of 3,635;
    her2st's other sections' files: 6-55%). Refused when more than 2% (and more than 5 spots) of the
    annotated spots are not on the slide.
    """
    off = [i for i in annotated if i not in on_slide]
    if len(off) > max(5, 0.02 * len(annotated)):
        raise InputError(
            f"{path}: {len(off)} of its {len(annotated)} annotated spots are not spots of this slide "
            f"(e.g. {off[0]!r}), so it probably belongs to another slide (barcodes and array coordinates "
            "repeat across slides). Give this slide's truth file; if the slide was subset on purpose, "
            "remove the other spots from the truth file.")


# ------------------------------------------------------------------------------------------
# shared checks
# ------------------------------------------------------------------------------------------
def _check_coordinates(adata, source, what: str) -> None:
    """Refuse spot centres that are NaN or infinite (they would fail deep inside the graph builders), and
    spots piled on one position: all of them, or more than 1% (a few are said in a warning). Such a file
    got an error about the spot diameter ("the spots are 0 px apart"), or ran with spots the graphs could
    not tell apart."""
    xy = np.asarray(adata.obsm[keys.SPATIAL])
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise InputError(f"{source}: {int(bad.sum())} spot(s) without finite coordinates in {what} (first: "
                         f"{adata.obs_names[np.argmax(bad)]!r}); every spot needs its centre in full-resolution pixels.")
    _, first, inverse = np.unique(xy[:, :2], axis=0, return_index=True, return_inverse=True)
    repeats = len(xy) - len(first)       # spots at the position of an earlier spot
    if not repeats:
        return
    first_at = first[inverse.ravel()]          # each spot's first spot at its position
    i = int(np.flatnonzero(first_at != np.arange(len(xy)))[0])
    example = f"e.g. {adata.obs_names[first_at[i]]!r} and {adata.obs_names[i]!r} both at ({xy[i, 0]:g}, {xy[i, 1]:g})"
    if len(first) == 1 or repeats > 0.01 * len(xy):
        raise InputError(f"{source}: {repeats} of {len(xy)} spots lie at the position of another spot in {what} "
                         f"({example}); every spot needs its own centre in full-resolution pixels. Were the coordinates "
                         "taken from another column, rounded to a coarse unit, or are several slides in one file?")
    log.warning("%s: %d spot(s) lie at the position of another spot in %s (%s)", source, repeats, what, example)


def _integer_valued(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X)
    return bool(np.all(np.isfinite(data)) and np.allclose(data, np.round(data)))


def _library_sizes(sums: np.ndarray, stored, source) -> np.ndarray:
    """The library size of each spot: ``stored`` (see :func:`_finish_counts`) when it is usable and
    larger than ``sums`` (the UMIs of the genes read) somewhere, else ``sums``."""
    if stored is None:
        return sums
    stored = pd.to_numeric(pd.Series(np.asarray(stored)), errors="coerce").to_numpy(np.float64)
    usable = np.isfinite(stored).all() and np.allclose(stored, np.round(stored)) and (stored >= sums - 0.5).all()
    if not usable:
        log.info("%s: obs['total_counts'] is not a whole number at least the UMIs of its genes for every spot; "
                 "library sizes are counted from X", source)
        return sums
    if not (stored > sums + 0.5).any():
        return sums
    share = float(sums.sum() / max(stored.sum(), 1.0))
    log.info("%s: its genes hold %.0f%% of the UMIs in obs['total_counts'] (a gene subset): those library sizes "
             "are used for log-normalisation, so CP10k values are on the full library's scale (to normalise over "
             "the file's genes alone, delete obs['total_counts'])", source, 100 * share)
    return stored


def _finish_counts(adata, source, hint: str = "", library_sizes=None) -> None:
    """Check raw counts and record ``obs['total_counts']``; ``hint`` ends the message of non-integer counts.

    ``obs['total_counts']`` is each spot's UMIs over the genes read, unless ``library_sizes`` (an .h5ad's
    own ``obs['total_counts']``, as scanpy's ``calculate_qc_metrics`` writes it) are whole numbers at
    least that large for every spot: then the file's genes are a subset (highly variable genes saved
    alone, say) and its library sizes, counted before, are kept, so that log-normalised values
    (CP10k) are on the scale of the full library, as for a Space Ranger folder of the same slide."""
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
        raise InputError(f"{source}: counts contain negative or non-finite values; raw UMI counts are required.")
    if data.size and not np.allclose(data, np.round(data)):
        raise InputError(f"{source}: counts are not integers (e.g. {data[np.flatnonzero(data != np.round(data))[0]]:.3g}); "
                         "the pipeline needs raw UMI counts, not normalised or log-transformed values. "
                         "For an .h5ad, put the raw counts in X, layers['counts'] or adata.raw." + hint)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{source}: no spots or no genes.")
    sums = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    adata.obs[keys.TOTAL_COUNTS] = _library_sizes(sums, library_sizes, source)
    empty = sums == 0
    if empty.all():
        raise InputError(f"{source}: every spot has zero counts.")
    if empty.any():
        log.warning("%s: %d spot(s) have no counts at all (first: %r); they are kept, with zero log-normalised "
                    "expression and a near-zero denoised one. Remove them from the input if they are not tissue.",
                    source, int(empty.sum()), adata.obs_names[np.argmax(empty)])
