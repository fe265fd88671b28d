"""The one place that decides whether an op runs its Triton kernels or its torch path: the backend.

An op's ``backend=`` argument, else ``GIFT_BACKEND=auto|torch|triton``, else ``GIFT_KERNELS`` (the variable's
old name, still read), else ``auto``:
  * ``auto``: on CUDA tensors (float32/float16/bfloat16) what each op measured or chose (PaCa: Triton;
    the residual projection: the torch path, unless a one-time timing of both backends on this device,
    cached in ``~/.cache/gift/kernels.json``, found Triton faster; see `measured_choice`); the torch path
    otherwise (CPU tensors, float64).
  * ``torch``: always the torch path.
  * ``triton``: the Triton kernels, on CUDA or on CPU tensors under ``TRITON_INTERPRET=1``;
    where they cannot run (no CUDA and no interpreter, float64) a ``RuntimeError`` says why.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:                           # Windows: no lock around the cache's read-merge-replace
    fcntl = None

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "GIFT_BACKEND"
OLD_BACKEND_ENV = "GIFT_KERNELS"  # the old name of GIFT_BACKEND, still read when GIFT_BACKEND is unset
# the dtypes the Triton kernels take, by Triton's name for them (its signatures' "*fp32", tl.dtype("fp32"))
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TRITON_DTYPES = tuple(TRITON_DTYPE_NAMES)


def requested_backend(backend: str | None = None) -> str:
    """``backend``, else ``$GIFT_BACKEND``, else ``$GIFT_KERNELS``, else ``"auto"``; checked."""
    source, value = "backend", backend
    for name in (BACKEND_ENV, OLD_BACKEND_ENV):
        if not value:
            source, value = name, os.environ.get(name)
    value = (value or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source}={value!r} is unknown; choose one of {BACKENDS}.")
    return value


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORTABLE: bool | None = None  # a plain cache: torch.compile traces through this module


def _triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORTABLE = True
        except ImportError:
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether Triton kernels can run on ``device`` (default: CUDA if present, else CPU)."""
    return _why_not_triton(_default_device(device), torch.float32) is None


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _why_not_triton(device: torch.device, dtype: torch.dtype) -> str | None:
    if not _triton_importable():
        return "the triton package is not installed"
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {[str(d) for d in TRITON_DTYPES]}, not {dtype}"
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
            major, minor = torch.cuda.get_device_capability(device)
            return f"the Triton kernels need compute capability 8.0+ (tf32x3 fp32 dots) and this GPU is {major}.{minor}"
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"tensors are on {device.type} and there is no CUDA; CPU tensors need TRITON_INTERPRET=1"


def resolve_backend(device: torch.device, dtype: torch.dtype, backend: str | None = None, op: str = "op",
                    unsupported: str | None = None, auto: Callable[[], str] | None = None) -> str:
    """``"triton"`` or ``"torch"`` for an op on tensors of this device and dtype.

    ``unsupported`` names a feature of this call that the Triton kernels lack (auto then takes torch).
    ``auto`` returns what ``auto`` picks where Triton could run on CUDA (default: Triton).
    """
    requested = requested_backend(backend)
    if requested == "torch":
        return "torch"
    why = unsupported or _why_not_triton(device, dtype)
    if requested == "triton":
        if why is not None:
            raise RuntimeError(f"{op}: {BACKEND_ENV}=triton was asked for, but {why}. "
                               f"Use {BACKEND_ENV}=auto or torch.")
        return "triton"
    if why is not None or device.type != "cuda":
        return "torch"
    return auto() if auto is not None else "triton"


def active_backend(device: torch.device | str | None = None, backend: str | None = None) -> str:
    """What ops on float32 tensors of ``device`` (default: CUDA if present, else CPU) will run."""
    return resolve_backend(_default_device(device), torch.float32, backend)


# ------------------------------------------------------------------------------ measured per-device choices
CACHE_ENV = "GIFT_KERNELS_CACHE"
_CHOICES: dict[str, dict] = {}           # path -> {entry: {"backend": name, "seconds": {name: s}}}


def choices_path() -> Path:
    """``$GIFT_KERNELS_CACHE`` or ``~/.cache/gift/kernels.json``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gift" / "kernels.json")


def _load_choices(path: Path) -> dict:
    key = str(path)
    if key not in _CHOICES:
        _CHOICES[key] = _read_choices(path)   # unreadable: measured again and rewritten
    return _CHOICES[key]


def _read_choices(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):             # missing or unreadable: nothing to keep
        return {}
    return data if isinstance(data, dict) else {}


def _save_choices(path: Path, data: dict) -> None:
    """Merges ``data`` into the file at ``path`` (re-read under an exclusive lock on ``path.lock``, so that
    processes measuring at once keep each other's entries) and replaces it atomically; ``data`` gets the
    file's other entries."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes
            merged = {**_read_choices(path), **data}
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        data.update(merged)
    except OSError:
        pass                                  # a read-only home: the choice still holds for this process


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The gift and Triton versions: a cached choice holds for the code that was measured."""
    try:
        gift_version = importlib.metadata.version("gift")
    except importlib.metadata.PackageNotFoundError:
        gift_version = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"gift {gift_version} triton {triton_version}"


def cuda_timer(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median seconds of ``fn`` on the current CUDA stream (after one warm-up call, which compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measured_choice(device_name: str, op: str, key: str, candidates: dict[str, Callable[[], object]],
                    timer: Callable[[Callable[[], object]], float] | None = None, path: Path | None = None) -> str:
    """The fastest of ``candidates`` (backend name -> a call of the op) for ``op`` at ``key`` on ``device_name``:
    timed once with ``timer`` (default `cuda_timer`), then read back from the JSON cache at ``path``
    (default `choices_path`). Entries are keyed by device, op, key and `code_version`."""
    path = path or choices_path()
    data = _load_choices(path)
    entry = f"{device_name} | {op} | {key} | {code_version()}"
    known = data.get(entry)
    if isinstance(known, dict) and known.get("backend") in candidates:
        return known["backend"]
    timer = timer or cuda_timer
    seconds = {name: float(timer(fn)) for name, fn in candidates.items()}
    best = min(seconds, key=seconds.get)
    data[entry] = {"backend": best, "seconds": seconds}
    _save_choices(path, data)
    return best
