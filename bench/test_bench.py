"""Speed, activation memory and agreement of every provider, side by side in one process.

Model level: one training step (forward, backward, AdamW step) of a timm ViT.
Op level: the PaCa step batched over L layers; the residual-weight projection of one layer.
"""
from __future__ import annotations

import copy
import statistics

import pytest
import timm
import torch
import torch.nn.functional as F

import gift_kernels
from bench.harness import (
    PROVIDERS,
    Provider,
    SavedTensorCounter,
    agreement,
    build_provider,
    interleaved_times,
    median_ratios,
    outputs_and_gift_grads,
    randomize_gift_state,
    saved_bytes_of_step,
)
from gift_kernels.testing import assert_agree, relative_errors

MODELS = [("vit_small_patch16_224", 2), ("vit_base_patch16_224", 8)]
LARGE_MODELS = [("vit_large_patch16_224", 8), ("vit_huge_patch14_224", 8)]
RANK = 64
_cache: dict = {}


def _versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def _sync(device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _add_rows(cfg, kernel, x_label, provider, metrics: dict, mode="fwd+bwd"):
    from bench.harness import device_slug

    for metric, value in metrics.items():
        cfg["rows"].append({"kernel": kernel, "x": x_label, "provider": provider, "mode": mode, "metric": metric,
                            "value": value, "device": device_slug(cfg["device"]), "dtype": str(cfg["dtype"]).replace("torch.", ""),
                            **_versions()})


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    if name == "fast_triton":
        if device.type != "cuda":
            return "Triton kernels are timed on CUDA only (on CPU they run under the interpreter, for tests)"
        if not gift_kernels.triton_available():
            return "Triton cannot run here"
    if name == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install -e '.[dev]')"
    return None


# ------------------------------------------------------------------------------------------ model level
def measure_model(name: str, batch: int, cfg: dict) -> dict:
    key = (name, batch)
    if key in _cache:
        return _cache[key]
    device, dtype = cfg["device"], cfg["dtype"]
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=10).to(device)
    size = backbone.pretrained_cfg["input_size"]
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    state = randomize_gift_state(backbone, RANK)
    providers, skipped = {}, {}
    for p in PROVIDERS:
        reason = _unavailable_reason(p, device)
        if reason:
            skipped[p] = reason
            continue
        providers[p] = build_provider(p, backbone, RANK, state)

    # agreement first, while every GIFT provider holds the same weights
    x_small, y_small = x[:2], y[:2]
    ref = providers["reference"]
    exact = outputs_and_gift_grads(copy.deepcopy(ref.model).to(torch.float64), x_small.double(), y_small)
    ref_result = outputs_and_gift_grads(ref.model, x_small, y_small, dtype)
    agree = {p: agreement(prov, exact, ref_result, x_small, y_small, dtype)
             for p, prov in providers.items() if prov.gift_model is not None}

    saved = {p: saved_bytes_of_step(prov, x, y, dtype) for p, prov in providers.items()}
    peak = {}
    if device.type == "cuda":
        for p, prov in providers.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            prov.step(x, y, dtype)
            torch.cuda.synchronize(device)
            peak[p] = torch.cuda.max_memory_allocated(device)
    # rounds: small models are noisier and cheaper, so they get more
    rounds = cfg["rounds"] or (20 if device.type == "cuda" else 30 if batch * size[-1] ** 2 < 4 * 224 ** 2 else 5)
    times = interleaved_times({p: (lambda prov=prov: prov.step(x, y, dtype)) for p, prov in providers.items()},
                              rounds=rounds, warmup=2, sync=_sync(device))
    result = dict(providers=providers, skipped=skipped, x=x, y=y, times=times, saved=saved, peak=peak, agree=agree,
                  vs_no_adapter=median_ratios(times, "no_adapter"), vs_reference=median_ratios(times, "reference"),
                  vs_lora_saved={p: saved[p] / saved["lora"] for p in saved} if "lora" in saved else {})
    _cache[key] = result
    return result


def _models(cfg):
    return MODELS + (LARGE_MODELS if cfg["large"] else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model_index", range(4), ids=["vit_s16", "vit_b16", "vit_l16", "vit_h14"])
def test_train_step(benchmark, bench_config, model_index, provider):
    models = _models(bench_config)
    if model_index >= len(models):
        pytest.skip("large models run with --bench-large (default on CUDA)")
    name, batch = models[model_index]
    batch = bench_config["batch"] or batch
    m = measure_model(name, batch, bench_config)
    if provider in m["skipped"]:
        pytest.skip(m["skipped"][provider])
    prov: Provider = m["providers"][provider]
    label = f"{name} b{batch}"
    t = m["times"][provider]
    q = statistics.quantiles(t, n=5) if len(t) > 1 else [t[0]] * 4
    metrics = {
        "time_ms_p50": 1e3 * statistics.median(t), "time_ms_p20": 1e3 * q[0], "time_ms_p80": 1e3 * q[3],
        "ratio_vs_no_adapter": m["vs_no_adapter"].get(provider), "ratio_vs_reference": m["vs_reference"].get(provider),
        "saved_mib": m["saved"][provider] / 2**20, "saved_vs_lora": m["vs_lora_saved"].get(provider),
    }
    if provider in m["peak"]:
        metrics["cuda_peak_mib"] = m["peak"][provider] / 2**20
    a = m["agree"].get(provider)
    if a is not None:
        metrics.update({"agree_out_rel": a["out_rel"], "agree_grad_rel": a["grad_rel"],
                        "reference_own_grad_rel": a["ref_grad_rel"], "agree_ok": float(a["ok"])})
    _add_rows(bench_config, "train_step", label, provider, metrics, mode="step")
    benchmark.extra_info.update({k: v for k, v in metrics.items() if v is not None})
    benchmark.pedantic(prov.step, args=(m["x"], m["y"], bench_config["dtype"]), rounds=2, warmup_rounds=0)
    if a is not None:
        assert a["ok"], f"{provider} disagrees with the fp32 reference on {label}:\n{a['why']}"


# ------------------------------------------------------------------------------------------ op level
OP_SHAPES = {"paca_step": [(12, 384, 64, 64), (12, 768, 64, 64), (32, 1280, 64, 64)],
             "residual_linear": [(2 * 197, 384), (8 * 197, 768), (8 * 257, 1280)]}  # third: ViT-H/14, --bench-large


def _op_inputs(kernel, shape, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    if kernel == "paca_step":
        L, N, r, M = shape
        params = gift_kernels.PacaParams(rnd(M, r, scale=r ** -0.5), rnd(M, scale=0.1),
                                         *[w for _ in range(4) for w in (rnd(r, r, scale=r ** -0.5), rnd(r, scale=0.1))])
        return [rnd(L, N, r)], list(params)
    rows, d = shape
    return [rnd(rows, d)], [rnd(d, d, scale=d ** -0.5), rnd(d, scale=0.1), rnd(d, RANK, scale=0.02), rnd(d, RANK)]


def _op_fn(kernel, provider):
    if kernel == "paca_step":
        if provider == "reference":
            return lambda t, *p: gift_kernels.paca_attention_reference(t, gift_kernels.PacaParams(*p), 1)
        backend = provider.split("_")[1]
        return lambda t, *p: gift_kernels.paca_attention(t, gift_kernels.PacaParams(*p), 1, backend=backend)
    if provider == "no_adapter":
        return lambda x, w, b, psi, tokens: F.linear(x, w, b)
    if provider == "reference":
        return gift_kernels.lowrank_residual_linear_reference
    backend = provider.split("_")[1]
    return lambda *a: gift_kernels.lowrank_residual_linear(*a, backend=backend)


def _trainable_mask(kernel, provider):
    if kernel == "paca_step":
        return None  # everything
    return [True, False, False, provider != "no_adapter", provider != "no_adapter"]  # x, W, b frozen; psi, T


def _run_op(kernel, provider, inputs, params, counter: list | None = None):
    """Forward and backward of one provider on fresh leaves; appends the saved-for-backward bytes
    (the op's weights excluded: they are parameters, not activations) to ``counter`` when given."""
    tensors = [t.detach().clone() for t in inputs + params]
    mask = _trainable_mask(kernel, provider) or [True] * len(tensors)
    for t, m in zip(tensors, mask):
        t.requires_grad_(m)
    with SavedTensorCounter(exclude=tensors[len(inputs):]) as saved:
        out = _op_fn(kernel, provider)(*tensors)
    if counter is not None:
        counter.append(saved.bytes)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return out, tensors


@pytest.mark.parametrize("provider", ["no_adapter", "reference", "fast_torch", "fast_triton"])
@pytest.mark.parametrize("shape_index", [0, 1, 2])
@pytest.mark.parametrize("kernel", sorted(OP_SHAPES))
def test_op(benchmark, bench_config, kernel, shape_index, provider):
    device, dtype = bench_config["device"], bench_config["dtype"]
    if shape_index == 2 and not bench_config["large"]:
        pytest.skip("the ViT-H/14-sized op runs with --bench-large (default on CUDA)")
    if kernel == "paca_step" and provider == "no_adapter":
        pytest.skip("no_adapter has no PaCa step")
    reason = _unavailable_reason(provider, device)
    if reason:
        pytest.skip(reason)
    shape = OP_SHAPES[kernel][shape_index]
    inputs, params = _op_inputs(kernel, shape, device, dtype)
    key = (kernel, shape_index)
    if key not in _cache:  # interleaved timing of all available providers of this op
        names = [p for p in ("no_adapter", "reference", "fast_torch", "fast_triton")
                 if _unavailable_reason(p, device) is None and not (kernel == "paca_step" and p == "no_adapter")]
        times = interleaved_times({p: (lambda p=p: _run_op(kernel, p, inputs, params)) for p in names},
                                  rounds=bench_config["rounds"] or 10, warmup=2, sync=_sync(device))
        _cache[key] = times
    times = _cache[key]
    saved = []
    out, tensors = _run_op(kernel, provider, inputs, params, counter=saved)
    metrics = {"time_ms_p50": 1e3 * statistics.median(times[provider]),
               "ratio_vs_reference": median_ratios(times, "reference")[provider],
               "ratio_vs_torch_path": median_ratios(times, "fast_torch").get(provider),
               "saved_mib": saved[0] / 2**20}
    if provider != "no_adapter":
        got = {"output": out.detach(), **{f"grad{i}": t.grad for i, t in enumerate(tensors) if t.grad is not None}}
        exact_out, exact_t = _run_op(kernel, "reference", [t.double() for t in inputs], [t.double() for t in params])
        exact = {"output": exact_out.detach(), **{f"grad{i}": t.grad for i, t in enumerate(exact_t) if t.grad is not None}}
        base_out, base_t = _run_op(kernel, "reference", inputs, params)
        base = {"output": base_out.detach(), **{f"grad{i}": t.grad for i, t in enumerate(base_t) if t.grad is not None}}
        errs = relative_errors(got, exact)
        metrics["agree_out_rel"] = errs["output"][1]
        metrics["agree_grad_rel"] = max(v[1] for k, v in errs.items() if k != "output")
        assert_agree(got, exact, dtype, baseline=base)
    x_label = "L={} N={} r={} M={}".format(*shape) if kernel == "paca_step" else "x {}x{}, r={}".format(*shape, RANK)
    _add_rows(bench_config, kernel, x_label, provider, metrics)
    benchmark.extra_info.update(metrics)
    benchmark.pedantic(_run_op, args=(kernel, provider, inputs, params), rounds=3, warmup_rounds=1)
