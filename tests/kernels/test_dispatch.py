"""The dispatch point (dispatch.py): what each backend request resolves to, and `auto` taking Triton only where
its first-use check passed: `verified_choice` with fake checks and timers, and both ops under ``auto`` on CPU
tensors under the interpreter (``GIFT_AUTO_ON_INTERPRETER=1``) with real kernels, a kernel that raises and a
kernel that returns a wrong answer (mutated from its source)."""
import json
import multiprocessing
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gift_kernels
from gift_kernels import PacaParams, dispatch, residual
from gift_kernels.testing import available_devices, paca_case, paca_saved_state_reference, residual_case
from tests.kernels.kernel_mutations import Edit, mutated


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
    """A fresh verdict cache file and a process that has decided nothing yet."""
    path = tmp_path / "gift" / "kernels.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    for name in ("_CHOICES", "_DECIDED", "_IDENTITIES"):
        monkeypatch.setattr(dispatch, name, {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    return path


def _new_process():
    """What a new process knows: nothing but the file."""
    for table in (dispatch._CHOICES, dispatch._DECIDED, dispatch._WARNED):
        table.clear()


class Calls:
    """Fake first-use checks and timers that record what ran."""

    def __init__(self, reason=None, seconds=None, raises=None):
        self.reason, self.seconds, self.raises, self.ran = reason, seconds or {}, raises, []

    def verify(self):
        self.ran.append("verify")
        if self.raises:
            raise self.raises
        return self.reason

    def timed(self):
        self.ran.append("timed")
        return {name: name for name in self.seconds}

    def timer(self, name):
        self.ran.append(name)
        if self.seconds[name] is None:
            raise RuntimeError(f"{name} failed to launch")
        return self.seconds[name]


CPU = torch.device("cpu")


def _choose(calls, key="k1", device=CPU, timed=True):
    return dispatch.verified_choice("op", key, device, calls.verify, calls.timed if timed else None, calls.timer)


def _entry(key="k1", op="op"):
    return f"{dispatch.device_identity(CPU)} | {op} | {key} | {dispatch.code_version()}"


def test_verified_choice_checks_and_times_once_per_key_and_persists(cache):
    calls = Calls(seconds={"torch": 2.0, "triton": 1.0})
    assert _choose(calls) == "triton" and _choose(calls) == "triton"
    assert calls.ran == ["verify", "timed", "torch", "triton"]                   # once
    slow = Calls(seconds={"torch": 1.0, "triton": 3.0})
    assert _choose(slow, "k2") == "torch"
    saved = json.loads(cache.read_text())
    assert saved[_entry()] == {"backend": "triton", "reason": None, "seconds": {"torch": 2.0, "triton": 1.0}}
    assert saved[_entry("k2")]["backend"] == "torch" and saved[_entry("k2")]["reason"] is None
    _new_process()
    never = Calls()
    assert _choose(never) == "triton" and _choose(never, "k2") == "torch" and never.ran == []


def test_without_timing_an_agreeing_kernel_is_chosen(cache):
    calls = Calls()
    assert _choose(calls, timed=False) == "triton" and calls.ran == ["verify"]


@pytest.mark.parametrize("calls,named", [
    (Calls(raises=RuntimeError("OutOfResources: shared memory, Required: 200000\nmore")), "OutOfResources"),
    (Calls(reason="it disagrees with the float64 torch path: output: abs 1e-1 > 1e-5"), "disagrees"),
    (Calls(seconds={"torch": 1.0, "triton": None}), "timing it raised RuntimeError: triton failed to launch"),
], ids=["raises", "disagrees", "timing-raises"])
def test_a_kernel_that_fails_its_check_gets_the_torch_path_one_warning_and_a_cached_reason(cache, calls, named):
    with pytest.warns(RuntimeWarning, match=named) as caught:
        assert _choose(calls) == "torch"
    assert len(caught) == 1 and "using the torch path" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _choose(calls) == "torch"                                        # decided: no second warning
    assert calls.ran.count("verify") == 1
    record = json.loads(cache.read_text())[_entry()]
    assert record["backend"] == "torch" and named.split(":")[0] in record["reason"]
    _new_process()                                                              # a new process warns once too
    with pytest.warns(RuntimeWarning, match=named):
        assert _choose(Calls()) == "torch"


def test_nothing_is_checked_while_compiling_or_capturing(cache, monkeypatch):
    assert _choose(Calls(seconds={"torch": 2.0, "triton": 1.0}), "decided") == "triton"
    monkeypatch.setattr(dispatch, "_capturing_or_compiling", lambda: True)
    calls = Calls(seconds={"torch": 2.0, "triton": 1.0})
    assert _choose(calls) == "torch" and calls.ran == []                         # undecided: the torch path
    assert _choose(calls, "decided") == "triton" and calls.ran == []             # decided: the verdict holds
    monkeypatch.setattr(dispatch, "_IDENTITIES", {})                             # device not yet described
    assert _choose(calls, "decided") == "torch" and calls.ran == []


def test_unreadable_cache_is_checked_again_and_rewritten(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert _choose(Calls(seconds={"torch": 1.0, "triton": 2.0})) == "torch"
    assert json.loads(cache.read_text())[_entry()]["backend"] == "torch"


def test_verdicts_are_keyed_by_the_code_and_the_device(cache, monkeypatch):
    assert _choose(Calls(seconds={"torch": 1.0, "triton": 2.0})) == "torch"
    version = dispatch.code_version()
    assert all(part in version for part in ("gift ", " triton ", " torch ", " cuda ", " kernels "))
    _new_process()
    monkeypatch.setattr(dispatch, "_IDENTITIES", {})
    monkeypatch.setattr(dispatch, "code_version", lambda: "gift 9.9 edited kernels")   # edited code: checked again
    calls = Calls(seconds={"torch": 2.0, "triton": 1.0})
    assert _choose(calls) == "triton" and calls.ran[0] == "verify"
    monkeypatch.setattr(dispatch, "_IDENTITIES", {})
    monkeypatch.setattr(dispatch, "device_identity", lambda device: "Other GPU sm_90 132 SMs")
    assert _choose(calls) == "triton" and calls.ran.count("verify") == 2
    assert len(json.loads(cache.read_text())) == 3


@pytest.mark.parametrize("edited", ["paca_triton.py", "residual_triton.py", "launch.py", "paca.py", "residual.py",
                                    "paca_math.py", "agreement.py", "dispatch.py"])
def test_the_code_version_changes_with_every_file_a_verdict_depends_on(monkeypatch, edited):
    """The kernels, the first-use checks and their operands, the torch paths, the tolerances and the dispatch."""
    dispatch.code_version.cache_clear()
    before = dispatch.code_version()
    dispatch.code_version.cache_clear()
    real_read = dispatch.Path.read_bytes
    monkeypatch.setattr(dispatch.Path, "read_bytes", lambda self: real_read(self) + (b"#" if
                                                                                   self.name == edited else b""))
    try:
        assert dispatch.code_version() != before
    finally:
        dispatch.code_version.cache_clear()


def test_two_writers_that_loaded_the_cache_before_either_saved_keep_both_entries(cache):
    """Processes A and B both read the (empty) cache, then each checks its own key and saves."""
    views = []
    for _ in range(2):                        # what each process loaded
        dispatch._load_choices(cache)
        views.append(dispatch._CHOICES.pop(str(cache)))
    for view, key in zip(views, ("keyA", "keyB")):
        dispatch._CHOICES[str(cache)] = view
        _choose(Calls(seconds={"torch": 1.0, "triton": 2.0}), key)
    assert sorted(json.loads(cache.read_text())) == sorted([_entry("keyA"), _entry("keyB")])
    assert _entry("keyA") in views[1]                            # B's process now knows A's entry too


def _write_keys(path, prefix):
    _new_process()
    for i in range(15):
        dispatch.verified_choice("op", f"{prefix}{i}", CPU, lambda: None, path=path)


def test_two_processes_writing_at_once_keep_every_entry(cache):
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_keys, args=(cache, prefix)) for prefix in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert len(json.loads(cache.read_text())) == 30


def test_triton_is_not_available_on_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    assert not gift_kernels.triton_available("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available here"):
        gift_kernels.resolve_backend(torch.device("cuda"), torch.float32, backend="triton")


def test_auto_asks_the_op_where_triton_may_run_and_env_forces(monkeypatch):
    for name in ("GIFT_BACKEND", "GIFT_KERNELS", dispatch.AUTO_ON_INTERPRETER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "_why_not_triton", lambda device, dtype: None)    # as if on a GPU
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    asked = []

    def auto():
        asked.append(1)
        return "torch"

    assert dispatch.resolve_backend(cuda, torch.float16, auto=auto) == "torch" and asked == [1]
    assert dispatch.resolve_backend(cuda, torch.float16) == "triton"              # no check given: Triton
    assert dispatch.resolve_backend(cpu, torch.float32, auto=auto) == "torch" and asked == [1]
    monkeypatch.setenv(dispatch.AUTO_ON_INTERPRETER_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend(cpu, torch.float32, auto=auto) == "torch" and asked == [1, 1]
    monkeypatch.setenv("GIFT_BACKEND", "triton")
    assert dispatch.resolve_backend(cuda, torch.float16, auto=auto) == "triton" and asked == [1, 1]
    monkeypatch.setenv("GIFT_BACKEND", "torch")
    assert dispatch.resolve_backend(cuda, torch.float16, auto=auto) == "torch" and asked == [1, 1]


# ------------------------------------------------------ both ops under auto: on CUDA, and on CPU under the interpreter
PACA_SHAPE = (2, 37, 5, 24, 3)                 # (L, N, M, r, heads)
RESIDUAL_SHAPE = (20, 24, 40, 8)               # (rows, d_in, d_out, r)
DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def auto_on(request, cache, monkeypatch):
    """The device, with ``auto`` where Triton may run (on CPU: under the interpreter, GIFT_AUTO_ON_INTERPRETER=1) and
    a fresh verdict cache."""
    if request.param == "cpu":
        if not gift_kernels.triton_available("cpu"):
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
        monkeypatch.setenv(dispatch.AUTO_ON_INTERPRETER_ENV, "1")
    monkeypatch.setenv("GIFT_BACKEND", "auto")
    return torch.device(request.param)


def _paca_call(device, backend=None):
    t, params, grad = paca_case(PACA_SHAPE, seed=2)
    leaves = [x.to(device, torch.float32).requires_grad_(True) for x in (t, *params)]
    out = gift_kernels.paca_attention(leaves[0], PacaParams(*leaves[1:]), PACA_SHAPE[4], backend=backend)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(device, torch.float32))]


def _residual_call(device, backend=None):
    x, w, b, psi, tokens, grad = (v.to(device, torch.float32) for v in residual_case(RESIDUAL_SHAPE))
    x, psi, tokens = (v.requires_grad_(True) for v in (x, psi, tokens))
    out = gift_kernels.lowrank_residual_linear(x, w, b, psi, tokens, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, [x, psi, tokens], grad)]


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def _close(a, b):
    return all(torch.allclose(u, v, rtol=1e-4, atol=1e-5) for u, v in zip(a, b))


def _raise_out_of_resources(*args, **kwargs):
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(200000, 166912, "shared memory")


# a wrong PaCa kernel: the backward's dVp partials 10% short (d_proj_w, d_v_w, d_t... wrong)
WRONG_PACA = Edit("_paca_attn_bwd", "dvp += _dot(tl.trans(a), g, F32_DOT)",
                  "dvp += 0.9 * _dot(tl.trans(a), g, F32_DOT)")
RESIDUAL_DOT = "acc += tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision=F32_DOT)"
WRONG_RESIDUAL = Edit("_matmul_lowrank_epilogue", RESIDUAL_DOT, RESIDUAL_DOT.replace("+= ", "+= 0.9 * "))


def test_paca_auto_takes_agreeing_triton_kernels(auto_on):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _paca_call(auto_on)
    assert list(dispatch._DECIDED.values()) == ["triton"]
    assert _same(got, _paca_call(auto_on, "triton")) and not _same(got, _paca_call(auto_on, "torch"))


def test_paca_forced_triton_runs_a_wrong_kernel_unchecked(auto_on):
    paca_triton = pytest.importorskip("gift_kernels.paca_triton")
    with mutated(paca_triton, [WRONG_PACA]):
        forced = _paca_call(auto_on, "triton")
    assert not _close(forced, _paca_call(auto_on, "torch")) and dispatch._DECIDED == {}


def test_residual_auto_checks_times_and_caches_the_faster_agreeing_backend(auto_on, monkeypatch):
    timed = []

    def fake_timer(fn):
        timed.append(fn.func.__name__)
        return {"matmul_lowrank_torch": 5.0, "matmul_lowrank_epilogue": 4.0}[fn.func.__name__]

    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer", fake_timer)
    got = _residual_call(auto_on)
    assert timed == ["matmul_lowrank_torch", "matmul_lowrank_epilogue"]
    (entry, value), = json.loads(dispatch.choices_path().read_text()).items()
    assert entry == (f"{dispatch.device_identity(auto_on)} | lowrank_residual_linear | rows<=64 d_in=24 d_out=40 r=8 "
                     f"torch.float32 gift=torch.float32 bias=True even_m=False x=row-major w=row-major "
                     f"matmul={torch.get_float32_matmul_precision()} | "
                     f"{dispatch.code_version()}")
    assert value == {"backend": "triton", "reason": None, "seconds": {"torch": 5.0, "triton": 4.0}}
    assert _same(got, _residual_call(auto_on, "triton"))


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_residual_auto_looks_its_verdict_up_before_any_work(auto_on, monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer", lambda fn: 1.0)
    x, w, b, psi, tokens, _ = (v.to(auto_on, torch.float32) for v in residual_case(RESIDUAL_SHAPE))
    assert residual._verified_backend(x, w, b, psi, tokens) in ("torch", "triton")
    with AtenOps() as mode:
        residual._verified_backend(x, w, b, psi, tokens)
    assert mode.ops == []                     # no x @ psi, no casts: shapes only


# per op: its Triton module, a wrong kernel (an edit), the launcher a raising kernel replaces, a call of the op, and
# the start of the warning's reason for the wrong kernel
FAILING = {"paca_attention": ("gift_kernels.paca_triton", WRONG_PACA, "paca_triton_forward", _paca_call,
                              "disagrees with the float64 torch path: "),
           "lowrank_residual_linear": ("gift_kernels.residual_triton", WRONG_RESIDUAL, "matmul_lowrank_epilogue",
                                       _residual_call, "disagrees with the float64 torch path: output")}


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
@pytest.mark.parametrize("op", sorted(FAILING))
def test_auto_with_a_failing_kernel_gives_the_torch_path_and_one_warning(auto_on, monkeypatch, op, failure):
    module_name, wrong, launcher, call, disagrees = FAILING[op]
    module = pytest.importorskip(module_name)
    with mutated(module, [wrong] if failure == "disagrees" else []):
        if failure == "raises":
            monkeypatch.setattr(module, launcher, _raise_out_of_resources)
        with pytest.warns(RuntimeWarning) as caught:
            first, second = call(auto_on), call(auto_on)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith(f"{op}: the Triton kernels failed their first-use check")
    assert ("OutOfResources: out of resource: shared memory" if failure == "raises" else disagrees) in message
    torch_path = call(auto_on, "torch")
    assert _same(first, torch_path) and _same(second, torch_path)
    assert list(dispatch._DECIDED.values()) == ["torch"]


def _residual_auto_then_torch(device, x, w, b, psi, tokens):
    """Output and gradients of ``auto`` on the call, and of the torch path, with the warnings auto gave."""
    def run(backend=None):
        leaves = [v.detach().to(device, torch.float32).requires_grad_(True) for v in (x, psi, tokens)]
        out = gift_kernels.lowrank_residual_linear(leaves[0], w.to(device, torch.float32),
                                                   b.to(device, torch.float32), leaves[1], leaves[2],
                                                   backend=backend)
        gen = torch.Generator(device).manual_seed(3)
        return [out.detach(), *torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=gen,
                                                                            device=device))]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run()
    return got, run("torch"), [c for c in caught if issubclass(c.category, RuntimeWarning)]


# the epilogue's low-rank dot at half weight; and the masked store that never writes the last row
HALF_LOWRANK = Edit("_matmul_lowrank_epilogue", RESIDUAL_DOT, RESIDUAL_DOT.replace("+= ", "+= 0.5 * "))
MASKED_STORE = "tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))"
LAST_ROW_UNWRITTEN = Edit("_matmul_lowrank_epilogue", MASKED_STORE,
                          MASKED_STORE.replace("offs_m[:, None] < M)", "offs_m[:, None] < M - 1)"))


def test_residual_first_use_check_sees_the_low_rank_term_when_psi_is_zero(auto_on, monkeypatch):
    """GIFT starts from psi = 0 (its out-projection is zero-initialised): x psi = 0 hides the epilogue's low-rank
    work from a check on the call's own operands."""
    rt = pytest.importorskip("gift_kernels.residual_triton")
    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer", lambda fn: 1.0)
    x, w, b, _, tokens, _ = residual_case(RESIDUAL_SHAPE)
    psi = torch.zeros_like(residual_case(RESIDUAL_SHAPE)[3])
    with mutated(rt, [HALF_LOWRANK]):
        got, torch_path, caught = _residual_auto_then_torch(auto_on, x, w, b, psi, tokens)
        assert list(dispatch._DECIDED.values()) == ["torch"] and len(caught) == 1, [str(c.message) for c in caught]
        assert "disagrees with the float64 torch path" in str(caught[0].message)
        assert _same(got, torch_path)
        psi_later = residual_case(RESIDUAL_SHAPE)[3]      # after an optimizer step: the torch path still
        got, torch_path, caught = _residual_auto_then_torch(auto_on, x, w, b, psi_later, tokens)
    assert _same(got, torch_path) and caught == []


def test_residual_first_use_check_runs_the_calls_masked_row_tile(auto_on, monkeypatch):
    """A call whose rows do not fill whole row tiles (and d_in, d_out that do) takes the masked kernel (EVEN_M
    false) only for them; the check must compare that specialisation, also when the call has more than
    `residual.FIRST_USE_ROWS` rows."""
    rt = pytest.importorskip("gift_kernels.residual_triton")
    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer", lambda fn: 1.0)
    monkeypatch.setattr(residual, "FIRST_USE_ROWS", 32)       # keeps the interpreter quick; the rule is the same
    x, w, b, psi, tokens, _ = residual_case((70, 32, 32, 8))  # rows 140 > FIRST_USE_ROWS + BLOCK_M, 140 % 16 != 0
    with mutated(rt, [LAST_ROW_UNWRITTEN]):
        got, torch_path, caught = _residual_auto_then_torch(auto_on, x, w, b, psi, tokens)
    assert list(dispatch._DECIDED.values()) == ["torch"] and len(caught) == 1, [str(c.message) for c in caught]
    assert _same(got, torch_path)


@pytest.mark.parametrize("rows, block_m, checked", [(20, 16, 20), (4096 + 16, 16, 4112), (10_000, 16, 4096),
                                                    (10_007, 16, 4103), (12_608, 128, 4096 + 12_608 % 128)])
def test_first_use_rows_keep_the_calls_partial_row_tile(rows, block_m, checked):
    assert residual.first_use_rows(rows, block_m) == checked
    assert checked % block_m == rows % block_m and checked <= rows


def test_residual_first_use_check_runs_torch_at_full_fp32_precision(auto_on, monkeypatch):
    """TF32 in the check's fp32 baseline would widen its slack ~1000x: the check runs torch's fp32 matmuls at
    "highest" and gives the caller's setting back."""
    seen = []
    real = residual._outputs_and_grads

    def spy(*args):
        seen.append(torch.get_float32_matmul_precision())
        return real(*args)

    monkeypatch.setattr(residual, "_outputs_and_grads", spy)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        x, w, b, psi, tokens, _ = (v.to(auto_on, torch.float32) for v in residual_case(RESIDUAL_SHAPE))
        assert residual.first_use_check(x, w, b, psi, tokens) is None
        assert seen == ["highest"] * 3 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


# the project's own kernel mutations that a check on GIFT's initial near-uniform attention cannot see, with the
# dtype and shape where the test_paca checks need sharp attention or far-apart heads to see them
NEAR_UNIFORM_BLIND = [("bwd-lse-of-head-0", torch.float32, (2, 37, 8, 16, 2)),
                      ("bwd-softened", torch.float16, (1, 100, 64, 64, 1))]


@pytest.mark.parametrize("mutation, dtype, shape", NEAR_UNIFORM_BLIND, ids=lambda c: str(c))
def test_paca_first_use_check_sees_a_kernel_wrong_only_for_sharp_attention_or_far_apart_heads(auto_on, mutation,
                                                                                               dtype, shape):
    """A first call with GIFT's initial values (random inputs: near-uniform attention, heads' logits close) must
    still get the torch path and one warning: the check runs on operands whose attention is sharp and whose heads'
    logits lie far apart (`paca.first_use_operands`), not on the call's own."""
    from tests.kernels.test_paca import KERNEL_MUTATIONS

    paca_triton = pytest.importorskip("gift_kernels.paca_triton")
    t, params, grad = paca_case(shape, seed=2)

    def run(backend=None):
        leaves = [x.to(auto_on, dtype).requires_grad_(True) for x in (t, *params)]
        out = gift_kernels.paca_attention(leaves[0], PacaParams(*leaves[1:]), shape[4], backend=backend)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(auto_on, dtype))]

    with mutated(paca_triton, [KERNEL_MUTATIONS[mutation]]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run()
    assert list(dispatch._DECIDED.values()) == ["torch"], dispatch._DECIDED
    messages = [str(c.message) for c in caught if str(c.message).startswith("paca_attention:")]
    assert len(messages) == 1 and "disagrees with the float64 torch path" in messages[0], messages
    assert _same(got, run("torch"))


@pytest.mark.parametrize("shape", [(2, 37, 8, 16, 2), (1, 32, 5, 24, 3), (1, 1, 1, 8, 1)], ids=lambda s: str(s))
def test_paca_first_use_operands_give_sharp_attention_and_far_apart_heads(shape):
    """The operands are what `paca.first_use_operands` claims, in the call's shapes, dtype and device: attention
    mostly on one cluster (the call's own: near uniform), and each odd head's log-sum-exp above every even head's by
    more than fp32 exp's range (~88)."""
    from gift_kernels import paca, paca_math

    L, N, M, r, heads = shape
    t, params, _ = paca_case(shape)
    t, params = t.half(), PacaParams(*(x.half() for x in params))
    synthetic_t, synthetic = paca.first_use_operands(t, params, heads)
    assert synthetic_t.shape == t.shape and synthetic_t.dtype == t.dtype
    assert all(x.shape == p.shape and x.dtype == p.dtype for x, p in zip(synthetic, params))
    def logits(t, p):                                                                 # (L, N, heads, M)
        t, p = t.double(), PacaParams(*(x.double() for x in p))
        state = paca_saved_state_reference(t, p, heads)
        return (paca_math.l2(t)[0] @ state["kq"].transpose(-1, -2) + state["cq"][:, None]).unflatten(-1, (heads, M))

    def largest_probability(t, p):                                   # the median over tokens and heads
        return logits(t, p).softmax(-1).amax(-1).median().item()

    if M > 1:                   # the call's own near uniform (~1/M), the synthetic mostly on one cluster
        assert largest_probability(t, params) < 0.5 < 0.75 < largest_probability(synthetic_t, synthetic)
    lse = logits(synthetic_t, synthetic).logsumexp(-1)                                  # (L, N, heads)
    if heads > 1:
        assert (lse[..., 1::2].amin(-1) - lse[..., 0::2].amax(-1)).min() > 100


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", dispatch.TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 37, 8, 16, 2), (1, 48, 5, 24, 3), (1, 1, 1, 8, 1), (3, 7, 64, 24, 3)],
                         ids=lambda s: str(s))
def test_paca_first_use_check_passes_the_real_kernels(shape, device, dtype, activation, runnable):
    """No false alarm on the synthetic operands: the real kernels agree, on both sides of every mask (N = 48 a
    multiple of the interpreter's row tile), with one head and several."""
    runnable(device, "triton", dtype)
    from gift_kernels import paca

    t, params, _ = paca_case(shape, seed=2)
    t, params = t.to(device, dtype), PacaParams(*(x.to(device, dtype) for x in params))
    assert paca.first_use_check(t, params, shape[4], activation) is None


def _checkpointed(call):
    """``call`` run inside a non-reentrant ``torch.utils.checkpoint`` region (GIFT's memory="mlp"/"block", timm's grad
    checkpointing): the op's first use, and its first-use check, happen inside it."""
    def run(device, backend=None):
        return torch.utils.checkpoint.checkpoint(call, device, backend, use_reentrant=False)

    return run


@pytest.mark.parametrize("op", sorted(FAILING))
def test_a_first_use_inside_a_non_reentrant_checkpoint_is_checked_apart_from_it(auto_on, monkeypatch, op):
    """The check's own autograd runs inside the caller's checkpoint region: it must neither break the checkpoint
    (its saved tensors counted, then missing at recomputation) nor be broken by it (a cached failure)."""
    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer",
                        lambda fn: 1.0 if fn.func.__name__ == "matmul_lowrank_torch" else 0.5)  # Triton faster
    call = FAILING[op][3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _checkpointed(call)(auto_on)
    (record,) = json.loads(dispatch.choices_path().read_text()).values()
    assert record["backend"] == "triton" and record["reason"] is None, record
    assert _same(got, call(auto_on, "triton"))


class RefusesEveryOp(TorchDispatchMode):
    """A calling context in which no tensor op runs (what an exotic enclosing mode may do to a first-use check)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} is not allowed here")


def test_an_exception_of_the_calling_context_is_not_cached_as_the_kernels_verdict(cache, monkeypatch):
    assert dispatch._context_allows_a_check() is None                           # a plain context allows the check
    with RefusesEveryOp():
        assert "not allowed here" in dispatch._context_allows_a_check()         # the probe can fail
    calls = Calls(raises=RuntimeError("aten.mm is not allowed here"), seconds={"torch": 2.0, "triton": 1.0})
    probe = dispatch._context_allows_a_check
    monkeypatch.setattr(dispatch, "_context_allows_a_check", lambda: "RuntimeError: aten.mm is not allowed here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _choose(calls) == "torch"
    assert calls.ran == ["verify"] and dispatch._DECIDED == {} and not cache.exists()
    monkeypatch.setattr(dispatch, "_context_allows_a_check", probe)
    assert _choose(Calls(seconds={"torch": 2.0, "triton": 1.0})) == "triton"     # checked again, outside it
    with pytest.warns(RuntimeWarning, match="OutOfResources"):                  # the kernel's own failure: kept
        assert _choose(Calls(raises=RuntimeError("OutOfResources: shared memory")), "k2") == "torch"
    assert json.loads(cache.read_text())[_entry("k2")]["backend"] == "torch"


def test_under_a_dispatch_mode_nothing_is_checked_or_decided(cache):
    """Fake tensors (FastGIFT's memory planning), selective activation checkpointing or a FLOP counter would see the
    check, or make it run on what they make of it: the torch path, nothing run, nothing cached."""
    from torch.utils.flop_counter import FlopCounterMode

    for mode in (RefusesEveryOp(), FlopCounterMode(display=False)):
        calls = Calls(seconds={"torch": 2.0, "triton": 1.0})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with mode:
                assert _choose(calls) == "torch"
        assert calls.ran == [] and dispatch._DECIDED == {} and not cache.exists()
    assert _choose(Calls(seconds={"torch": 2.0, "triton": 1.0})) == "triton"     # checked outside it


def _paca_forward(device, backend=None):
    t, params, _ = paca_case(PACA_SHAPE, seed=2)
    return gift_kernels.paca_attention(t.to(device, torch.float32), PacaParams(*(p.to(device, torch.float32) for p in
                                                                                 params)), PACA_SHAPE[4],
                                       backend=backend)


def _residual_forward(device, backend=None):
    x, w, b, psi, tokens, _ = (v.to(device, torch.float32) for v in residual_case(RESIDUAL_SHAPE))
    return gift_kernels.lowrank_residual_linear(x, w, b, psi, tokens, backend=backend)


@pytest.mark.parametrize("op,forward", [("paca_attention", _paca_forward),
                                        ("lowrank_residual_linear", _residual_forward)])
def test_a_first_use_under_inference_mode_is_checked_with_autograd(auto_on, monkeypatch, op, forward):
    """Inference tensors cannot be saved for backward: the check runs on clones with inference mode off, and the
    kernels it trusts are what the inference call and later training calls get."""
    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer",
                        lambda fn: 1.0 if fn.func.__name__ == "matmul_lowrank_torch" else 0.5)  # Triton faster
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            got = forward(auto_on)
    (record,) = json.loads(dispatch.choices_path().read_text()).values()
    assert record["backend"] == "triton" and record["reason"] is None, record
    assert torch.equal(got, forward(auto_on, "triton"))
    _new_process()
    assert _same(FAILING[op][3](auto_on), FAILING[op][3](auto_on, "triton"))   # a training call: the same verdict


def test_residual_verdicts_are_kept_per_layout_and_checked_in_the_calls_layout(auto_on, monkeypatch):
    """A kernel wrong only for a column-major x (A stepped by BLOCK_K elements, not BLOCK_K * stride_ak) is trusted
    for a row-major x, whose first-use check cannot see it; a column-major x of the same shape has its own verdict,
    checked on a column-major x, and gets the torch path."""
    residual_triton = pytest.importorskip("gift_kernels.residual_triton")
    from gift_kernels.testing import column_major

    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer",
                        lambda fn: 1.0 if fn.func.__name__ == "matmul_lowrank_torch" else 0.5)  # Triton faster
    x, w, b, psi, tokens, _ = (v.to(auto_on, torch.float32) for v in residual_case((100, 64, 24, 24)))
    wrong = Edit("_matmul_lowrank_epilogue", "a_ptrs += BLOCK_K * stride_ak", "a_ptrs += BLOCK_K")
    with mutated(residual_triton, [wrong]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gift_kernels.lowrank_residual_linear(x, w, b, psi, tokens)
        with pytest.warns(RuntimeWarning, match="disagrees with the float64 torch path: output"):
            got = gift_kernels.lowrank_residual_linear(column_major(x), w, b, psi, tokens)
    verdicts = {entry.split(" | ")[2].split(" x=")[1].split(" matmul=")[0]: v["backend"] for entry, v in
                json.loads(dispatch.choices_path().read_text()).items()}
    assert verdicts == {"row-major w=row-major": "triton", "column-major w=row-major": "torch"}, verdicts
    assert torch.equal(got, gift_kernels.lowrank_residual_linear(column_major(x), w, b, psi, tokens, backend="torch"))


def test_a_column_major_gradient_runs_the_layout_the_residual_check_saw(auto_on, monkeypatch):
    """The backward feeds its gradient to the same kernel; the key holds x's and W's layouts, the check's gradient is
    row-major, so the backward makes a column-major one row-major: a kernel wrong only for a column-major A, trusted
    on row-major operands, still gives the torch path's dx."""
    residual_triton = pytest.importorskip("gift_kernels.residual_triton")
    monkeypatch.setattr(dispatch, "cpu_timer" if auto_on.type == "cpu" else "cuda_timer",
                        lambda fn: 1.0 if fn.func.__name__ == "matmul_lowrank_torch" else 0.5)  # Triton faster
    # d_out = 64: the backward's K, over one K tile, so that A's K stride is used
    x, w, b, psi, tokens, _ = (v.to(auto_on, torch.float32) for v in residual_case((100, 24, 64, 24)))
    rows = x.shape[:-1].numel()
    weights = torch.randn(64, rows, device=auto_on).t().reshape(*x.shape[:-1], 64)  # column-major rows x 64

    def dx(backend=None):
        leaf = x.clone().requires_grad_(True)
        out = gift_kernels.lowrank_residual_linear(leaf, w, b, psi, tokens, backend=backend)
        out.register_hook(lambda g: strides.append(g.reshape(-1, 64).stride()))
        return torch.autograd.grad((out * weights).sum(), leaf)[0]           # d out = weights: column-major

    strides = []

    wrong = Edit("_matmul_lowrank_epilogue", "a_ptrs += BLOCK_K * stride_ak", "a_ptrs += BLOCK_K")
    with mutated(residual_triton, [wrong]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = dx()
    assert strides[0] == (1, rows)                                              # the case is what it claims
    assert [v["backend"] for v in json.loads(dispatch.choices_path().read_text()).values()] == ["triton"]
    torch.testing.assert_close(got, dx(backend="torch"), rtol=1e-5, atol=1e-5)
