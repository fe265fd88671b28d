"""Speed, activation memory and agreement of every provider, side by side in one process.

Model level: one training step (forward, backward, AdamW step) of a timm ViT.
Op level: the PaCa step batched over L layers; the residual-weight projection of one layer.
Every ratio is the median of paired per-round ratios, with its interquartile range (bench.harness).
"""
from __future__ import annotations

import os
import statistics

import pytest
import timm
import torch
import torch.nn.functional as F

import gift.timm_models  # noqa: F401  (registers gift's small timm models, for GIFT_BENCH_MODELS)
import gift_kernels
from bench.harness import (
    ACCUMULATION_PROVIDERS,
    COMPILED,
    EVAL_PROVIDERS,
    PROVIDERS,
    RATIO_BASELINES,
    GeneratorRuns,
    Provider,
    SavedTensorCounter,
    agreement,
    bench_rounds,
    build_provider,
    cuda_step_peak_bytes,
    device_slug,
    interleaved_times,
    paired_ratios,
    random_gift_state,
    reference_own_error,
    saved_bytes_of_step,
)
from gift.backbones import data_config
from gift.testing import model_exact_and_baseline
from gift_kernels.testing import paca_agreement, paca_case, residual_agreement, residual_case

RANK = 64
# (timm model, batch, timing rounds on CPU); bench/README.md says how long `make bench` takes with them.
MODELS = [("vit_small_patch16_224", 2, 40), ("vit_base_patch16_224", 8, 24)]
LARGE_MODELS = [("vit_large_patch16_224", 8, 6), ("vit_huge_patch14_224", 8, 4)]
CUDA_ROUNDS = 30
OP_ROUNDS = 20
_cache: dict = {}


def _versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def _sync(device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _add_rows(cfg, kernel, x_label, provider, metrics: dict, mode="fwd+bwd"):
    for metric, value in metrics.items():
        cfg["rows"].append(
            {
                "kernel": kernel,
                "x": x_label,
                "provider": provider,
                "mode": mode,
                "metric": metric,
                "value": value,
                "device": device_slug(cfg["device"]),
                "dtype": str(cfg["dtype"]).replace("torch.", ""),
                **_versions(),
            }
        )


def _ratio_metrics(ratios: dict, provider: str) -> dict:
    """``ratio_vs_<b>`` (median), ``ratio_vs_<b>_q1`` / ``_q3`` for every baseline ``b`` that was measured."""
    out = {}
    for base, stats in ratios.items():
        if provider in stats:
            s = stats[provider]
            out.update({f"ratio_vs_{base}": s.median, f"ratio_vs_{base}_q1": s.q1, f"ratio_vs_{base}_q3": s.q3})
    return out


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    name = name.removesuffix(COMPILED)
    if name == "fast_triton":
        if device.type != "cuda":
            return "Triton kernels are timed on CUDA only (on CPU they run under the interpreter, for tests)"
        if not gift_kernels.triton_available():
            return "Triton cannot run here"
    if name == "lora":
        try:
            import peft  # noqa: F401  (only whether it imports: LoRA is skipped without it)
        except ImportError:
            return "peft is not installed (pip install -e '.[dev]')"
    return None


# ------------------------------------------------------------------------------------------ model level
def _models(cfg) -> list[tuple[str, int, int]]:
    """(name, batch, rounds): ``GIFT_BENCH_MODELS=name:batch[,name:batch]`` replaces the table (e.g. a quick
    mechanics check on ``gift_vit_micro_patch4_32:2``)."""
    listed = os.environ.get("GIFT_BENCH_MODELS")
    if listed:
        models = []
        for item in listed.split(","):
            name, _, batch = item.partition(":")
            if not batch.isdigit():
                raise ValueError(
                    f"GIFT_BENCH_MODELS entry {item!r} is not name:batch (e.g. gift_vit_micro_patch4_32:2)."
                )
            models.append((name, int(batch), 10))
    else:
        models = MODELS + (LARGE_MODELS if cfg["large"] else [])
    default = (lambda r: CUDA_ROUNDS) if cfg["device"].type == "cuda" else (lambda r: r)
    return [
        (name, cfg["batch"] or batch, cfg["rounds"] or bench_rounds(default(rounds))) for name, batch, rounds in models
    ]


def measure_model(name: str, batch: int, rounds: int, cfg: dict) -> dict:
    key = (name, batch)
    if key in _cache:
        return _cache[key]
    device, dtype = cfg["device"], cfg["dtype"]
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=10).to(device)
    x = torch.randn(batch, *data_config(backbone).input_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    state = random_gift_state(backbone, RANK)
    providers, skipped = {}, {}
    for p in PROVIDERS:
        reason = _unavailable_reason(p, device)
        if reason:
            skipped[p] = reason
            continue
        providers[p] = build_provider(p, backbone, RANK, state)
    for prov in providers.values():  # compiled first, at the timed shape: no compile inside a timed step
        if prov.compiled:
            prov.compile_first_step(x, y, dtype, _sync(device))

    # agreement first, while every GIFT provider holds the same weights; a compiled one's after its timing, from these
    # weights again (its agreement at x_small would compile a second graph that its timed steps might run)
    x_small, y_small = x[:2], y[:2]
    ref = providers["reference"]
    exact, baseline = model_exact_and_baseline(ref.model, x_small, y_small, dtype)
    own = reference_own_error(exact, baseline, ref.model)
    checked = {p: prov for p, prov in providers.items() if prov.gift_model is not None and p != "reference"}
    agree = {p: agreement(prov, exact, baseline, x_small, y_small, dtype)
             for p, prov in checked.items() if not prov.compiled}
    restore = {p: prov.snapshot() for p, prov in checked.items() if prov.compiled}

    # saved tensors are counted eagerly (saved-tensor hooks and torch.compile do not mix): compiled ones have none
    saved = {p: saved_bytes_of_step(prov, x, y, dtype) for p, prov in providers.items() if not prov.compiled}
    peak = (
        {p: cuda_step_peak_bytes(prov, x, y, dtype) for p, prov in providers.items()} if device.type == "cuda" else {}
    )
    times = interleaved_times({p: (lambda prov=prov: prov.step(x, y, dtype)) for p, prov in providers.items()},
                              rounds=rounds, warmup=1, sync=_sync(device))
    for p, put_back in restore.items():
        put_back()
        agree[p] = agreement(checked[p], exact, baseline, x_small, y_small, dtype)
    result = dict(providers=providers, skipped=skipped, x=x, y=y, times=times, saved=saved, peak=peak, agree=agree,
                  own=own, rounds=rounds, ratios={b: paired_ratios(times, b) for b in RATIO_BASELINES})
    _cache[key] = result
    return result


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model_index", range(4), ids=["model0", "model1", "model2", "model3"])
def test_train_step(benchmark, bench_config, model_index, provider):
    models = _models(bench_config)
    if model_index >= len(models):
        pytest.skip("no model at this index (ViT-L/16 and ViT-H/14 run with --bench-large, default on CUDA)")
    name, batch, rounds = models[model_index]
    m = measure_model(name, batch, rounds, bench_config)
    if provider in m["skipped"]:
        pytest.skip(m["skipped"][provider])
    prov: Provider = m["providers"][provider]
    label = f"{name} b{batch}"
    metrics = {"time_ms_p50": 1e3 * statistics.median(m["times"][provider]), "rounds": m["rounds"],
               **_ratio_metrics(m["ratios"], provider)}
    if prov.compile_s is not None:
        metrics["compile_s"] = prov.compile_s
    if provider in m["saved"]:
        metrics["saved_mib"] = m["saved"][provider] / 2**20
        for base in ("lora", "floor"):
            if base in m["saved"]:
                metrics[f"saved_vs_{base}"] = m["saved"][provider] / m["saved"][base]
    if provider in m["peak"]:
        metrics["cuda_step_peak_mib"] = m["peak"][provider] / 2**20
    if provider == "reference":  # its float64-vs-bench-dtype error: what the others are allowed beyond the table
        metrics.update({"reference_own_out_rel": m["own"]["out_rel"], "reference_own_grad_rel": m["own"]["grad_rel"]})
    a = m["agree"].get(provider)
    if a is not None:
        metrics.update({"agree_out_rel": a["out_rel"], "agree_grad_rel": a["grad_rel"], "agree_ok": float(a["ok"])})
    _add_rows(bench_config, "train_step", label, provider, metrics, mode="step")
    benchmark.extra_info.update(metrics)
    benchmark.pedantic(prov.step, args=(m["x"], m["y"], bench_config["dtype"]), rounds=1, warmup_rounds=0)
    if a is not None:
        assert a["ok"], f"{provider} disagrees with the float64 reference on {label}:\n{a['why']}"


# ------------------------------------------------------------------------------------------ accumulation, eval
# (timm model, global batch, micro-batches, timing rounds on CPU): one optimizer step of 4 micro-batches of 2
ACCUMULATION_MODELS = [("vit_small_patch16_224", 8, 4, 30), ("vit_base_patch16_224", 8, 4, 16)]
ACCUMULATION_BASELINES = ("floor", "lora")
EVAL_BASELINES = ("merged",)


def _accumulation_models(cfg) -> list[tuple[str, int, int, int]]:
    """(name, batch, micro-batches, rounds): with ``GIFT_BENCH_MODELS`` its models at their batch as 2 micro-batches."""
    listed = os.environ.get("GIFT_BENCH_MODELS")
    if listed:
        models = [(name, 2 * (cfg["batch"] or batch), 2, 10) for name, batch, _ in _models(cfg)]
    else:
        models = [(name, cfg["batch"] or batch, k, r) for name, batch, k, r in ACCUMULATION_MODELS]
    default = (lambda r: CUDA_ROUNDS) if cfg["device"].type == "cuda" else (lambda r: r)
    return [(name, batch, k, cfg["rounds"] or bench_rounds(default(rounds))) for name, batch, k, rounds in models]


def _providers_of(name: str, batch: int, names: tuple[str, ...], cfg: dict):
    """The available providers of ``names`` around one random timm ``name`` (the same GIFT weights in each), a batch
    of ``batch`` images and labels, and the skipped providers with why: ``(providers, x, y, skipped)``."""
    device = cfg["device"]
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=10).to(device)
    x = torch.randn(batch, *backbone.pretrained_cfg["input_size"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    skipped = {p: reason for p in names if (reason := _unavailable_reason(p, device))}
    state = random_gift_state(backbone, RANK)
    providers = {p: build_provider(p, backbone, RANK, state) for p in names if p not in skipped}
    return providers, x, y, skipped


def _timed(cached: dict, cfg: dict, kernel: str, label: str, provider: str, mode: str) -> None:
    """Skip a provider that did not run, else add its rows: median ms, rounds and ratios."""
    if provider in cached["skipped"]:
        pytest.skip(cached["skipped"][provider])
    metrics = {"time_ms_p50": 1e3 * statistics.median(cached["times"][provider]), "rounds": cached["rounds"],
               **_ratio_metrics(cached["ratios"], provider)}
    _add_rows(cfg, kernel, label, provider, metrics, mode=mode)


def measure_accumulated(name: str, batch: int, micro_batches: int, rounds: int, cfg: dict) -> dict:
    """Interleaved optimizer steps of ``micro_batches`` micro-batches of ``batch / micro_batches`` per provider."""
    key = ("accumulated", name, batch, micro_batches)
    if key not in _cache:
        providers, x, y, skipped = _providers_of(name, batch, ACCUMULATION_PROVIDERS, cfg)
        times = interleaved_times({p: (lambda prov=prov: prov.step(x, y, cfg["dtype"], micro_batches))
                                   for p, prov in providers.items()},
                                  rounds=rounds, warmup=1, sync=_sync(cfg["device"]))
        _cache[key] = dict(skipped=skipped, times=times, rounds=rounds,
                           ratios={b: paired_ratios(times, b) for b in ACCUMULATION_BASELINES})
    return _cache[key]


@pytest.mark.parametrize("provider", ACCUMULATION_PROVIDERS)
@pytest.mark.parametrize("model_index", range(2), ids=["model0", "model1"])
def test_accumulated_train_step(bench_config, model_index, provider):
    """One optimizer step of micro-batches: FastGIFT runs its generator once per step (``accumulate``)."""
    models = _accumulation_models(bench_config)
    if model_index >= len(models):
        pytest.skip("no model at this index")
    name, batch, k, rounds = models[model_index]
    m = measure_accumulated(name, batch, k, rounds, bench_config)
    _timed(m, bench_config, "train_step_accumulated", f"{name} b{batch} as {k}x{batch // k}", provider, "step")


def measure_eval(name: str, batch: int, rounds: int, cfg: dict) -> dict:
    """Interleaved inference forwards per provider; ``cached``: whether the timed forwards ran no generator (a
    FastGIFT's residuals made once, by the first forward) and gave the first forward's outputs."""
    key = ("eval", name, batch)
    if key not in _cache:
        providers, x, _, skipped = _providers_of(name, batch, EVAL_PROVIDERS, cfg)
        runs = {p: GeneratorRuns(prov) for p, prov in providers.items()}
        for prov in providers.values():
            prov.model.eval()
        first = {p: prov.eval_forward(x, cfg["dtype"]) for p, prov in providers.items()}  # FastGIFT: its residuals
        for counter in runs.values():
            counter.take()
        times = interleaved_times({p: (lambda prov=prov: prov.eval_forward(x, cfg["dtype"]))
                                   for p, prov in providers.items()},
                                  rounds=rounds, warmup=1, sync=_sync(cfg["device"]))
        cached = {p: runs[p].take() == 0 and torch.equal(prov.eval_forward(x, cfg["dtype"]), first[p])
                  for p, prov in providers.items()}
        _cache[key] = dict(skipped=skipped, times=times, rounds=rounds, cached=cached,
                           ratios={b: paired_ratios(times, b) for b in EVAL_BASELINES})
    return _cache[key]


@pytest.mark.parametrize("provider", EVAL_PROVIDERS)
@pytest.mark.parametrize("model_index", range(2), ids=["model0", "model1"])
def test_eval_forward(bench_config, model_index, provider):
    """One inference forward: unmerged FastGIFT with its cached residuals (made once, before the timing) against the
    merged model (the plain backbone's cost); LoRA unmerged for comparison."""
    models = _models(bench_config)
    if model_index >= len(models):
        pytest.skip("no model at this index")
    name, batch, rounds = models[model_index]
    m = measure_eval(name, batch, rounds, bench_config)
    _timed(m, bench_config, "eval_forward", f"{name} b{batch}", provider, "fwd")
    assert m["cached"][provider], f"{provider}: a timed forward ran the generator or gave other outputs than the first"


# ------------------------------------------------------------------------------------------ op level
# paca_step: (L, N, M, r, heads) as in gift_kernels.testing.paca_case; residual_linear: (rows, d_in, d_out, r) as in
# residual_case, whose x holds 2 x rows rows: ViT-S/16 b2, ViT-B/16 b8, ViT-H/14 b8 (third: --bench-large)
OP_SHAPES = {"paca_step": [(12, 384, 64, 64, 1), (12, 768, 64, 64, 1), (32, 1280, 64, 64, 1)],
             "residual_linear": [(197, 384, 384, RANK), (4 * 197, 768, 768, RANK), (4 * 257, 1280, 1280, RANK)]}
OP_PROVIDERS = ("floor", "reference", "fast_torch", "fast_triton")


def _op_inputs(kernel, shape):
    """Float64 CPU inputs of the op (tokens/activations first, then weights) and whether each is trained."""
    if kernel == "paca_step":
        t, params, _ = paca_case(shape)
        return [t, *params], [True] * (1 + len(params))
    x, w, b, psi, tokens, _ = residual_case(shape)
    return [x, w, b, psi, tokens], [True, False, False, True, True]  # W, b frozen


def _op_fn(kernel, provider, heads):
    backend = provider.split("_")[1] if provider.startswith("fast_") else None
    if kernel == "paca_step":
        if provider == "reference":
            return lambda t, *p: gift_kernels.paca_attention_reference(t, gift_kernels.PacaParams(*p), heads)
        return lambda t, *p: gift_kernels.paca_attention(t, gift_kernels.PacaParams(*p), heads, backend=backend)
    if provider == "floor":
        return lambda x, w, b, psi, tokens: F.linear(x, w, b)
    if provider == "reference":
        return gift_kernels.lowrank_residual_linear_reference
    return lambda *a: gift_kernels.lowrank_residual_linear(*a, backend=backend)


def _op_leaves(kernel, provider, tensors, trained):
    """Fresh leaves for one call (the floor trains only x) and the output gradient: built outside the timer."""
    mask = [i == 0 for i in range(len(tensors))] if provider == "floor" else trained
    leaves = [t.detach().clone().requires_grad_(m) for t, m in zip(tensors, mask)]
    out_shape = leaves[0].shape if kernel == "paca_step" else torch.Size((*leaves[0].shape[:-1], leaves[1].shape[0]))
    grad = torch.full(out_shape, out_shape.numel() ** -0.5, dtype=leaves[0].dtype, device=leaves[0].device)
    return (*leaves, grad)


def _op_call(fn):
    def call(*leaves_and_grad):
        *leaves, grad = leaves_and_grad
        fn(*leaves).backward(grad)
    return call


def _op_agreement(kernel, shape, provider, device, dtype) -> dict:
    """Outputs, every gradient and the op's own work vs float64, as the kernel tests check them
    (`gift_kernels.testing.paca_agreement` / `residual_agreement`)."""
    backend = provider.split("_")[1] if provider.startswith("fast_") else "reference"
    agree = (paca_agreement if kernel == "paca_step" else residual_agreement)(shape, dtype, backend, device=device)
    grads = [agree.relative[k] for k in agree.got if k != "output"]  # the gradients themselves; own work is in "bad"
    return {"agree_out_rel": agree.relative["output"], "agree_grad_rel": max(grads), "bad": agree.bad}


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("shape_index", [0, 1, 2])
@pytest.mark.parametrize("kernel", sorted(OP_SHAPES))
def test_op(benchmark, bench_config, kernel, shape_index, provider):
    device, dtype = bench_config["device"], bench_config["dtype"]
    if shape_index == 2 and not bench_config["large"]:
        pytest.skip("the ViT-H/14-sized op runs with --bench-large (default on CUDA)")
    if kernel == "paca_step" and provider == "floor":
        pytest.skip("the PaCa step has no frozen counterpart")
    reason = _unavailable_reason(provider, device)
    if reason:
        pytest.skip(reason)
    shape = OP_SHAPES[kernel][shape_index]
    inputs, trained = _op_inputs(kernel, shape)
    tensors = [t.to(device=device, dtype=dtype) for t in inputs]
    heads = shape[4] if kernel == "paca_step" else None
    key = (kernel, shape_index)
    if key not in _cache:  # interleaved timing of all available providers of this op
        names = [p for p in OP_PROVIDERS
                 if _unavailable_reason(p, device) is None and not (kernel == "paca_step" and p == "floor")]
        times = interleaved_times(
            {p: _op_call(_op_fn(kernel, p, heads)) for p in names},
            rounds=bench_config["rounds"] or bench_rounds(OP_ROUNDS),
            warmup=2,
            sync=_sync(device),
            prepare={p: (lambda p=p: _op_leaves(kernel, p, tensors, trained)) for p in names},
        )
        _cache[key] = (times, {b: paired_ratios(times, b) for b in ("floor", "reference", "fast_torch")})
    times, ratios = _cache[key]
    *leaves, grad = _op_leaves(kernel, provider, tensors, trained)
    with SavedTensorCounter(exclude=leaves[1:]) as saved:  # the op's weights are parameters, not activations
        out = _op_fn(kernel, provider, heads)(*leaves)
    out.backward(grad)
    metrics = {"time_ms_p50": 1e3 * statistics.median(times[provider]), "rounds": len(times[provider]),
               **_ratio_metrics(ratios, provider), "saved_mib": saved.bytes / 2**20}
    bad = []
    if provider != "floor":
        agree = _op_agreement(kernel, shape, provider, device, dtype)
        bad = agree.pop("bad")
        metrics.update(agree)
    if kernel == "paca_step":
        x_label = "L={} N={} M={} r={}".format(*shape[:4])
    else:
        x_label = "x {}x{}, d_out={}, r={}".format(2 * shape[0], *shape[1:])
    _add_rows(bench_config, kernel, x_label, provider, metrics)
    benchmark.extra_info.update(metrics)
    call = _op_call(_op_fn(kernel, provider, heads))
    benchmark.pedantic(
        call, setup=lambda: (_op_leaves(kernel, provider, tensors, trained), {}), rounds=3, warmup_rounds=1
    )
    assert not bad, f"{provider} {kernel} {x_label} disagrees with float64:\n" + "\n".join(bad)
