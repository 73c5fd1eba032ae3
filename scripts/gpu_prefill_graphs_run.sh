#!/usr/bin/env bash
# One device call for the prefill CUDA graphs and the admission batching (issue 17), written in session 9 without a
# GPU: (1) the GPU tests (prefill graphs give the eager engine's tokens; decode graphs unchanged), (2) the mixed
# step of `scripts/gpu_mixed_step_profile.py` eager and with graphs of 768/1024/2048 tokens (wall vs GPU time: the
# graphs should bring a 96-decode + 1-prompt step from ~100 ms to about its ~35 ms of kernels). About 5 minutes.
# Usage on the GPU machine from the repository root (pytest wheels in ../.whl_pytest when the card lacks pytest):
#   bash scripts/gpu_prefill_graphs_run.sh OUT_DIR
# Then serving, one call each (scripts/gpu_serve_bench.sh): the default (admission delay 16, no graphs), with
# SERVE_EXTRA="--prefill-graphs 1024,2048", and with SERVE_EXTRA="--admission-delay 0"; LEVELS="c100 c1".
set -u -o pipefail
out=${1:?out dir}
mkdir -p "$out"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVFP4KIT_CACHE_DIR=/tmp/nvfp4kit-cache
if ! python3 -c "import pytest" 2>/dev/null && [ -d ../.whl_pytest ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/pytest-site ../.whl_pytest/*.whl && \
    export PYTHONPATH=/tmp/pytest-site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
step() { echo "== $1 ($(date +%T))"; }
step "GPU tests"
timeout 240 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" tests/gpu/test_prefill_graphs_cuda.py \
  tests/gpu/test_decode_graphs.py 2>&1 | tail -15 | tee "$out/tests.log"
step "mixed step, eager"
timeout 240 python3 scripts/gpu_mixed_step_profile.py --arrivals 1 2 --repeats 3 --out "$out/eager" 2>&1 \
  | grep -E "^(decode|[0-9]+ prompt|host split|scenario)" | tee "$out/eager.log"
step "mixed step, prefill graphs 768 1024 2048"
timeout 300 python3 scripts/gpu_mixed_step_profile.py --arrivals 1 2 --repeats 3 --prefill-graphs 768 1024 2048 \
  --out "$out/graphs" 2>&1 | grep -E "^(decode|[0-9]+ prompt|host split|scenario)|captured" | tee "$out/graphs.log"
step "bench compile's static records against real launches on this card (session 10)"
timeout 180 python3 scripts/gpu_compile_check_validate.py --json "$out/compile_validate.json" 2>&1 | tail -40 \
  | tee "$out/compile_validate.log"
step "done"
