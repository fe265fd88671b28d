"""The GPU check's own cases (bench/gpu_check.py runs them; each needs CUDA):

    python bench/gpu_check_cases.py verdicts OUT_DIR   # auto's first-use verdicts at ViT-H shapes: OUT_DIR/kernels.json
    python bench/gpu_check_cases.py sanitize           # small ragged Triton calls, for compute-sanitizer

`verdicts` exits 1 if any op's Triton kernels failed their first-use check (the reasons are in the file and
printed), 0 if every op took Triton or a faster cuBLAS.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from gift_kernels import PacaParams, dispatch, lowrank_residual_linear, paca_attention
from gift_kernels.testing import paca_case, residual_case

VIT_H_PACA = (32, 1280, 64, 64, 1)            # (L, N, M, r, heads): GIFT rank 64 on ViT-H/14's attn.proj
VIT_H_RESIDUAL = (8 * 257 // 2, 1280, 1280, 64)  # (rows, d_in, d_out, r): residual_case doubles rows -> b8 x 257
SANITIZE_PACA = (2, 137, 20, 24, 2)           # ragged N, M, r (r <= 32: masked at 64 takes torch); 108 SMs split N
SANITIZE_RESIDUAL = (197, 200, 136, 24)       # 394 rows: every tile edge ragged


def _paca_call(shape, dtype, backend=None, activation="sigmoid"):
    t, params, grad = paca_case(shape)
    leaves = [x.to("cuda", dtype).requires_grad_(True) for x in (t, *params)]
    out = paca_attention(leaves[0], PacaParams(*leaves[1:]), shape[4], activation, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to("cuda", dtype))]


def _residual_call(shape, dtype, backend=None):
    x, w, b, psi, tokens, grad = residual_case(shape, psi_scale=1e-3)
    x = x.to("cuda", dtype).requires_grad_(True)
    w, b = w.to("cuda", dtype), b.to("cuda", dtype)
    psi, tokens = (v.to("cuda", torch.float32).requires_grad_(True) for v in (psi, tokens))
    out = lowrank_residual_linear(x, w, b, psi, tokens, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, [x, psi, tokens], grad.to("cuda", dtype))]


def verdicts(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kernels.json")
    os.environ.update({dispatch.CACHE_ENV: path, dispatch.BACKEND_ENV: "auto"})
    calls = [("paca_attention", lambda d, b=None: _paca_call(VIT_H_PACA, d, b), d)
             for d in (torch.float32, torch.bfloat16, torch.float16)]
    calls += [("lowrank_residual_linear", lambda d, b=None: _residual_call(VIT_H_RESIDUAL, d, b), d)
              for d in (torch.bfloat16, torch.float32)]
    for op, call, dtype in calls:
        before = set(dispatch._DECIDED)
        got = call(dtype)
        entry, = set(dispatch._DECIDED) - before
        backend = dispatch._DECIDED[entry]
        same = all(torch.equal(a, b) for a, b in zip(got, call(dtype, backend)))
        print(f"{op} {dtype}: {backend}; the auto call equals the {backend} call: {same}", flush=True)
    verdict = json.loads(open(path).read())
    failed = {k: v["reason"] for k, v in verdict.items() if v.get("reason")}
    for entry, reason in failed.items():
        print(f"FAILED its first-use check: {entry}: {reason}")
    return 1 if failed else 0


def sanitize() -> int:
    os.environ["GIFT_SM_COUNT"] = "108"
    for dtype in (torch.float32, torch.bfloat16):
        for activation in ("sigmoid", "softmax"):
            _paca_call(SANITIZE_PACA, dtype, "triton", activation)
        _residual_call(SANITIZE_RESIDUAL, dtype, "triton")
    torch.cuda.synchronize()
    print("sanitize cases ran", flush=True)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_check_cases needs CUDA")
    if sys.argv[1:2] == ["verdicts"] and len(sys.argv) == 3:
        sys.exit(verdicts(sys.argv[2]))
    if sys.argv[1:] == ["sanitize"]:
        sys.exit(sanitize())
    sys.exit(__doc__)
