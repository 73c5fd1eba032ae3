#!/usr/bin/env bash
# One device call for the mid-size dense linears (16 < M <= 128, the decode batches 17-128 and serving's ~100-row
# steps): `nvfp4kit tune --kernels linear` into a fresh cache with the widened candidate set
# (tuning/search.MID_M_TILES), then `bench kernels` on the dense ops with the shipped table and with that cache
# (us, GB/s, BF16 cuBLAS beside them), then optionally the prefill expansion in row chunks
# (scripts/gpu_prefill_gemm.py --chunks). Prints each stage's table.
# Usage on the GPU machine from the repository root:
#   bash scripts/gpu_linear_tune_check.sh OUT_DIR ["TOKENS"] [prefill]
set -u -o pipefail
out=${1:?out dir}
tokens=${2:-32 64 128}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out/cache"
ops="dense_qkv_sliding dense_qk_global dense_o_sliding dense_o_global dense_gate_up dense_down"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "tune --kernels linear --tokens $tokens (fresh cache)"
timeout 260 python3 -m nvfp4kit tune --kernels linear --tokens $tokens --cache-dir "$out/cache" --budget-s 230 \
  --log 2>"$out/tune.log" | tail -1
grep -E "^linear " "$out/tune.log" | cut -c1-230
step "bench kernels: shipped table"
timeout 120 python3 -m nvfp4kit bench kernels --ops $ops --m $tokens --json "$out/kernels_shipped.json" --quiet 2>&1 |
  tail -20
step "bench kernels: the fresh cache"
NVFP4KIT_CACHE_DIR="$out/cache" timeout 120 python3 -m nvfp4kit bench kernels --ops $ops --m $tokens \
  --json "$out/kernels_tuned.json" --quiet 2>&1 | tail -20
if [ "${3:-}" = prefill ]; then
  step "prefill expansion in chunks"
  timeout 150 python3 scripts/gpu_prefill_gemm.py --out "$out/prefill" --ms 1024 2048 --skip-moe --chunks 2 4 8 \
    2>"$out/prefill.log" | tail -14
fi
step "done"
