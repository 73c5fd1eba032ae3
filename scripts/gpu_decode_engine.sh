#!/usr/bin/env bash
# The engine half of scripts/gpu_decode_run.sh: the LLM.close check and bench engine decode rows (greedy,
# sampled, FP8 head) with the shipped tuned table. Usage: bash scripts/gpu_decode_engine.sh OUT_DIR
set -u -o pipefail
out=${1:?out dir}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVFP4KIT_CACHE_DIR=$out/cache
timeout 60 python3 scripts/gpu_llm_close.py 2>&1 | grep -v INFO | tail -4
timeout 240 python3 -m nvfp4kit bench engine --decode-batches 1 4 16 64 --sampled-batches 1 16 64 --prefill 8192 \
  --baseline none --fp8-lm-head --json "$out/bench.json" 2>"$out/engine.log" | tail -16
