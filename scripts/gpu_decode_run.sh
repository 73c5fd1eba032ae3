#!/usr/bin/env bash
# One device call for the decode work (issue 14): kernel correctness on the card, tuning for the 26B-A4B shapes
# (into $OUT_DIR/cache), kernels tuned vs heuristic vs BF16 cuBLAS, the LLM.close check, and engine decode rows.
# Usage on the GPU machine from the repository root:
#   bash scripts/gpu_decode_run.sh OUT_DIR "TUNE_TOKENS" "BENCH_TOKENS" [engine]
set -u -o pipefail
out=${1:?out dir}
tune_tokens=${2:-1 16 64}
bench_tokens=${3:-1 16 64}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVFP4KIT_CACHE_DIR=$out/cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "kernel tests on the card"
timeout 120 python3 -m pytest tests/kernels/test_fused_moe.py tests/kernels/test_w4a16_linear.py -q -p no:cacheprovider \
  -k "split or heuristic or graph or replay" 2>&1 | tail -3
timeout 60 python3 scripts/gpu_llm_close.py 2>&1 | grep -v INFO | tail -2
if [ -n "$tune_tokens" ]; then
  step "tune ($tune_tokens)"
  timeout 200 python3 -m nvfp4kit tune gemma-4-26b-a4b --tokens $tune_tokens --budget-s 170 --log 2>"$out/tune.log" | tail -1
  grep -E "^(linear|moe) " "$out/tune.log" | cut -c1-60
fi
step "bench kernels ($bench_tokens)"
timeout 150 python3 -m nvfp4kit bench kernels --m $bench_tokens --json "$out/kernels.json" --quiet 2>&1 | tail -25
if [ "${4:-}" = engine ]; then
  step "bench engine"
  timeout 240 python3 -m nvfp4kit bench engine --decode-batches 1 16 64 --sampled-batches 16 --prefill 8192 \
    --baseline none --fp8-lm-head --profile --json "$out/bench.json" 2>"$out/engine.log" | tail -20
  grep -E "^  (decode|prefill)" "$out/engine.log"; grep -A14 "one batch-1 decode step" "$out/engine.log" | cut -c1-110
fi
step "done"
