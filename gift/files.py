"""Files, written and read in one way everywhere: atomic writes (a crash leaves the old file, the
new one is on the disk before it replaces it and gets the permissions of the umask) and the README's
generated blocks between two markers, both `gift_kernels.files`' (the one home the kernels' tools share),
checksums, and state dicts read from ``.safetensors`` or torch files.

Library code: plain exceptions (``FileNotFoundError``, ``ValueError``, ``TypeError``).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from typing import Any, Mapping

import torch

from gift_kernels.files import (
    TMP_PREFIX,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    replace_marked_block,
    write_marked_block,
)

__all__ = ["TMP_PREFIX", "atomic_write", "atomic_write_json", "atomic_write_text", "content_sha256", "file_sha256",
           "read_state_dict", "replace_marked_block", "write_marked_block"]


# ------------------------------------------------------------------------------- checksums
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

