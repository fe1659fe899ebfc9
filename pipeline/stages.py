"""Stage bookkeeping: atomic writes, rerun skipping by fingerprint, metrics.json.

A stage's fingerprint hashes the config sections it depends on, the size and modification time of
its input files, the fingerprint of the stage before it, and the pipeline's own source code
(:func:`code_version`: outputs of another version of the code are redone). After a stage's outputs are written
(each atomically: temporary file + ``os.replace``), its fingerprint is written to
``<out>/.stamps/<stage>.json``. A rerun skips the stage when every output exists and the stamp
matches; ``--force`` redoes it. A killed run leaves at most a ``.tmp`` file, never a half-written
output with a valid stamp.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from data.errors import InputError

log = logging.getLogger("stpipe")

STAMP_DIR = ".stamps"
METRICS_FILE = "metrics.json"


# errors of the output folder (not of the program): reported as one line, see :func:`atomic_write`
_OUTPUT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR}   # a full disk: below


def atomic_write(path, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then atomically move the result to ``path``.

    ``write_fn`` may write a file or a whole folder there (a folder replaces an older ``path`` folder,
    which is removed first). A full disk, a read-only or unwritable folder raises
    :class:`data.errors.OutputError` naming ``path`` (and the free space left, for a full disk) instead
    of a traceback from the writer (h5py, numpy, matplotlib, OpenCV); the temporary file or folder is
    removed either way."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fn(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)        # first, so that the free space reported is what is really left
        error = _output_error(path, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        _remove(tmp)
    return path


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


def _output_error(path: Path, exc: OSError):
    """``exc`` as an :class:`OutputError` when the output folder is at fault, else None.
    h5py and numpy report a full disk in their message text only (numpy: "N requested and M
    written"), hence the text checks."""
    from data.errors import OutputError

    text = str(exc)
    full = (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "errno = 28" in text
            or ("requested and" in text and "written" in text))
    if full:
        try:
            n = shutil.disk_usage(path.parent).free
            free = f" ({n / 1e9:.1f} GB free without it)" if n >= 1e9 else f" ({n / 1e6:.0f} MB free without it)"
        except OSError:
            free = ""
        return OutputError(f"{path}: the disk filled up while writing it{free}. Free some space or choose an "
                           "output folder on another disk with --out; a rerun redoes only the stages not yet written.")
    if exc.errno in _OUTPUT_ERRNOS:
        return OutputError(f"{path}: cannot write here ({exc.strerror or text}). Choose a writable output "
                           "folder with --out.")
    return None


def save_json(path, obj) -> Path:
    """Strict JSON: a NaN or infinite number (e.g. an SSIM on a grid too small for it) is written as
    null, which every JSON reader accepts (Python's default ``NaN`` is not JSON)."""
    text = json.dumps(_finite(obj), indent=2, default=_jsonable, allow_nan=False)
    return atomic_write(path, lambda t: Path(t).write_text(text))


def _finite(o):
    """``o`` with every non-finite float (numpy ones included) replaced by None, recursively."""
    import math

    import numpy as np
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def save_npy(path, array) -> Path:
    import numpy as np
    return atomic_write(path, lambda t: np.save(t, array))


H5AD_COMPRESSIONS = ("gzip", "lzf")     # output.compression: h5py's filters (null: none)


def save_h5ad(path, adata, cfg: dict | None = None) -> Path:
    """Write ``adata`` to ``path`` atomically, its arrays compressed as ``output.compression`` of ``cfg`` says
    (gzip: readable everywhere HDF5 is, R included; lzf: faster, h5py only; null: none). An anndata that cannot
    write the installed pandas' text is refused first (:func:`check_h5ad_writer`)."""
    check_h5ad_writer()
    compression = ((cfg or {}).get("output") or {}).get("compression")
    return atomic_write(path, lambda t: adata.write_h5ad(t, compression=compression))


@functools.lru_cache(maxsize=1)
def h5ad_writer_problem() -> str | None:
    """Why the installed anndata cannot write ``.h5ad`` files with the installed pandas, as one line naming the
    fix; None when it can.

    pandas 3 holds text (spot and gene names, categories) as Arrow-backed strings; an anndata without a writer for
    them (0.12.6 and older: the newest that pip pairs with pandas 3, since later 0.12 releases require pandas < 3)
    fails on the first ``.h5ad`` a stage writes, after the stage's work, with a traceback from inside anndata.
    With pandas 3 or newer this is probed once per process, by writing a two-spot AnnData (text names and a
    categorical column) to a temporary file; with older pandas nothing is probed. A probe rather than a version
    rule, so an anndata that writes pandas 3's strings passes."""
    import pandas as pd

    if int(pd.__version__.split(".")[0]) < 3:
        return None
    import tempfile

    import anndata as ad
    import numpy as np

    from data.readers import anndata_version

    probe = ad.AnnData(np.zeros((2, 1), dtype=np.float32),
                       obs=pd.DataFrame({"domain": pd.Categorical(["1", "2"])}, index=["spot_a", "spot_b"]),
                       var=pd.DataFrame(index=["gene_a"]))
    with tempfile.TemporaryDirectory(prefix="stpipe_probe_") as tmp:
        try:
            probe.write_h5ad(Path(tmp) / "probe.h5ad")
        except Exception as exc:  # anndata's IORegistryError, or whatever a later release raises
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return (f"anndata {anndata_version()} cannot write pandas {pd.__version__}'s text to .h5ad, so no stage's "
                    f"output could be saved ({type(exc).__name__}: {first}). Install pandas 2 beside it "
                    "(pip install 'pandas<3'), or an anndata release that writes pandas 3's strings.")
    return None


def check_h5ad_writer() -> None:
    """Raise :class:`InputError` with :func:`h5ad_writer_problem`'s line when the installed anndata and pandas
    cannot write ``.h5ad`` together (every script checks this before any work)."""
    problem = h5ad_writer_problem()
    if problem:
        raise InputError(problem)


def save_tagged(path, tag: str, payload: dict) -> Path:
    """``payload`` (a model and what it needs) with ``format`` = ``tag`` (which :func:`load_tagged` checks),
    written atomically by ``torch.save``."""
    import torch
    return atomic_write(path, lambda t: torch.save({"format": tag, **payload}, t))


def load_tagged(path, tag: str, weights_only: bool = True, map_location="cpu") -> dict:
    """What :func:`save_tagged` wrote with ``tag``. ``weights_only``: tensors, numbers, strings and containers
    only (no pickled objects run on loading); False for a payload holding Python objects, read back from the
    pipeline's own ``--out`` only. Raises ``ValueError`` saying why a file is not one: the reader's exception
    class (damaged, not a torch file), or ``format <tag>`` (another file)."""
    import torch
    try:
        payload = torch.load(str(path), map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: the caller says what to do
        raise ValueError(exc.__class__.__name__) from None
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ValueError(f"format {tag}")
    return payload


def _jsonable(o):
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def file_signature(path) -> list:
    """[path, size, mtime] of a file, or of every file below a folder."""
    if path is None:
        return []
    p = Path(path)
    if p.is_dir():
        return [file_signature(q) for q in sorted(p.rglob("*")) if q.is_file()]
    if p.exists():
        st = p.stat()
        return [str(p), st.st_size, int(st.st_mtime)]
    return [str(p), None]


CODE_DIRS = ("data", "image_process", "positions_enhancement", "models", "pipeline")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the pipeline's own Python source (the library folders and the stage scripts at the
    top level; not the benchmarks or tests). Part of every stage's fingerprint, so that outputs
    written by another version of the code are redone rather than trusted."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(root.glob("*.py")) + sorted(f for d in CODE_DIRS for f in (root / d).rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(config_parts: dict, inputs=(), upstream: str | None = None) -> str:
    payload = json.dumps({"config": config_parts, "inputs": [file_signature(i) for i in inputs],
                          "upstream": upstream, "code": code_version()}, sort_keys=True, default=_jsonable)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_fresh(out_dir, stage: str, fp: str, outputs) -> bool:
    """Whether ``stage``'s outputs in ``out_dir`` exist, are readable (:func:`readable`) and were made with
    fingerprint ``fp``."""
    if not all((Path(out_dir) / o).exists() for o in outputs):
        return False
    recorded = _stamp_record(out_dir, stage)
    if recorded is None:      # missing or damaged (cut short, not text, not a mapping): redo the stage
        return False
    if recorded.get("fingerprint") == fp:
        damaged = [o for o in outputs if not readable(Path(out_dir) / o)]
        if damaged:
            log.warning("%s: cannot be read (damaged or cut short outside the pipeline); redoing %s",
                        Path(out_dir) / damaged[0], stage)
            return False
        if not metrics_kept(out_dir, stage):
            log.warning("%s: %s's values are gone (the file removed, cut short or edited outside the pipeline); "
                        "redoing %s", Path(out_dir) / METRICS_FILE, stage, stage)
            return False
        return True
    if recorded.get("code") != code_version():
        log.info("%s: written by another version of the pipeline's code; redoing %s", Path(out_dir), stage)
    return False


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"      # the empty IEND chunk that closes every PNG


def readable(path: Path) -> bool:
    """A cheap check that an output file can be opened: an ``.h5ad``/``.h5`` by HDF5 (its superblock: a
    file cut short fails), a ``.npy`` by its header, a ``.pt`` (torch) by its zip directory, a ``.png`` by
    its first and last bytes, a ``.csv`` by its final newline; other files are taken as they are. The pipeline
    writes atomically, so a damaged output comes from outside it (a disk error, a partial copy of a
    folder); it is redone rather than read into a traceback."""
    path = Path(path)
    try:
        if path.suffix in (".h5ad", ".h5"):
            import h5py
            with h5py.File(path, "r"):
                return True
        if path.suffix == ".npy":
            import numpy as np
            np.load(path, mmap_mode="r")
        if path.suffix == ".pt":                 # torch.save's zip archive: its directory sits at the end
            import zipfile
            return zipfile.is_zipfile(path)
        if path.suffix == ".png":                # the signature first and the IEND chunk last
            with open(path, "rb") as f:
                head = f.read(8)
                f.seek(max(0, path.stat().st_size - 12))
                return head == PNG_SIGNATURE and f.read() == PNG_END
        if path.suffix == ".csv":                # written whole, a table ends with its last line's newline
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 1))
                return f.read() == b"\n"
    except (OSError, ValueError, EOFError):
        return False
    return True


def write_stamp(out_dir, stage: str, fp: str) -> None:
    save_json(Path(out_dir) / STAMP_DIR / f"{stage}.json", {"fingerprint": fp, "code": code_version()})


def figures_wanted(cfg: dict) -> bool:
    """``plot.figures``: whether the stages draw their PNG figures (false: none, e.g. for many slides in batch)."""
    return bool((cfg.get("plot") or {}).get("figures", True))


def figures_off(cfg: dict, out_dir, names) -> bool:
    """With ``plot.figures`` false, remove the figures ``names`` (file names in ``out_dir``) that an earlier run
    drew, since they would no longer show what the folder holds, and return True: the caller draws nothing.
    Returns False, removing nothing, when figures are wanted."""
    if figures_wanted(cfg):
        return False
    for name in names:
        path = Path(out_dir) / name
        if path.exists():
            path.unlink()
            log.info("removed %s: plot.figures is false", path)
    return True


def figures_fresh_or_redrawn(out_dir, stage: str, fp: str, cfg: dict, plot_settings: dict, figures, redraw,
                             label: str, note: str) -> None:
    """For a stage whose outputs are up to date (fingerprint ``fp``): its figures have their own stamp
    (``<stage>.figures``, fingerprint = ``fp`` + ``plot_settings``, the keys only the figures use, among them
    ``plot.figures``), so changing only those redraws them from the saved outputs (``redraw()``) instead of
    redoing the stage or, the stage being skipped, leaving the old figure; with ``plot.figures`` false they are
    removed instead (:func:`figures_off`). ``figures``: the files the stage may draw, the first always drawn;
    ``label``/``note``: the log line's stage name and what the redraw was for."""
    wanted = figures_wanted(cfg)
    drawn = list(figures[:1]) if wanted else []
    if is_fresh(out_dir, f"{stage}.figures", fingerprint(plot_settings, upstream=fp), drawn):
        log.info("%s: up to date, skipped (use --force to redo)", label)
        return
    if wanted:
        redraw()
    else:
        figures_off(cfg, out_dir, figures)
    write_figures_stamp(out_dir, stage, fp, plot_settings)
    log.info("%s: up to date; %s", label, note if wanted else "no figures (plot.figures is false)")


def write_figures_stamp(out_dir, stage: str, fp: str, plot_settings: dict) -> None:
    """Record that the figures of ``stage`` were drawn from outputs ``fp`` with ``plot_settings``."""
    write_stamp(out_dir, f"{stage}.figures", fingerprint(plot_settings, upstream=fp))


def check_upstream(out_dir, stage: str, fp: str, output, script: str) -> None:
    """Refuse to build on ``output`` (the earlier ``stage``'s file in ``out_dir``) when its stamp says it
    was made with other inputs, settings or code than this run's config gives that stage (``fp``): run
    stage by stage, a later stage with another ``data.path`` took the earlier slide's features or counts
    silently, since every Visium slide has the same barcodes. Without a stamp (a file put there by hand
    or by an old version) a warning says it is taken as it is."""
    recorded = _stamp_record(out_dir, stage)
    if recorded is None:
        log.warning("%s: no readable record of what it was made from (%s); it is used as it is", output,
                    Path(out_dir) / STAMP_DIR / f"{stage}.json")
        return
    if recorded.get("fingerprint") == fp:
        return
    why = ("another version of the pipeline's code" if recorded.get("code") != code_version() else
           "other inputs or settings (another slide or data.* file, or that stage's keys)")
    raise InputError(f"{output}: made by {script} with {why} than this run's config; rerun {script} "
                     "with this config and --out first (or run every stage in one go with run_dlpfc.py / "
                     "run_breast_cancer.py).")


def _stamp_record(out_dir, stage: str) -> dict | None:
    """``<out>/.stamps/<stage>.json`` ({fingerprint, code}); None when missing or damaged."""
    recorded = _json_file(Path(out_dir) / STAMP_DIR / f"{stage}.json")
    return recorded if isinstance(recorded, dict) else None


def read_stamp(out_dir, stage: str) -> str | None:
    recorded = _stamp_record(out_dir, stage)
    return None if recorded is None else recorded.get("fingerprint")


@functools.lru_cache(maxsize=1)
def software_versions() -> dict:
    """What produced a run, for ``metrics.json``: the pipeline's code hash (:func:`code_version`), its git
    commit when run from a checkout (``+ changes`` when the tracked files differ from it), and the
    versions of Python and the libraries that decide the numbers."""
    import platform
    import subprocess
    from importlib import metadata

    root = Path(__file__).resolve().parents[1]
    out = {"code": code_version(), "python": platform.python_version()}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = git("rev-parse", "--short", "HEAD") if (root / ".git").exists() else None
        if head is not None and head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            out["git"] = head.stdout.strip() + (" + changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for name in ("torch", "torch_geometric", "numpy", "scipy", "scikit-learn", "scanpy", "anndata"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def update_metrics(out_dir, values: dict, seconds: dict | None = None, drop=(), stage: str | None = None,
                   section: str | None = None, section_only=()) -> dict:
    """Merge ``values`` (and per-stage ``seconds``) into ``<out>/metrics.json``, with ``peak_memory_gb``:
    the largest resident memory of this process so far (GB; forked feature workers not counted), and
    on a CUDA run ``cuda_peak_gb``: the most GPU memory torch had allocated in this process so far,
    and ``software`` (:func:`software_versions`). A stage's ``seconds`` are also kept in
    ``.stamps/<stage>.seconds.json``; a later call of that stage without ``seconds`` (its values redone from
    its saved outputs, as stage 3 re-clusters its embedding) puts back those that ``metrics.json`` lost: the
    time of the run that made the outputs, which the file held before it was removed or cut short.

    ``metrics.json`` is shared by the stages written into one folder. ``values`` go to its top level (the
    keys the issues' file contracts name there), except ``section_only``; with ``section`` (stages 4
    and 5: ``superres``, ``predict``) all of ``values`` also replace ``metrics[section]`` whole, the
    stage's own copy, which no other stage overwrites. Which stage last wrote each top-level key is kept
    in ``.stamps/metrics_owners.json``: a stage that replaces another's different value (stage 5's
    ``pcc_all`` over stage 4's) says so in a warning. With ``stage`` given, the keys that stage's previous
    run wrote and this one does not (``.stamps/<stage>.metrics_keys.json``), and the keys in ``drop``,
    are removed while this stage is still their last writer: a rerun without truth must not keep the
    last run's ``ari``, nor one without an evaluation protocol its scores, and neither may remove
    another stage's. (In a folder written before owners were kept, a key another stage's keys file
    names counts as that stage's.)"""
    path = Path(out_dir) / METRICS_FILE
    metrics = read_metrics(out_dir)          # missing or damaged: started again
    top = {k: v for k, v in values.items() if k not in section_only}
    written = {**top, **({section: values} if section is not None else {})}
    stamps = Path(out_dir) / STAMP_DIR
    owners_file = stamps / "metrics_owners.json"
    owners = _json_dict(owners_file)
    if stage is not None:
        keys_file = stamps / f"{stage}.metrics_keys.json"
        others = {k for f in stamps.glob("*.metrics_keys.json") if f != keys_file for k in _json_list(f)}

        def ours(k):
            return owners[k] == stage if k in owners else k not in others

        drop = [k for k in dict.fromkeys([*drop, *(k for k in _json_list(keys_file) if k not in written)]) if ours(k)]
        replaced = [k for k in top if k in metrics and owners.get(k, stage) != stage and metrics[k] != top[k]]
        for owner in dict.fromkeys(owners[k] for k in replaced):
            ks = [k for k in replaced if owners[k] == owner]
            kept = f"; its values stay under '{owner}'" if isinstance(metrics.get(owner), dict) else ""
            log.warning("%s: stage '%s' replaces stage '%s''s %s at the top level%s (give each stage its own --out "
                        "to keep them apart)", path, stage, owner, ", ".join(ks), kept)
    for k in drop:                   # a previous run's keys that this run's outputs no longer back
        metrics.pop(k, None)
        if owners.get(k) == stage:
            del owners[k]
    metrics.update(written)
    metrics["software"] = software_versions()
    try:
        import resource
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KB on Linux, bytes on macOS
        metrics["peak_memory_gb"] = round(maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)
    except ImportError:                  # Windows
        pass
    torch = sys.modules.get("torch")     # only when the run imported it: never initialises CUDA itself
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    had = metrics.get("seconds") if isinstance(metrics.get("seconds"), dict) else {}
    timed = {k: round(v, 3) for k, v in (seconds or {}).items()}
    if stage is not None and not timed:     # values redone from saved outputs: the time of the run that made them
        last = _json_file(stamps / f"{stage}.seconds.json")
        timed = {k: v for k, v in last.items() if k not in had and isinstance(v, (int, float))} \
            if isinstance(last, dict) else {}
    if timed:                               # (a "seconds" edited into something else than a mapping is replaced)
        metrics["seconds"] = {**had, **timed}
    save_json(path, metrics)
    if stage is not None:
        save_json(keys_file, sorted(written))
        save_json(owners_file, {**owners, **{k: stage for k in written}})
        if seconds:
            save_json(stamps / f"{stage}.seconds.json", timed)
    return metrics


def metrics_kept(out_dir, stage: str) -> bool:
    """Whether ``<out>/metrics.json`` is readable and still holds every top-level value that ``stage``'s last run
    wrote (``.stamps/<stage>.metrics_keys.json``) and no later run took over or dropped (``metrics_owners.json``);
    True for a stage that writes none. False when the file was removed, cut short or edited: :func:`is_fresh` then
    has the stage write them again (each stage redoes the least it can: stage 3 re-clusters its saved embedding)."""
    stamps = Path(out_dir) / STAMP_DIR
    written = _json_list(stamps / f"{stage}.metrics_keys.json")
    if not written:
        return True
    metrics = _json_file(Path(out_dir) / METRICS_FILE)
    owners = _json_dict(stamps / "metrics_owners.json")
    return isinstance(metrics, dict) and all(k in metrics for k in written if owners.get(k) == stage)


def read_metrics(out_dir) -> dict:
    """``<out>/metrics.json`` as a dict; empty when missing or not readable as one."""
    metrics = _json_file(Path(out_dir) / METRICS_FILE)
    return metrics if isinstance(metrics, dict) else {}


def _json_list(path: Path) -> list:
    """The list of keys in a stage's ``.metrics_keys.json``; empty when missing or not a list."""
    keys = _json_file(path)
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _json_dict(path: Path) -> dict:
    """``.stamps/metrics_owners.json`` (key -> stage); empty when missing or not a mapping."""
    owners = _json_file(path)
    return {k: v for k, v in owners.items() if isinstance(v, str)} if isinstance(owners, dict) else {}


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
