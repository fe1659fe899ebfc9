"""Spreading independent per-patch work over the CPU cores, in forked processes.

Patch features (handcrafted statistics, nucleus segmentation) are computed patch by patch in numpy,
scipy and scikit-image calls that mostly run on one core and hold the GIL, so threads do not help;
processes do. :func:`map_patches` runs a function over chunks of patches in forked worker processes
(Linux only: fork starts in milliseconds and shares the parent's memory; on macOS and Windows fork
is not safe, so the chunks run here, one after the other). The function must be a pure, module-level
function of its chunk: results are then identical to the serial loop, row for row.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("stpipe")


WORKERS_ENV = "STPIPE_WORKERS"   # e.g. STPIPE_WORKERS=1 keeps all patch work in the main process


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:        # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes for patch work: ``$STPIPE_WORKERS`` when set (1 = none), else every available core."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if not value:
        return available_cores()
    try:
        return max(1, int(value))
    except ValueError:
        from data.errors import InputError
        raise InputError(f"{WORKERS_ENV}={value!r}: give a whole number of worker processes (1 = none).") from None


MIN_PATCHES = 1024   # below this many patches, starting worker processes costs more than it saves


def _default_sigterm() -> None:
    """In a forked worker: SIGTERM ends it at once again (the parent's handler, :class:`pipeline.cli.Terminated`,
    is for the main process; a pool stops its workers with SIGTERM when one of them dies)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call(job):
    fn, chunk, extra = job
    return fn(chunk, *extra)


def map_patches(fn, patches, *extra, workers: int | None = None):
    """``fn(patches, *extra)`` for an array whose rows are independent patches, computed on chunks of
    rows in up to ``workers`` forked processes (default :func:`default_workers`) and concatenated,
    when there are at least :data:`MIN_PATCHES` rows, more than one worker and the OS is Linux;
    otherwise in one call here. ``fn`` must be a module-level function whose row i depends on row i
    only (then the chunks give the same numbers as one call)."""
    import numpy as np

    workers = default_workers() if workers is None else int(workers)
    if workers <= 1 or len(patches) < MIN_PATCHES or not sys.platform.startswith("linux"):
        return fn(patches, *extra)
    import multiprocessing
    import warnings
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    jobs = [(fn, c, extra) for c in np.array_split(patches, 4 * workers)]   # several per worker: they end together
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a process with threads (torch's pool); the children
            # run only numpy/scipy/scikit-image code on their own chunk
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_default_sigterm) as pool:
                return np.concatenate(list(pool.map(_call, jobs)))
    except (BrokenProcessPool, OSError) as exc:   # a worker killed (e.g. out of memory) or no fork allowed
        log.warning("patch features: worker processes failed (%s); computing them in this process instead", exc)
        return fn(patches, *extra)
