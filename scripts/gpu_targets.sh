#!/usr/bin/env bash
# Every issue target timed on the card in hand, in one device call (about 6-7 minutes; H200 rarely comes, so take
# all of it when it does): `bench engine` (issue 14: decode batch 1 / 16 / 64 greedy, sampled batch 16, the FP8
# lm_head rows; issue 15: prefill 8K and 32K), the MoE layer at 1 and 16 tokens (`bench kernels`, issue 14), then
# `scripts/gpu_serve_bench.sh` at concurrency 100 (1,000 prompts) and 1 (issue 17). Writes bench-<card>.json,
# kernels-<card>.json and serve/serve-<card>.json under OUT_DIR and prints each stage's table.
# Usage on the GPU machine from the repository root (carry .whl: the serve wheels the image lacks, fetched here by
# `bash scripts/fetch_serve_wheels.sh`):
#   bash scripts/gpu_targets.sh OUT_DIR
set -u -o pipefail
out=${1:?out dir}
mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVFP4KIT_CACHE_DIR=$out/cache
began=$(date +%s)
step() { echo "== $1 ($(date +%T), +$(( $(date +%s) - began )) s)"; }
step "engine: decode and prefill on $card"
timeout 240 python3 -m nvfp4kit bench engine --decode-batches 1 16 64 --sampled-batches 16 --context 816 \
  --kv-dtype fp8_e4m3 --max-model-len 40000 --prefill 8192 32768 --fp8-lm-head --baseline none \
  --json "$out/bench-$card.json" 2>"$out/engine.log" | grep -E "^(scenario|decode|prefill|ttft|[A-Z])" | head -16
step "MoE layer at 1 and 16 tokens"
timeout 90 python3 scripts/gpu_kernels_bench.py kernels --ops moe --m 1 16 --json "$out/kernels-$card.json" --quiet \
  2>/dev/null | tail -4
step "serving: concurrency 100 and 1"
# a level starts only while the whole call stays inside the device's 10 minutes
budget_s=$(( 560 - ($(date +%s) - began) )) LEVELS="c100 c1" bash scripts/gpu_serve_bench.sh "$out/serve" 2>&1 | tail -14
rm -rf "$out/cache" "$out/serve/cache"
step "done"
