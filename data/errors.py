"""The one exception type for bad user input.

Every reader and stage raises :class:`InputError` with a message that names the file and the
fix, so the stage scripts can print one clear line instead of a traceback.
"""


class InputError(ValueError):
    """Bad or inconsistent input data (missing file, mismatched barcodes, spots off the image...)."""


class OutputError(InputError):
    """An output file could not be written (disk full, read-only folder, no permission). Reported
    like bad input -- one line naming the file and what to do -- since the fix is the user's too."""
