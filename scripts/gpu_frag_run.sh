#!/usr/bin/env bash
# One device call for the fragment kernels (issue 14): their CUDA tests, the per-shape probes (dense linears against
# the tuned tiles, last), the expert-grouped MoE against the engine's MoE, and the engine's decode with the fragment
# kernels off, at the defaults, and with the grouped MoE (three processes: the switches are read at import),
# greedy tokens required equal to the first's. Prints each stage's table.
# Usage on the GPU machine from the repository root:
#   bash scripts/gpu_frag_run.sh OUT_DIR ["DENSE_M"] ["MOE_M"] ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
dense_m=${2-1 4 8 16}
moe_m=${3-8 16 32 64 96 128}
batches=${4:-1 4 8 16 64}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out/off" "$out/default" "$out/grouped"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "fragment kernel tests on the card"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests/gpu/test_gemv_mma_cuda.py 2>&1 | tail -4
if [ -n "$moe_m" ]; then
  step "grouped MoE probe (M = $moe_m)"
  timeout 150 python3 scripts/gpu_moe_grouped_probe.py --m $moe_m --json "$out/moe_grouped.json" 2>&1 | grep -v Warn | tail -9
fi
V="python3 scripts/gpu_decode_variants.py --variants 0:1 --steps 32 --batches $batches"
step "engine decode: fragment kernels off"
NVFP4KIT_FRAG_GEMV=0 timeout 100 $V --out "$out/off" 2>"$out/off/log.txt" | tail -7
step "engine decode: defaults"
timeout 100 $V --out "$out/default" --expect-tokens "$out/off/decode_variants.json" 2>"$out/default/log.txt" | tail -8
step "engine decode: grouped MoE up to 128 tokens"
NVFP4KIT_MOE_GROUPED_TOKENS=128 timeout 100 $V --out "$out/grouped" --expect-tokens "$out/off/decode_variants.json" \
  2>"$out/grouped/log.txt" | tail -8
if [ -n "$dense_m" ]; then
  step "dense probe (M = $dense_m)"
  timeout ${DENSE_S:-170} python3 scripts/gpu_gemv_mma_probe.py --m $dense_m --json "$out/probe.json" 2>&1 | grep "^|" | tail -40
fi
step "done"
