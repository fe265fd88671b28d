"""A run folder and what keeps it whole: the lock that lets one run own it at a time (`FolderLock`),
the files a run writes (`RUN_FILES`), replacing an old run only once the new one has saved a
checkpoint (`set_aside_run`), what a crash mid-write leaves behind (`remove_orphans`), the space an epoch's
files need (`check_free_space`) and a full disk as one line (`disk_full_as_usage_error`)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time

from ..files import TMP_PREFIX
from .errors import UsageError

CHECKPOINT = "checkpoint.pt"
#: what `gift finetune` writes into its folder (``--overwrite`` sets exactly these aside)
RUN_FILES = (CHECKPOINT, "metrics.csv", "metrics.json", "curves.png", "adapter", "adapter_ema", "eval.json")
#: the folders of a run that atomic writes write into (where their temporary files may be left)
WRITE_FOLDERS = ("", "adapter", "adapter_ema")
LOCK_FILE = ".gift.lock"
#: where ``--overwrite`` keeps the run it replaces until the new run's first checkpoint is saved
REPLACED = ".gift-replaced"


class FolderInUse(UsageError):
    """Another live process holds the folder's lock: one line naming it."""


class DiskFull(UsageError):
    """No space left while writing a run's files: one line saying what is intact."""


# ---------------------------------------------------------------------------------------- the lock
class FolderLock:
    """An exclusive lock on ``folder`` for as long as this process uses it: ``fcntl.flock`` on
    ``folder/.gift.lock``, which records the owner (pid, host, start time, command) for the message a
    second run gets. The operating system drops the lock when its process dies, so a lock file left by
    a killed run is stale and the next run simply takes it (``recovered`` then names the dead owner).

    ``kind`` names the folder in messages (``--output``). Use as a context manager; `FolderInUse` when
    another live process holds it."""

    def __init__(self, folder: str, kind: str = "--output"):
        self.folder, self.kind = folder, kind
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None
        self.recovered: dict | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read_owner(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FolderInUse(f"{self.kind} {self.folder!r} is in use by another gift run "
                                      f"({describe_owner(owner)}); wait for it to end or choose another "
                                      f"{self.kind}") from None
                raise UsageError(f"{self.kind} {self.folder!r}: cannot lock {self.path!r} ({e.strerror}); "
                                 f"choose a folder on a file system with file locks") from None
            if _same_file(fd, self.path):  # not removed by its last owner between our open and our lock
                break
            os.close(fd)
        previous = _read_owner(fd)
        self.recovered = previous or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:  # a full disk: nothing of this run is left, the lock file neither
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            os.close(fd)  # drops the lock
            if is_disk_full(e):
                raise DiskFull(f"{self.kind} {self.folder!r}: no space left on its file system, not even for "
                               f"the lock file {LOCK_FILE}; free some space or choose another {self.kind}") from None
            raise UsageError(f"{self.kind} {self.folder!r}: cannot write {self.path!r} ({e.strerror}); choose a "
                             f"folder this user can write") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # first, so that nobody locks the file we are about to let go
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict) -> str:
    """``pid 123 on host h since 2026-12-01 10:00:00`` (what a lock file records; ``unknown owner`` if unreadable)."""
    if not owner.get("pid"):
        return "owner unknown"
    return f"pid {owner['pid']} on host {owner.get('host', '?')} since {owner.get('started', '?')}"


def folder_lock(folder: str, main: bool, kind: str = "--output"):
    """`FolderLock` of ``folder`` in the main process (the others of a torchrun job share it), else a no-op."""
    return FolderLock(folder, kind) if main else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- run files
def held_run_files(folder: str) -> list[str]:
    """The `RUN_FILES` present in ``folder``."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))]


def set_aside_run(folder: str) -> None:
    """Move the run in ``folder`` (its `RUN_FILES`) into ``folder/.gift-replaced`` (`REPLACED`) and remove
    its temporary files: ``--overwrite`` keeps the old run there until the new one has saved a checkpoint
    (`drop_replaced`), and puts it back when the new one fails before that (`restore_replaced`)."""
    aside = os.path.join(folder, REPLACED)
    _remove(aside)
    os.mkdir(aside)
    for f in held_run_files(folder):
        os.replace(os.path.join(folder, f), os.path.join(aside, f))
    remove_orphans(folder)


def restore_replaced(folder: str) -> bool:
    """Put the run that `set_aside_run` moved aside back in ``folder`` (removing what the new run left
    there); False when there is none."""
    aside = os.path.join(folder, REPLACED)
    if not os.path.isdir(aside):
        return False
    for f in held_run_files(folder):
        _remove(os.path.join(folder, f))
    remove_orphans(folder)
    for f in os.listdir(aside):
        os.replace(os.path.join(aside, f), os.path.join(folder, f))
    os.rmdir(aside)
    return True


def drop_replaced(folder: str) -> None:
    """Remove the run that `set_aside_run` moved aside (the new run has saved its first checkpoint)."""
    _remove(os.path.join(folder, REPLACED))


def settle_replaced(folder: str) -> bool:
    """What a ``--overwrite`` run killed before `drop_replaced` or `restore_replaced` left: the old run is
    dropped when the new one saved a checkpoint, else put back (then True). Call with the folder locked."""
    if not os.path.isdir(os.path.join(folder, REPLACED)):
        return False
    if os.path.isfile(os.path.join(folder, CHECKPOINT)):
        drop_replaced(folder)
        return False
    return restore_replaced(folder)


def remove_orphans(folder: str) -> list[str]:
    """Remove the temporary files (and LoRA staging folders) that an atomic write killed mid-way left in
    ``folder`` and its adapter folders; returns their paths. Only safe while holding the folder's lock."""
    removed = []
    for sub in WRITE_FOLDERS:
        where = os.path.join(folder, sub)
        if os.path.isdir(where):
            removed += [os.path.join(where, name) for name in os.listdir(where) if name.startswith(TMP_PREFIX)]
    for path in removed:
        _remove(path)
    return removed


def _remove(path: str) -> None:
    """Remove a file or a folder tree; one that is gone already is fine."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ---------------------------------------------------------------------------------------- disk space
MIB = 1 << 20


def epoch_write_bytes(trainable_bytes: int, ema: bool) -> dict[str, int]:
    """What one epoch's files take, estimated from the bytes of the trainable tensors: the checkpoint
    holds them, AdamW's two moments and the EMA copy, the adapter(s) about the trainable tensors (GIFT:
    the generator and the head; LoRA: its factors and the head), and 1 MiB for RNG states, the history,
    the metrics and the curves."""
    copies = 1 + int(ema)
    return {CHECKPOINT: trainable_bytes * (3 + int(ema)) + MIB, "adapter": trainable_bytes * copies + MIB,
            "metrics": MIB}


def check_free_space(folder: str, needed: dict[str, int], kind: str = "--output") -> None:
    """`DiskFull` unless the file system of ``folder`` has room for the files in ``needed`` (name: bytes),
    counting what the files already there give back when they are replaced (each new file is written
    beside the old one, then renamed over it)."""
    free = shutil.disk_usage(folder).free
    existing = {name: _size(os.path.join(folder, name)) for name in needed}
    largest = max(needed.values())
    required = max(largest, sum(needed.values()) - sum(existing.values()) + largest)
    if free < required:
        parts = " + ".join(f"{name} {b / MIB:.1f}" for name, b in needed.items())
        given_back = sum(existing.values())
        if required == largest:
            how = f"the largest file, {largest / MIB:.1f} MiB, beside the one it replaces"
        else:
            how = (f"{parts}" + (f" - {given_back / MIB:.1f} the files there give back" if given_back else "")
                   + f" + {largest / MIB:.1f} for the largest beside the one it replaces, in MiB")
        raise DiskFull(f"{kind} {folder!r}: {free / MIB:.1f} MiB free on its file system, but an epoch needs "
                       f"about {required / MIB:.1f} MiB ({how}); free some space or choose another {kind}")


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(_size(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path) if os.path.isfile(path) else 0


NO_SPACE_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "errno 28")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a full disk or quota: ``OSError`` ENOSPC / EDQUOT, or the
    words of one in another library's error (safetensors, torch)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if any(text in str(error).lower() for text in NO_SPACE_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_as_usage_error(what: str, intact: str):
    """A full disk inside the block becomes `DiskFull`: ``no space left on device while writing WHAT;
    INTACT``; any other error passes through."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise DiskFull(f"no space left on device while writing {what}; {intact}") from e
        raise
