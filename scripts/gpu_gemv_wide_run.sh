#!/usr/bin/env bash
# One device call for the wide fragment GEMV (kernels/gemv_mma_wide.py, 17-128 tokens): its CUDA tests, the probe
# against the shipped configs (which writes its winners into OUT/cache), then decode at BATCHES with the shipped
# table and with that cache (two processes; greedy tokens must match).
# Usage on the GPU machine from the repository root:
#   bash scripts/gpu_gemv_wide_run.sh OUT_DIR ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
batches=${2:-32 48 64 96}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "CUDA tests of the wide fragment GEMV"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu/test_gemv_mma_wide_cuda.py -x 2>&1 | tail -4
step "probe: shipped vs wide fragment configs"
NVFP4KIT_CACHE_DIR="$out/cache" timeout 300 python3 scripts/gpu_gemv_wide_probe.py --out "$out" --ms ${MS:-32 64 96} \
  2>"$out/probe.err" | grep -v '^{' | tail -36
tail -3 "$out/probe.err"
if grep -q "cache with 0 entries" <(tail -1 "$out/probe.err" 2>/dev/null; python3 -c "
import json,sys; d=json.load(open('$out/gemv_wide_probe.json'));
print('cache with 0 entries' if not any(r.get('best_frag_us', 1e9) < r['shipped_us'] for r in d['rows']) else 'wins')"); then
  step "no wide config beat the shipped one: no decode runs"; exit 0
fi
step "decode: shipped table"
timeout 170 python3 scripts/gpu_decode_variants.py --out "$out/shipped" --variants 0:1 --batches $batches \
  2>"$out/shipped.err" | tail -6
step "decode: with the probe's cache"
NVFP4KIT_CACHE_DIR="$out/cache" timeout 170 python3 scripts/gpu_decode_variants.py --out "$out/wide" --variants 0:1 \
  --batches $batches --expect-tokens "$out/shipped/decode_variants.json" 2>"$out/wide.err" | tail -6
step "done"
