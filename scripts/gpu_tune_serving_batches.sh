#!/usr/bin/env bash
# Where a serving-sized decode step goes and whether tuning at its exact token counts helps (~8 minutes on an H100):
# the kernel profile of one decode step at batch 1 and 96, `nvfp4kit tune` at 96 and 112 tokens into a fresh cache
# (the shipped tables were tuned at 64 and 128: batch 96 runs the 128-token entry), then `bench engine` at batch 96
# and 112 with and without that cache.
# Usage on the GPU machine from the repository root: bash scripts/gpu_tune_serving_batches.sh OUT_DIR [TUNE_BUDGET_S]
set -u -o pipefail
out=${1:?out dir}
budget=${2:-240}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
mkdir -p "$out/cache"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
bench() {
  timeout 200 python3 -m nvfp4kit bench engine --decode-batches "$@" --context 816 --kv-dtype fp8_e4m3 \
    --max-model-len 16384 --prefill 1024 --baseline none 2>&1
}
step "profile of one decode step, batch 1 and 96"
bench 1 96 --profile --json "$out/profile.json" > "$out/profile.txt"
grep -E "decode batch|^\|" "$out/profile.txt" | head -70
step "tune at 96 and 112 tokens"
timeout $((budget + 60)) python3 -m nvfp4kit tune --tokens 96 112 --budget-s "$budget" --cache-dir "$out/cache" \
  > "$out/tune.txt" 2>&1
tail -5 "$out/tune.txt"
step "bench engine, shipped tables"
bench 96 112 --json "$out/engine_shipped.json" | grep -E "decode batch" | cut -c1-120
step "bench engine, with the 96/112-token cache"
NVFP4KIT_CACHE_DIR=$out/cache bench 96 112 --json "$out/engine_tuned.json" | grep -E "decode batch" | cut -c1-120
