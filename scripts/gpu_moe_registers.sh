#!/usr/bin/env bash
# Register caps on the mid-size MoE tiles, in one device call (~7 minutes): `gpu_moe_registers.py` times the
# caps per token count and writes the winners as a tuning cache table, then `bench engine` decode at those batch
# sizes without the table (the shipped configs) and with it, same machine.
# Usage on the GPU machine from the repository root: bash scripts/gpu_moe_registers.sh OUT_DIR ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
batches=${2:-80 96 112 128}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "MoE register caps"
timeout 200 python3 scripts/gpu_moe_registers.py --m $batches --out "$out/moe_registers.json" \
  --cache-dir "$out/caps" 2>&1 | grep -v "^  M=" | tail -60
engine() {  # $1: a name, $2: the tuning cache folder
  step "bench engine, $1"
  NVFP4KIT_CACHE_DIR=$2 timeout 170 python3 -m nvfp4kit bench engine --decode-batches $batches --context 816 \
    --kv-dtype fp8_e4m3 --max-model-len 16384 --prefill 1024 --baseline none --json "$out/engine_$1.json" 2>&1 |
    grep -E "decode batch|prefill|compiled|Error|error" | cut -c1-150
}
engine shipped "$out/none"
[ -d "$out/caps" ] && engine caps "$out/caps"
[ $SECONDS -lt 400 ] && engine shipped_again "$out/none"
