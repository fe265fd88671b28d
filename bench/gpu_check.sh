#!/usr/bin/env bash
# One prepared check for a lent GPU machine, under 8 minutes on an H200: see bench/gpu_check.py.
#   usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
