"""Files, written and read in one way everywhere: atomic writes (a crash leaves the old file, the
new one is on the disk before it replaces it and gets the permissions of the umask), checksums, the
README's generated blocks between two markers, and state dicts read from ``.safetensors`` or torch files.

Library code: plain exceptions (``FileNotFoundError``, ``ValueError``, ``TypeError``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from typing import Any, Callable, Mapping

import torch

#: how the temporary files of `atomic_write` begin (what a crash mid-write leaves behind)
TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Write a file through ``write(tmp_path)`` then rename it over ``path``: a crash leaves the old file.
    The new file's data is flushed to the disk (``fsync``) before the rename, and the rename before this
    returns, so that a power loss cannot leave a renamed but empty file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a file written normally gets the umask's permissions
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


def file_sha256(path: str) -> str:
    """The SHA-256 of the file ``path``, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_sha256(obj: Any) -> str:
    """The SHA-256 of a nested structure of tensors, numpy arrays, dicts, lists, tuples and plain values
    (a checkpoint's state): of each tensor's dtype, shape and bytes, each dict in key order, so that it
    is the same after a save and a load whatever the file format; a flipped bit changes it."""
    import numpy as np

    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            digest.update(f"array {x.dtype} {x.shape};".encode())
            digest.update(np.ascontiguousarray(x).view(np.uint8).reshape(-1))
        elif isinstance(x, Mapping):
            digest.update(f"dict {len(x)}{{".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
            digest.update(b"}")
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__} {len(x)}[".encode())
            for item in x:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(x).__name__} {x!r};".encode())

    feed(obj)
    return digest.hexdigest()


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write` of a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str, data: Any, indent: int = 2, sort_keys: bool = False, newline: bool = False) -> None:
    """`atomic_write` of ``data`` as JSON (``newline``: end the file with one)."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + ("\n" if newline else ""))


# ------------------------------------------------------------------------------- generated blocks
def replace_marked_block(text: str, start: str, end: str, body: str) -> str:
    """``text`` with everything between the markers ``start`` and ``end`` replaced by ``body`` (the
    markers stay). Raises ``ValueError`` naming the markers when ``text`` does not hold them in order."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"no {start} ... {end} block to fill")
    return pattern.sub(lambda _: start + body + end, text, count=1)


def write_marked_block(path: str, start: str, end: str, body: str) -> None:
    """`replace_marked_block` in the file ``path``, written atomically."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    atomic_write_text(path, replace_marked_block(text, start, end, body))


# ------------------------------------------------------------------------------- state dicts
def read_state_dict(source: Any, what: str = "checkpoint", unwrap: tuple[str, ...] = ("state_dict",),
                    trust_pickles: bool = False) -> Mapping[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file (a path), or from a dict already loaded.

    A ``{key: state dict}`` wrapper is unwrapped for each key of ``unwrap`` in turn (``"state_dict"``,
    ``"model"``), and a ``module.`` prefix on every key (DDP's) is dropped. Torch files load with
    ``weights_only=True``; with ``trust_pickles`` a file that holds other Python objects is loaded anyway,
    with a warning. ``what`` names the file in errors: ``FileNotFoundError``, ``ValueError`` (unreadable),
    ``TypeError`` (not a state dict).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path!r} does not exist.")
        source = _load_file(path, what, trust_pickles)
    for key in unwrap:
        if isinstance(source, Mapping) and isinstance(source.get(key), Mapping):
            source = source[key]
    if not isinstance(source, Mapping):
        raise TypeError(
            f"Expected a state dict, a checkpoint dict with 'state_dict', or a path; got {type(source).__name__}."
        )
    if source and all(k.startswith("module.") for k in source):
        source = {k[len("module."):]: v for k, v in source.items()}
    return source


def _load_file(path: str, what: str, trust_pickles: bool) -> Any:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for a broken file
            raise ValueError(f"cannot read {what} {path!r}: {type(e).__name__}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickles:
            raise ValueError(f"cannot read {what} {path!r}: it holds Python objects besides tensors") from None
        warnings.warn(f"{path!r} holds Python objects besides tensors (e.g. training arguments); loading it with "
                      f"weights_only=False. Only load checkpoints you trust.", stacklevel=4)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types for files that are not torch files
        raise ValueError(f"cannot read {what} {path!r}: {type(e).__name__}: {e}") from None


def state_dict_shapes(
    path: str, what: str = "checkpoint", unwrap: tuple[str, ...] = ("state_dict",)
) -> dict[str, tuple]:
    """``{key: shape}`` of the state dict in the file ``path``, read as `read_state_dict` reads it, without
    loading the tensors (a safetensors header; a torch file memory-mapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a broken file
            raise ValueError(f"cannot read {what} {path!r}: {type(e).__name__}: {e}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a torch file of the legacy (non-zip) format cannot be memory-mapped
        loaded = _load_file(path, what, trust_pickles=False)
    except Exception as e:  # torch.load raises many types for files that are not torch files
        raise ValueError(f"cannot read {what} {path!r}: {type(e).__name__}: {e}") from None
    state = read_state_dict(loaded, what, unwrap)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
