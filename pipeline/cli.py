"""The command-line contract every stage script shares.

``--config FILE``, ``--out DIR``, repeated ``--set KEY=VALUE``, ``--device auto|cpu|cuda``,
``--force`` (redo finished stages) and ``--demo`` (synthetic input, :mod:`pipeline.demo`). Bad input ends the program
with one line ``error: ...`` naming the file and the fix, and exit status 2.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from data.errors import InputError
from data.readers import INPUT_FILE_KEYS, check_input_files
from pipeline.config import absolute_input_paths, load_config, resolve_data_paths
from pipeline.demo import warn_replaced_overrides
from pipeline.stages import check_h5ad_writer

log = logging.getLogger("stpipe")


DEVICES = ("auto", "cpu", "cuda")    # --device


def build_parser(description: str, default_config: str | None = None, demo: bool = False):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config,
                   help=f"YAML config, merged over configs/defaults.yaml (default: {default_config or 'none'})")
    p.add_argument("--out", default=None, help="output folder (default: output.dir in the config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_clusters=7 (value parsed as YAML)")
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="auto = CUDA when available")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs are up to date")
    p.add_argument("--show-config", action="store_true",
                   help="print the merged config (defaults <- --config <- --set) as YAML and exit")
    if demo:
        p.add_argument("--demo", action="store_true", help="run on a synthetic slice generated on the fly")
    return p


def resolve_device(name: str) -> str:
    """``--device`` (or the API's ``device=``) as torch's device name: ``auto`` is CUDA when torch sees a GPU."""
    import torch

    if name not in DEVICES:     # argparse checks the scripts' option; the API's argument comes here as given
        raise InputError(f"device={name!r}: choose one of {', '.join(DEVICES)}.")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto.")
    return name


# the config's inputs: ``data.*`` (stages 1-4's slide) and the section lists (stage 5's slides, stage 4's extra ones)
INPUT_PARTS = {"data": "data.*", "train": "train.sections", "test": "test.sections"}


def warn_unused_inputs(cfg: dict, reads) -> None:
    """Warn about each input the config sets that this script does not read (``reads``: keys of
    :data:`INPUT_PARTS`): ``predict_expression.py --set data.path=mine`` predicted the config's test sections,
    and mine was not read, without a word."""
    script, reading = script_name(), " and ".join(INPUT_PARTS[r] for r in reads) or "run folders"
    data = cfg.get("data") or {}
    unused = [] if "data" in reads else [f"data.{k}={data[k]}" for k in INPUT_FILE_KEYS if data.get(k)]
    unused += [f"{part}.sections" for part in ("train", "test")
               if part not in reads and (cfg.get(part) or {}).get("sections")]
    for key in unused:
        hint = (" (a slide to predict is a test section: --set 'test.sections=[{path: ...}]')"
                if key.startswith("data.") and "test" in reads else "")
        log.warning("%s reads %s: %s is set but not used%s", script, reading, key, hint)


def setup(args, extra_configs=(), reads=("data",)) -> tuple[dict, Path, str]:
    """Load the config, create the output folder and pick the device (``--show-config``: print the
    merged config and exit). ``reads``: the inputs the script reads (:data:`INPUT_PARTS`); the others set
    are warned about (:func:`warn_unused_inputs`) and their files not checked."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # tifffile's and OpenCV's own messages about a damaged image would precede our one-line error
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    import cv2
    if hasattr(cv2, "setLogLevel"):         # OpenCV 4.x
        cv2.setLogLevel(0)                  # 0: silent
    else:                                   # OpenCV 5
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    cfg = absolute_input_paths(load_config(args.config, args.overrides, extra_files=extra_configs))
    if getattr(args, "demo", False) and not getattr(args, "show_config", False):
        warn_replaced_overrides(args.overrides)
    if getattr(args, "show_config", False):
        import yaml
        if getattr(args, "demo", False):
            print("# --demo: the inputs below (data.*, and train/test sections) are replaced by synthetic slides "
                  "generated in <out>/demo_slice*")
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        sys.exit(0)
    if not getattr(args, "demo", False):    # a missing input named now, not after seconds of imports (torch's)
        warn_unused_inputs(cfg, reads)
        if "data" in reads:
            check_input_files(resolve_data_paths(cfg.get("data") or {}))
    if args.out is not None and not str(args.out).strip():   # `--out "$OUT"` with OUT unset wrote into output.dir
        raise InputError("--out is empty (an unset shell variable?); name the folder the outputs go to, or leave "
                         "--out out to use output.dir of the config.")
    check_h5ad_writer()             # before any work: pandas 3 beside an anndata that cannot write its text
    out = output_folder(args.out or cfg.get("output", {}).get("dir") or "out")   # output.dir: ~/runs/x
    return cfg, out, resolve_device(args.device)


def output_folder(path) -> Path:
    """``--out`` as a folder that exists (made with its parents; ``~`` expanded), or one clear error: a file of
    that name, or a folder that cannot be made."""
    out = Path(str(path)).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a file, not a folder; --out names the folder the outputs are written to. "
                         "Choose another path with --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder ({exc.strerror or exc}). "
                         "Choose a writable folder with --out.") from None
    return out


LOCK_FILE = ".lock"


@contextmanager
def output_lock(out: Path):
    """Hold ``<out>/.lock`` while a run writes into ``out``, so that a second run into the same folder
    stops at once with one line instead of mixing its files with the first's (stage outputs made with
    one config and read by a stage of the other; ``metrics.json`` updates lost). The lock is the
    operating system's (``flock``; ``msvcrt.locking`` on Windows), so a run that dies releases it: a
    stale ``.lock`` file never blocks a rerun. The file holds the holder's pid and command line, which
    the refusal quotes."""
    import shlex

    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"{out}: cannot write {LOCK_FILE} in the output folder ({exc.strerror or exc}). "
                         "Choose a writable folder with --out.") from None
    try:
        try:
            _lock(fd)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
                # a file system without locks (some network mounts: ENOLCK, EOPNOTSUPP): run unguarded
                log.warning("%s: the output folder cannot be locked (%s); make sure no other run writes here",
                            out, exc.strerror or exc)
                yield
                return
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "pid unknown"
            raise InputError(f"{out}: another run is writing into this folder ({holder}). Wait for it to "
                             "finish, or give this run another --out.") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()}: {' '.join(shlex.quote(a) for a in sys.argv)}\n".encode())
        yield
    finally:
        os.close(fd)            # releases the lock


def _lock(fd: int) -> None:
    """Take an exclusive lock on ``fd`` without waiting; OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:         # Windows
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class Terminated(BaseException):
    """SIGTERM (a cluster scheduler's time limit, ``timeout``, ``kill``), raised in the main thread by
    :func:`run_main` so that a stopped run cleans up as after Ctrl-C: without it the process ended at once,
    leaving a half-written temporary output file (``.03_domains.tmp<pid>.h5ad``, up to gigabytes) in ``--out``
    and no line in the run's log."""

    def __str__(self) -> str:
        return "SIGTERM"


def _raise_terminated(signum, frame):
    raise Terminated()


def run_main(fn) -> None:
    """Run ``fn()``; turn InputError into one clear line on stderr and exit status 2, an allocation that
    failed (NumPy's MemoryError, torch's on the CPU or the GPU) into one line and status 1, Ctrl-C
    into one line and status 130 (the shell's convention for SIGINT) and SIGTERM into one line and status 143
    (:class:`Terminated`), each after the stage's temporary files are removed. Output read by a program that
    stops early (``| head``) ends the run quietly with status 1, as Python's documentation advises, not with a
    BrokenPipeError traceback."""
    import signal
    import threading

    from data.wsi import stop_zarr_reads

    in_main = threading.current_thread() is threading.main_thread()      # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        fn()
        sys.stdout.flush()        # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing more to write to the pipe
        sys.exit(1)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as exc:
        said = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"\n{said}: finished stages are kept, and a rerun with the same --out resumes after them",
              file=sys.stderr)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    finally:
        stop_zarr_reads(cancel=True)     # tile reads left running (a stop mid-read) print pages of warnings at exit
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def out_of_memory_message(exc: BaseException) -> str | None:
    """One line for an allocation that failed, or None when ``exc`` is another error. NumPy raises
    MemoryError ("Unable to allocate 2.73 TiB for an array with shape ..."), torch a RuntimeError on the
    CPU ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and
    ``torch.OutOfMemoryError`` on the GPU. (A process the operating system kills for memory ends without
    a Python error; nothing can report it here.)"""
    text = str(exc).strip()
    gpu = "CUDA out of memory" in text or type(exc).__name__ == "OutOfMemoryError"
    if not (isinstance(exc, MemoryError) or gpu or "can't allocate memory" in text):
        return None
    detail = text.splitlines()[0] if text else type(exc).__name__
    if "can't allocate memory" in detail:
        detail = detail[detail.index("can't allocate memory"):]
    detail = re.sub(r"\s+", " ", detail)[:200]
    where = "the GPU" if gpu else "this machine"
    fix = ("run with --device cpu, or on a GPU with more memory" if gpu else
           "free memory, use a machine with more, or make the work smaller (lower a config value set far above "
           "its default, a coarser superres.factor, a smaller region of the slide)")
    return (f"out of memory on {where} ({detail}). Finished stages are kept: {fix}, then rerun with the same "
            "--out.")


def save_run_config(cfg: dict, out: Path, device: str) -> Path:
    """Write the config a run used (after every merge and override) to ``<out>/config.<script>.yaml``,
    headed by the command line and device, so the run can be repeated from its output folder with
    ``--config``."""
    import shlex

    import yaml

    from pipeline.stages import atomic_write

    text = (f"# written by: {' '.join(shlex.quote(a) for a in sys.argv)}\n# device: {device}\n"
            + yaml.safe_dump(cfg, sort_keys=False))
    return atomic_write(out / f"config.{script_name()}.yaml", lambda t: Path(t).write_text(text))


def script_name() -> str:
    """The running script's name for the files named after it: ``run_dlpfc``, ``train_superres``, ...; a
    stage's ``main.py`` by its folder (``image_process``); ``run`` when not run as a script."""
    if sys.argv and sys.argv[0].endswith(".py"):
        path = Path(sys.argv[0])
        return path.parent.resolve().name if path.stem == "main" else path.stem
    return "run"


@contextmanager
def run_log(out: Path, device: str):
    """Copy this run's log lines (the ``stpipe`` logger: progress, warnings) into ``<out>/log.<script>.txt``,
    appended after the earlier runs' under a line with the date, the command line and the device, and end it
    with the run's error line when it stops on one: a run left going on a server keeps its own record of what
    it did and warned about beside its outputs (progress bars are not copied)."""
    import shlex
    from datetime import datetime

    path = Path(out) / f"log.{script_name()}.txt"
    try:
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        log.warning("%s: cannot write the run's log there (%s); logging to the terminal only", path,
                    exc.strerror or exc)
        yield
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.stream.write(f"=== {datetime.now():%Y-%m-%d %H:%M:%S} {' '.join(shlex.quote(a) for a in sys.argv)} "
                         f"(device {device})\n")
    log.addHandler(handler)
    try:
        yield
    except InputError as exc:
        handler.stream.write(f"error: {exc}\n")
        raise
    except KeyboardInterrupt:
        handler.stream.write("interrupted\n")
        raise
    except BaseException as exc:
        handler.stream.write(f"stopped by {type(exc).__name__}: {str(exc).strip()[:500]}\n")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def stage_main(doc: str, run_stage, default_config: str | None = None, demo=None, reads=("data",)) -> None:
    """The whole ``main`` of a stage script: parse the shared options, then ``run_stage(cfg, out,
    device, force)``, with bad input reported as one line. ``demo(cfg, out) -> cfg``, when given,
    adds ``--demo``: the config's inputs replaced by synthetic slides (:mod:`pipeline.demo`). ``reads``: the
    inputs the stage reads (:func:`setup`)."""
    def _main():
        args = build_parser(doc, default_config, demo=demo is not None).parse_args()
        cfg, out, device = setup(args, reads=reads)
        with output_lock(out), run_log(out, device):
            if getattr(args, "demo", False):
                cfg = demo(cfg, out)
            save_run_config(cfg, out, device)
            run_stage(cfg, out, device, args.force)
    run_main(_main)
