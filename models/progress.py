"""Progress bars for the long loops (training epochs, grid prediction, whole-slide tiles).

One place decides how often a bar redraws: on a terminal or in a notebook at most once a second;
when stderr is a file or a pipe (a cluster job's log, ``> run.log 2>&1``) at most every 30 s, so a
log holds a handful of progress lines per loop instead of thousands of carriage-return updates.
"""
from __future__ import annotations

import sys

TERMINAL_INTERVAL_S = 1.0
LOG_INTERVAL_S = 30.0


def _interactive() -> bool:
    if "ipykernel" in sys.modules:        # Jupyter: tqdm.auto draws a widget
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` with ``mininterval`` set by where it is shown (see
    the module docstring) unless given, and ``miniters=1``: tqdm's own default (counted iterations
    between clock checks, grown as it goes) lets its monitor thread, which redraws a bar not drawn for
    10 s, draw the count of the last redraw with the current time (a log read "22/40 [00:49<00:25]"
    for a loop that had gone on). Checking the clock every iteration costs nothing for these loops."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", TERMINAL_INTERVAL_S if _interactive() else LOG_INTERVAL_S)
    kwargs.setdefault("miniters", 1)
    return tqdm(iterable, **kwargs)
