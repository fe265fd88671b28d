#!/usr/bin/env bash
# Independent spill check of what `python -m gift_kernels.dev.compile_check --ptx-dir DIR` compiled: runs Triton's
# bundled ptxas -v (ptxas-blackwell for sm_100 and up) on every DIR/*.ptx for the `.target` the PTX names, with
# none of compile_check's own parsing, and prints one line per PTX whose report has a non-zero stack frame or
# spill store or load.  Exit 1 if any PTX spills or fails to assemble, 0 if none does; the last line counts both.
#   bench/ptxas_spills.sh DIR [PYTHON]
set -euo pipefail
dir=${1:?usage: bench/ptxas_spills.sh PTX_DIR [PYTHON]}
py=${2:-python}
bin=$("$py" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin"))')
shopt -s nullglob
files=("$dir"/*.ptx)
[ ${#files[@]} -gt 0 ] || { echo "ptxas_spills: no .ptx in $dir (run compile_check with --ptx-dir $dir)" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
bad=0
for f in "${files[@]}"; do
    target=$(sed -n 's/^\.target[[:space:]]*\([a-z0-9_]*\).*/\1/p' "$f" | head -1)
    number=${target#sm_}; number=${number%%[a-z]*}       # sm_90a -> 90
    ptxas="$bin/ptxas"; [ "$number" -ge 100 ] && ptxas="$bin/ptxas-blackwell"
    if ! log=$("$ptxas" -v --gpu-name="$target" "$f" -o "$out/k.cubin" 2>&1); then
        echo "FAIL $(basename "$f"): ptxas exited non-zero: $(echo "$log" | tail -1)"; bad=$((bad + 1)); continue
    fi
    spill=$(echo "$log" | grep -E "bytes stack frame" | grep -vE "(^|[^0-9])0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" || true)
    if [ -n "$spill" ]; then
        echo "SPILL $(basename "$f") [$target]: $spill"; bad=$((bad + 1))
    fi
done
versions=$("$bin/ptxas" --version | tail -1; "$bin/ptxas-blackwell" --version | tail -1)
echo "ptxas_spills: ${#files[@]} PTX files assembled by Triton's bundled ptxas -v (ptxas-blackwell for sm_100 and up:"\
     "$(echo "$versions" | tr '\n' ';')); $bad spill or fail"
[ "$bad" -eq 0 ]
