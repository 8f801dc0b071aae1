"""User-facing errors: one line on stderr, exit status 2, no traceback.

Entry scripts wrap their ``main`` with :func:`run_cli`. Code anywhere below raises :class:`DataError`
(bad input data) or :class:`UsageError` (bad arguments / settings) with a message that already names
the file, the record and the field, so the user knows exactly what to fix.
"""
import sys


class UsageError(Exception):
    """A wrong argument or setting."""


class DataError(Exception):
    """A problem in an input file.

    ``where`` locates the record ("line 12" for jsonl, "record 3" otherwise, 0-based) and ``field``
    the offending key; both are optional for file-level problems (empty file, bad gzip, ...).
    """

    def __init__(self, path, message, where=None, field=None):
        self.path, self.message, self.where, self.field = str(path), message, where, field
        parts = [self.path]
        if where is not None:
            parts.append(str(where))
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts + [message]))


def run_cli(main, *args, **kwargs):
    """Run ``main``; turn our own errors and Ctrl-C into one line and a non-zero exit."""
    try:
        return main(*args, **kwargs)
    except (DataError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # an unwritable output path, a full disk, ...: the user's to fix, so no traceback
        path = err.filename2 or err.filename  # for a failed rename: the destination, not the temporary file
        print(f"error: {path}: {err.strerror}" if path else f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
