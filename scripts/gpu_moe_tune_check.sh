#!/usr/bin/env bash
# One device call for the MoE path choice of `nvfp4kit tune` (MoEConfig.path, kernels/moe_dispatch.py): the CUDA
# tests that a named path runs its own kernels, then `tune --kernels moe` into a fresh cache (fragment paths against
# the tiles at decode sizes), then `bench kernels --ops moe` with the shipped table and with that cache, so the
# rows' "path" column shows what each chose and the us what it cost. Prints each stage's table.
# Usage on the GPU machine from the repository root:
#   bash scripts/gpu_moe_tune_check.sh OUT_DIR ["TOKENS"]
set -u -o pipefail
out=${1:?out dir}
tokens=${2:-4 8 16 32 64 128}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out/cache"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "CUDA tests: named MoE paths, the tuner's path filter, the step timer"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests/kernels/test_fused_moe.py \
  tests/kernels/test_bench.py tests/engine/test_overlap_cuda.py -k "path or runs or fragment or step_timer" 2>&1 | tail -3
step "tune --kernels moe --tokens $tokens (fresh cache)"
timeout 240 python3 -m nvfp4kit tune --kernels moe --tokens $tokens --cache-dir "$out/cache" --log 2>&1 |
  grep -E "^moe|tuned|written" | tail -12
step "bench kernels --ops moe: shipped table"
timeout 150 python3 -m nvfp4kit bench kernels --ops moe --m $tokens --json "$out/kernels_shipped.json" 2>&1 |
  grep -E "^\s*moe " | tail -8
step "bench kernels --ops moe: the fresh cache"
NVFP4KIT_CACHE_DIR="$out/cache" timeout 150 python3 -m nvfp4kit bench kernels --ops moe --m $tokens \
  --json "$out/kernels_tuned.json" 2>&1 | grep -E "^\s*moe " | tail -8
step "done"
