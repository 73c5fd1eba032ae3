#!/usr/bin/env bash
# One device call for the decode work (issue 14): kernel correctness on the card, tuning for the 26B-A4B shapes,
# kernels tuned vs heuristic vs BF16 cuBLAS, the LLM.close check, and engine decode rows.
# Usage on the GPU machine from the repository root: bash scripts/gpu_decode_run.sh OUT_DIR [TOKENS...]
set -u -o pipefail
out=${1:?out dir}; shift
tokens=${*:-1 16 64}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVFP4KIT_CACHE_DIR=$out/cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "kernel tests on the card"
timeout 150 python3 -m pytest tests/kernels/test_fused_moe.py -q -p no:cacheprovider 2>&1 | tail -2
timeout 60 python3 scripts/gpu_llm_close.py 2>&1 | grep -v INFO | tail -2
step "tune ($tokens)"
timeout 330 python3 -m nvfp4kit tune gemma-4-26b-a4b --tokens $tokens --budget-s 300 --log 2>"$out/tune.log" | tail -1
grep -E "^(linear|moe) " "$out/tune.log" | tail -30
step "bench kernels"
timeout 200 python3 -m nvfp4kit bench kernels --m $tokens --json "$out/kernels.json" --quiet 2>&1 | tail -25
step "done"
