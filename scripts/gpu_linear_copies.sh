#!/usr/bin/env bash
# BF16 copies of the attention and dense-MLP weights, read by cuBLAS at steps of >= LINEAR_COPY_MIN_M tokens
# (`--linear-copies`), in one device call (~6 minutes on an H200): the W4A16 linears against BF16 cuBLAS at
# 16-128 tokens (where the copies should take over), then `bench engine` decode and prefill without and with
# the copies, then (COPY_MIN="32 64") with the copies from other token counts; KERNELS=0 skips the first step.
# Usage on the GPU machine from the repository root: bash scripts/gpu_linear_copies.sh OUT_DIR ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
batches=${2:-1 16 32 64 96 112}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
if [ "${KERNELS:-1}" = 1 ]; then  # KERNELS=0: the engine runs only
  step "W4A16 linears against BF16 cuBLAS"
  timeout 150 python3 -m nvfp4kit bench kernels --ops dense_qkv_sliding dense_qk_global dense_o_sliding \
    dense_o_global dense_gate_up dense_down --m 16 24 32 48 64 96 128 --json "$out/kernels.json" --quiet 2>&1 |
    tail -50
fi
engine() {  # $1: a name, $2: LINEAR_COPY_MIN_M, the rest: more bench options
  local name=$1 min_m=$2; shift 2
  step "bench engine, $name"
  timeout 240 python3 -c "
import sys
from nvfp4kit.kernels import thresholds
thresholds.LINEAR_COPY_MIN_M = $min_m
from nvfp4kit.cli import main
sys.exit(main(sys.argv[1:]))" bench engine --decode-batches $batches --context 816 --kv-dtype fp8_e4m3 \
    --max-model-len 16384 --prefill ${PREFILL:-1024 8192} --baseline none --json "$out/engine_$name.json" "$@" 2>&1 |
    grep -E "decode batch|prefill|copies|compiled" | cut -c1-150
}
engine w4a16 48 --linear-copies off
engine copies48 48 --linear-copies on
for m in ${COPY_MIN:-}; do engine "copies$m" "$m" --linear-copies on; done
