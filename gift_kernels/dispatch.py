"""The one place that decides whether an op runs its Triton kernels or its torch path: the backend.

An op's ``backend=`` argument, else ``GIFT_BACKEND=auto|torch|triton``, else ``GIFT_KERNELS`` (the variable's
old name, still read), else ``auto``:
  * ``auto``: on CUDA tensors (float32/float16/bfloat16) where the Triton kernels can take the call, the backend
    `verified_choice` settled for this op, shape bucket, dtype, device and code: on the first such call it runs
    the Triton kernels and the torch path on that call's inputs, forward and backward, and checks the Triton
    results against the float64 torch path under the tolerance table (`agreement`). Any exception (a compile
    error, ``OutOfResources``, a failed launch) or disagreement means the torch path, with one warning naming
    the reason; the residual projection also times both and takes Triton only if it agrees and is faster.
    The verdict is kept for the process and in ``~/.cache/gift/kernels.json``; under ``torch.compile`` or
    CUDA-graph capture nothing is verified (a verdict already made holds, else the torch path). The torch path
    otherwise (CPU tensors, float64). With ``GIFT_AUTO_ON_INTERPRETER=1``, CPU tensors under
    ``TRITON_INTERPRET=1`` are treated as CUDA ones are: how the tests run auto's logic without a GPU.
  * ``torch``: always the torch path.
  * ``triton``: the Triton kernels, unverified, on CUDA or on CPU tensors under ``TRITON_INTERPRET=1``;
    where they cannot run (no CUDA and no interpreter, float64) a ``RuntimeError`` says why.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import tempfile
import time
import warnings
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
AUTO_ON_INTERPRETER_ENV = "GIFT_AUTO_ON_INTERPRETER"  # "1": auto treats CPU tensors under the interpreter as CUDA
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


def auto_runs_triton_on(device: torch.device) -> bool:
    """Whether ``auto`` considers the Triton kernels for tensors on ``device``: CUDA, or CPU under the interpreter
    with ``GIFT_AUTO_ON_INTERPRETER=1``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled() and os.environ.get(AUTO_ON_INTERPRETER_ENV, "0") == "1"


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
        if not torch.cuda.is_available():
            return "CUDA is not available here"
        if torch.cuda.get_device_capability(device)[0] < 8:
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
    ``auto`` returns what ``auto`` picks where Triton could run (`auto_runs_triton_on`; default: Triton); the ops
    pass one that goes through `verified_choice`.
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
    if why is not None or not auto_runs_triton_on(device):
        return "torch"
    return auto() if auto is not None else "triton"


def active_backend(device: torch.device | str | None = None, backend: str | None = None) -> str:
    """What ops on float32 tensors of ``device`` (default: CUDA if present, else CPU) may run: under ``auto``,
    ``"triton"`` means each op verifies its kernels on first use and may still take the torch path."""
    return resolve_backend(_default_device(device), torch.float32, backend)


# ------------------------------------------------------------------------------ verified per-device choices
CACHE_ENV = "GIFT_KERNELS_CACHE"
_CHOICES: dict[str, dict] = {}           # path -> {entry: {"backend": name, "reason": why not Triton, "seconds": ...}}


def choices_path() -> Path:
    """``$GIFT_KERNELS_CACHE`` or ``~/.cache/gift/kernels.json``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gift" / "kernels.json")


def _load_choices(path: Path) -> dict:
    key = str(path)
    if key not in _CHOICES:
        _CHOICES[key] = _read_choices(path)   # unreadable: verified again and rewritten
    return _CHOICES[key]


def _read_choices(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):             # missing or unreadable: nothing to keep
        return {}
    return data if isinstance(data, dict) else {}


def _save_choices(path: Path, data: dict) -> None:
    """Merges ``data`` into the file at ``path`` (re-read under an exclusive lock on ``path.lock``, so that
    processes verifying at once keep each other's entries) and replaces it atomically (written, flushed and
    synced to a temporary file first, which is removed if that fails); ``data`` gets the file's other entries."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes
            merged = {**_read_choices(path), **data}
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        data.update(merged)
    except OSError:
        pass                                  # a read-only home: the choice still holds for this process


# every file a verdict depends on: the kernels and their launch policy, the ops and their first-use checks, the
# torch paths the kernels are compared with, the agreement rule, and this module
VERDICT_SOURCES = ("paca_triton.py", "residual_triton.py", "launch.py", "paca.py", "residual.py", "paca_math.py",
                   "agreement.py", "dispatch.py")


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The gift, Triton, torch and CUDA versions and a hash of `VERDICT_SOURCES` (the kernels, the checks, the torch
    paths, the tolerances): a verdict holds for the code that was verified, also under an editable install."""
    try:
        gift_version = importlib.metadata.version("gift")
    except importlib.metadata.PackageNotFoundError:
        gift_version = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in VERDICT_SOURCES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return (f"gift {gift_version} triton {triton_version} torch {torch.__version__} cuda {torch.version.cuda} "
            f"kernels {digest.hexdigest()[:12]}")


def device_identity(device: torch.device) -> str:
    """What a verdict is keyed by besides the code: the GPU's name, compute capability and SM count (a MIG slice
    reports its parent's name), or the interpreter."""
    if device.type != "cuda":
        return f"{device.type} (Triton interpreter)"
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs"


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


def cpu_timer(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of ``fn`` on the CPU (after one warm-up call): auto's timer for CPU tensors under the
    interpreter, where only the tests ask for one."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_DECIDED: dict[str, str] = {}            # verdict entry -> backend, for this process
_WARNED: set[str] = set()                # entries whose torch-path verdict this process has warned about
_IDENTITIES: dict[tuple, tuple[str, str]] = {}   # (device type, index) -> (device_identity, code_version)


def _capturing_or_compiling() -> bool:
    """Compiling, capturing a CUDA graph, or under a Python dispatch mode (fake tensors, selective activation
    checkpointing, a FLOP counter...): a first-use check would run on what that mode makes of it, and be seen by it."""
    return (torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
            or torch._C._len_torch_dispatch_stack() > 0)


def _entry(device: torch.device, op: str, key: str) -> str | None:
    """The verdict's key; None while compiling or capturing if this process has not computed the device's part
    yet (it needs the device's properties and a hash of the kernel files)."""
    where = (device.type, device.index if device.index is not None else
             (torch.cuda.current_device() if device.type == "cuda" else None))
    ident = _IDENTITIES.get(where)
    if ident is None:
        if _capturing_or_compiling():
            return None
        ident = _IDENTITIES[where] = (device_identity(device), code_version())
    return f"{ident[0]} | {op} | {key} | {ident[1]}"


def _warn_torch_path(op: str, entry: str, reason: str, path: Path) -> None:
    if entry not in _WARNED:
        _WARNED.add(entry)
        warnings.warn(f"{op}: the Triton kernels failed their first-use check ({reason}); using the torch path. "
                      f"The verdict is kept in {path} (delete the entry to check again; {BACKEND_ENV}=triton forces "
                      f"Triton).", RuntimeWarning, stacklevel=4)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _usable_outside_inference_mode(value):
    """``value`` with every inference tensor in it (also inside tuples, lists and named tuples) replaced by a copy of
    the same strides that autograd may record and save (made with inference mode off); other tensors as they are."""
    if isinstance(value, torch.Tensor):
        if not value.is_inference():
            return value
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device).copy_(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_usable_outside_inference_mode(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_usable_outside_inference_mode(v) for v in value)
    return value


def _isolated(fn: Callable[[], object]) -> object:
    """``fn()`` out of the caller's autograd context, so that a first-use check neither sees nor touches it: inference
    mode off and grad on (``fn``'s tensor arguments, if it is a ``functools.partial``, cloned where they are inference
    tensors), and identity saved-tensor hooks innermost, so that an enclosing non-reentrant
    ``torch.utils.checkpoint`` (or any other pack/unpack hooks) neither counts nor recomputes what the check saves."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        if isinstance(fn, functools.partial):
            fn = functools.partial(fn.func, *_usable_outside_inference_mode(fn.args),
                                   **{k: _usable_outside_inference_mode(v) for k, v in fn.keywords.items()})
        return fn()


class _Saves(torch.autograd.Function):
    """``2 x`` with x saved for backward: the probe of `_context_allows_a_check`."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * 2 + 0 * x


def _context_allows_a_check() -> str | None:
    """None if a small autograd round trip (a saved tensor, a backward) runs in `_isolated` here, else why not: then
    an exception of the first-use check is the calling context's, not the kernel's. On CPU: a kernel that faults
    on a GPU poisons that GPU's context, and the fault must stay the kernel's (cached, warned)."""
    def probe():
        x = torch.ones(2, requires_grad=True)
        torch.autograd.grad(_Saves.apply(x).sum(), x)

    try:
        _isolated(probe)
    except Exception as e:  # noqa: BLE001  (whatever the context makes autograd raise)
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def verified_choice(op: str, key: str, device: torch.device, verify: Callable[[], str | None],
                    timed: Callable[[], dict[str, Callable[[], object]]] | None = None,
                    timer: Callable[[Callable[[], object]], float] | None = None, path: Path | None = None) -> str:
    """``"triton"`` or ``"torch"`` for ``op`` at ``key`` (its shape bucket and dtype: built from shapes alone, so
    that nothing is computed before the lookup) on ``device``; see the module docstring.

    The verdict is looked up first: in this process, then in the JSON cache at ``path`` (default `choices_path`), by
    `device_identity`, op, key and `code_version`. Without one (and not while compiling or capturing a CUDA graph,
    or under a dispatch mode, which get the torch path), ``verify()`` runs: ``None`` when the Triton kernels agree
    with the torch path on this call's inputs, else the reason they do not (an exception it raises counts as the
    reason too, unless the calling context is to blame: `_context_allows_a_check`; then this call gets the torch
    path and nothing is decided). The check and the timing run apart from the caller's autograd context
    (`_isolated`: an enclosing checkpoint, inference mode or no_grad neither sees them nor changes them).
    If they agree and ``timed`` is given, it returns {backend name: a call of the op}, each is timed with
    ``timer`` (default `cuda_timer`, `cpu_timer` on CPU) and the fastest that ran wins. A torch-path verdict
    warns once per process."""
    entry = _entry(device, op, key)
    if entry is None:
        return "torch"
    if entry in _DECIDED:
        return _DECIDED[entry]
    if _capturing_or_compiling():
        return "torch"
    path = path or choices_path()
    data = _load_choices(path)
    known = data.get(entry)
    if isinstance(known, dict) and known.get("backend") in ("torch", "triton"):
        _DECIDED[entry] = known["backend"]
        if known.get("reason"):
            _warn_torch_path(op, entry, known["reason"], path)
        return known["backend"]
    try:
        reason = _isolated(verify)
    except Exception as e:  # noqa: BLE001  (whatever the first use raises, the torch path is the answer)
        if _context_allows_a_check() is not None:
            return "torch"                    # the calling context's failure, not the kernel's: nothing is decided
        reason = _reason(e)
    seconds: dict[str, float] = {}
    backend = "torch" if reason else "triton"
    if reason is None and timed:
        timer = timer or (cuda_timer if device.type == "cuda" else cpu_timer)
        for name, fn in _isolated(timed).items():
            try:
                seconds[name] = float(_isolated(functools.partial(timer, fn)))
            except Exception as e:  # noqa: BLE001
                seconds[name] = math.inf
                if name == "triton":
                    reason = f"timing it raised {_reason(e)}"
        backend = min(seconds, key=seconds.get)
    record = {"backend": backend, "reason": reason, "seconds": seconds}
    _DECIDED[entry], data[entry] = backend, record
    _save_choices(path, data)
    if reason:
        _warn_torch_path(op, entry, reason, path)
    return backend
