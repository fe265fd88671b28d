"""The dispatch point (dispatch.py): what each backend request resolves to, and `auto` picking only what was
measured: the residual projection's per-device timing cache, on CPU with fake timers."""
import json
import multiprocessing

import pytest
import torch

import gift_kernels
from gift_kernels import dispatch, residual
from gift_kernels.testing import residual_case


def test_dispatch_point(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only decisions")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("GIFT_BACKEND", raising=False)      # GIFT_KERNELS, the old name, decides here
    monkeypatch.setenv("GIFT_KERNELS", "torch")
    assert gift_kernels.active_backend("cpu") == "torch"
    monkeypatch.setenv("GIFT_KERNELS", "auto")
    assert gift_kernels.active_backend("cpu") == "torch"  # auto: torch on CPU, even with the interpreter
    monkeypatch.setenv("GIFT_KERNELS", "triton")
    assert gift_kernels.active_backend("cpu") == "triton"  # TRITON_INTERPRET=1 in this suite
    with pytest.raises(RuntimeError, match="GIFT_BACKEND=triton was asked for, but the Triton kernels take"):
        gift_kernels.resolve_backend(torch.device("cpu"), torch.float64, op="paca_attention")
    assert gift_kernels.resolve_backend(torch.device("cpu"), torch.float64, backend="auto") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensors need TRITON_INTERPRET=1"):
        gift_kernels.resolve_backend(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("GIFT_KERNELS", "fast")
    with pytest.raises(ValueError, match="GIFT_KERNELS='fast' is unknown"):
        gift_kernels.active_backend("cpu")


def test_gift_backend_is_read_before_its_old_name_and_backend_argument_before_both(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GIFT_KERNELS", "triton")
    monkeypatch.setenv("GIFT_BACKEND", "torch")
    assert dispatch.requested_backend() == "torch" and gift_kernels.active_backend("cpu") == "torch"
    assert dispatch.requested_backend("triton") == "triton"
    monkeypatch.setenv("GIFT_BACKEND", "")                 # empty: unset
    assert dispatch.requested_backend() == "triton"
    monkeypatch.delenv("GIFT_KERNELS")
    assert dispatch.requested_backend() == "auto"
    monkeypatch.setenv("GIFT_BACKEND", "Triton ")
    assert gift_kernels.resolve_backend(cpu, torch.float32) == "triton"
    with pytest.raises(RuntimeError, match="Use GIFT_BACKEND=auto or torch"):
        gift_kernels.resolve_backend(cpu, torch.float64)
    monkeypatch.setenv("GIFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"^GIFT_BACKEND='cuda' is unknown; choose one of \('auto', 'torch',"):
        dispatch.requested_backend()
    with pytest.raises(ValueError, match="^backend='fast' is unknown"):
        dispatch.requested_backend("fast")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "gift" / "kernels.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    return path


class FakeTimer:
    """Seconds per candidate function name; records what was timed."""

    def __init__(self, seconds):
        self.seconds, self.timed = seconds, []

    def __call__(self, fn):
        self.timed.append(fn.__name__)
        return self.seconds[fn.__name__]


def _candidates():
    def torch_path(): ...

    def triton_path(): ...

    return {"torch": torch_path, "triton": triton_path}


def test_measured_choice_times_once_per_device_and_key_and_persists(cache):
    candidates = _candidates()
    timer = FakeTimer({"torch_path": 2.0, "triton_path": 1.0})
    assert dispatch.measured_choice("H200", "op", "k1", candidates, timer=timer) == "triton"
    assert dispatch.measured_choice("H200", "op", "k1", candidates, timer=timer) == "triton"
    assert timer.timed == ["torch_path", "triton_path"]                      # measured once
    slow_triton = FakeTimer({"torch_path": 1.0, "triton_path": 3.0})
    assert dispatch.measured_choice("A100", "op", "k1", candidates, timer=slow_triton) == "torch"
    assert dispatch.measured_choice("H200", "op", "k2", candidates, timer=slow_triton) == "torch"
    saved, version = json.loads(cache.read_text()), dispatch.code_version()
    assert saved[f"H200 | op | k1 | {version}"] == {"backend": "triton", "seconds": {"torch": 2.0, "triton": 1.0}}
    assert saved[f"A100 | op | k1 | {version}"]["backend"] == "torch"
    dispatch._CHOICES.clear()                                                 # a new process reads the file
    never = FakeTimer({})
    assert dispatch.measured_choice("H200", "op", "k1", candidates, timer=never) == "triton" and not never.timed


def test_unreadable_cache_is_measured_again_and_rewritten(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    candidates = _candidates()
    assert dispatch.measured_choice("H200", "op", "k", candidates,
                                    timer=FakeTimer({"torch_path": 1.0, "triton_path": 2.0})) == "torch"
    assert json.loads(cache.read_text())[f"H200 | op | k | {dispatch.code_version()}"]["backend"] == "torch"


def test_cached_choice_is_keyed_by_gift_and_triton_versions(cache, monkeypatch):
    candidates = _candidates()
    assert dispatch.measured_choice("H200", "op", "k", candidates, timer=FakeTimer({"torch_path": 1.0,
                                                                                    "triton_path": 2.0})) == "torch"
    assert dispatch.code_version().startswith("gift ") and " triton " in dispatch.code_version()
    monkeypatch.setattr(dispatch, "code_version", lambda: "gift 9.9 triton 9.9")    # upgraded code: measured again
    timer = FakeTimer({"torch_path": 2.0, "triton_path": 1.0})
    assert dispatch.measured_choice("H200", "op", "k", candidates, timer=timer) == "triton" and len(timer.timed) == 2
    assert len(json.loads(cache.read_text())) == 2


def test_two_writers_that_loaded_the_cache_before_either_saved_keep_both_entries(cache):
    """Processes A and B both read the (empty) cache, then each measures its own key and saves."""
    views = []
    for _ in range(2):                        # what each process loaded
        dispatch._load_choices(cache)
        views.append(dispatch._CHOICES.pop(str(cache)))
    for view, key in zip(views, ("keyA", "keyB")):
        dispatch._CHOICES[str(cache)] = view
        dispatch.measured_choice("H200", "op", key, _candidates(), timer=FakeTimer({"torch_path": 1.0,
                                                                                    "triton_path": 2.0}))
    version = dispatch.code_version()
    assert sorted(json.loads(cache.read_text())) == [f"H200 | op | keyA | {version}", f"H200 | op | keyB | {version}"]
    assert f"H200 | op | keyA | {version}" in views[1]           # B's process now knows A's entry too


def _write_keys(path, prefix):
    dispatch._CHOICES.clear()
    for i in range(15):
        dispatch.measured_choice("H200", "op", f"{prefix}{i}", {"torch": None}, timer=lambda fn: 1.0, path=path)


def test_two_processes_writing_at_once_keep_every_entry(cache):
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_keys, args=(cache, prefix)) for prefix in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert len(json.loads(cache.read_text())) == 30


def test_auto_asks_the_op_on_cuda_only_and_env_forces(monkeypatch):
    monkeypatch.delenv("GIFT_BACKEND", raising=False)
    monkeypatch.delenv("GIFT_KERNELS", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    asked = []

    def auto():
        asked.append(1)
        return "torch"

    assert dispatch.resolve_backend(cuda, torch.float16, auto=auto) == "torch" and asked == [1]
    assert dispatch.resolve_backend(cuda, torch.float16) == "triton"              # PaCa: Triton on CUDA
    assert dispatch.resolve_backend(cpu, torch.float32, auto=auto) == "torch" and asked == [1]
    monkeypatch.setenv("GIFT_BACKEND", "triton")
    assert dispatch.resolve_backend(cuda, torch.float16, auto=auto) == "triton" and asked == [1]
    monkeypatch.setenv("GIFT_BACKEND", "torch")
    assert dispatch.resolve_backend(cuda, torch.float16, auto=auto) == "torch" and asked == [1]


@pytest.mark.skipif(not gift_kernels.triton_available("cpu"), reason="needs TRITON_INTERPRET=1")
def test_residual_auto_times_both_backends_on_the_real_call(cache, monkeypatch):
    """The residual op's auto choice: both candidates run (the Triton one under the interpreter) and the
    faster by the (fake) timer is cached under the device name, shape and dtype."""
    ran = []

    def fake_timer(fn):
        fn()
        ran.append(fn.func.__name__)
        return {"matmul_lowrank_torch": 5.0, "matmul_lowrank_epilogue": 4.0}[fn.func.__name__]

    monkeypatch.setattr(dispatch, "cuda_timer", fake_timer)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    x, w, b, psi, tokens, _ = (v.float() if v is not None else None for v in residual_case((20, 24, 40, 8)))
    assert residual._measured_backend(x, w, b, psi, tokens) == "triton"
    assert ran == ["matmul_lowrank_torch", "matmul_lowrank_epilogue"]
    (entry, value), = json.loads(cache.read_text()).items()
    assert entry == ("Fake GPU | lowrank_residual_linear | rows<=64 d_in=24 d_out=40 r=8 torch.float32 bias=True | "
                     + dispatch.code_version())
    assert value["backend"] == "triton"
    assert residual._measured_backend(x, w, b, psi, tokens) == "triton" and len(ran) == 2
