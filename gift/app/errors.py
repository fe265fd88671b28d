"""The application's errors: `UsageError` is bad input, printed by the CLI as one line with exit
status 2; `library_errors` turns the library's plain exceptions into it where the input caused them."""
from __future__ import annotations

import contextlib
import os


class UsageError(Exception):
    """Bad input to the command line: printed as one line, exit status 2."""


class DataError(UsageError, ValueError):
    """Bad input data: the message says what and where (file, line) and what to do."""


#: where torch's C++ errors (``c10::Error``) begin the stack trace they append to their message
CPP_TRACE_MARKERS = ("Exception raised from ", "frame #0:")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (library messages may span several), without the C++ stack
    frames torch appends to some."""
    text = str(error)
    for marker in CPP_TRACE_MARKERS:
        if marker in text:
            text = text[:text.index(marker)]
    text = " ".join(text.split())
    return text or type(error).__name__


#: The library's plain exceptions that `library_errors` turns into `UsageError` by default.
LIBRARY_ERRORS = (ValueError, TypeError, FileNotFoundError, IndexError, KeyError, RuntimeError)


@contextlib.contextmanager
def library_errors(context: str = "", types: tuple[type[BaseException], ...] = LIBRARY_ERRORS):
    """Re-raise ``types`` raised inside as `UsageError` (``context`` first), on one line."""
    try:
        yield
    except UsageError:
        raise
    except types as e:
        prefix = f"{context}: " if context else ""
        raise UsageError(prefix + one_line(e)) from e


def missing_extra(module: str, extra: str, feature: str) -> str | None:
    """None when ``module`` imports; else the one line saying which extra to install for ``feature``."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return None
    return f"{feature} needs {module}, which is not installed: pip install 'gift[{extra}]'"


def check_output_folder(path: str, *, kind: str = "--output", create: bool = True) -> None:
    """Create folder ``path`` and check that files can be written in it; `UsageError` naming the
    problem (a file in the way, a read-only file system, no permission) otherwise. With ``create=False``
    nothing is created: the folder, or its nearest existing parent, must be writable (for commands that
    check their other inputs before they write anything)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{kind} {path!r} is a file, not a folder; name a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{kind} {path!r} is under {parent!r}, which is a file; name a folder")
    if not create:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{kind} {path!r} is not writable (no permission on {parent!r}); "
                             f"choose a folder you can write to")
        return
    try:
        os.makedirs(path, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"{kind} {path!r} is not writable ({e.strerror or type(e).__name__}); "
                         f"choose a folder you can write to") from None
