"""Files written in one way everywhere, by `gift` as by the kernels' tools (the one module both reach):
atomic writes (a crash leaves the old file; the new one is on the disk before it replaces it and gets
the umask's permissions, as a plain ``open(path, "w")`` would, not ``mkstemp``'s 0600) and a README's
generated block between two marker lines. Plain exceptions only (``OSError``, ``ValueError``).
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Any, Callable

#: how the temporary files of `atomic_write` begin (what a crash mid-write leaves behind)
TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Write a file through ``write(tmp_path)`` (a unique file beside ``path``, its folder made if need
    be), then rename it over ``path``; on any error the temporary file is removed and ``path`` is as it was.
    The new file's data is flushed to the disk (``fsync``) before the rename, and the rename before this
    returns, so that a power loss cannot leave a renamed but empty file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_path(directory)


def _fsync_path(path: str) -> None:
    """``fsync`` a file or a directory (its entries: a rename in it); a file system that cannot sync a
    directory (some network ones) is let be."""
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not is_dir or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, data: Any, indent: int = 2, sort_keys: bool = False, newline: bool = False) -> None:
    """`atomic_write` of ``data`` as JSON (``newline``: end the file with one)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + ("\n" if newline else ""))


def replace_marked_block(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between the first ``start`` marker and the ``end`` marker after it replaced by
    the lines of ``body`` (its leading and trailing newlines dropped: the markers end up on lines of their
    own either way; an empty body leaves them on consecutive lines). Raises ``ValueError`` naming the
    markers when ``text`` does not hold them in that order."""
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if j < 0:
        raise ValueError(f"no {start} ... {end} block to fill")
    lines = body.strip("\n")
    return text[:i + len(start)] + "\n" + (lines + "\n" if lines else "") + text[j:]


def write_marked_block(path: str, start: str, end: str, body: str) -> None:
    """`replace_marked_block` in the file ``path``, written atomically."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    atomic_write_text(path, replace_marked_block(text, start, end, body))
