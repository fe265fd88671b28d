#!/usr/bin/env bash
# One prepared check for a GPU machine that has nothing but this repo and a Python with torch,
# triton, timm, peft, pytest and pytest-benchmark (no install step): the kernel tests on CUDA in
# fp32/bf16/fp16 (ragged splits and the ViT-H shape included), a sampled AOT compile check for sm_80/sm_90,
# FastGIFT with the Triton kernels against the reference, then the bench with
# fast_triton in bf16 (ViT-S/B/L/H). Results land in bench/results/<gpu>/ and, when OUT_DIR is given,
# are copied there. Budget: under 8 minutes on an H200.
#   usage: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0
start=$(date +%s)
"$PY" - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
PY
echo "== kernel tests on CUDA (fp32, fp16, bf16) =="
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_paca.py tests/kernels/test_residual.py \
    tests/kernels/test_dispatch.py -k "cuda or dispatch_point" || status=1
echo "== ragged-split and ViT-H-shape kernel tests on CUDA (fp32, fp16, bf16) =="
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_launch.py -k cuda || status=1
echo "== compile check: sampled table for sm_80 and sm_90 (the full table: make bench) =="
timeout 150 "$PY" -m gift_kernels.dev.compile_check --arch sm_80,sm_90 --sample 6 \
    ${OUT_DIR:+--json "$OUT_DIR/compile_check.json"} || status=1
echo "== FastGIFT with the Triton backend vs GIFTReference (CUDA) =="
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py || status=1
echo "== bench, bf16, large models on =="
left=$((470 - ($(date +%s) - start)))
timeout $((left > 60 ? left : 60)) "$PY" -m pytest -q -p no:cacheprovider bench --bench-device cuda \
    --bench-dtype bfloat16 --bench-large || status=1
results=$(ls -td bench/results/*/ 2>/dev/null | head -1)
if [ -n "$OUT_DIR" ] && [ -n "$results" ]; then
    mkdir -p "$OUT_DIR" && cp "$results"/* "$OUT_DIR"/
fi
echo "gpu_check finished in $(( $(date +%s) - start )) s with status $status; results in ${results:-nowhere}"
exit $status
