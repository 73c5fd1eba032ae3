#!/usr/bin/env bash
# One device call for the fragment GEMV (issue 14): its CUDA tests, the per-shape probe against the tuned path, then
# the engine's decode with NVFP4KIT_FRAG_GEMV=0 and =1 (two processes: the switch is read at import) with the same
# greedy tokens required, and a profile of one batch-1 step each.
# Usage on the GPU machine from the repository root:  bash scripts/gpu_frag_run.sh OUT_DIR [probe M...]
set -u -o pipefail
out=${1:?out dir}; shift
ms=${*:-1 4 8 16}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out/off" "$out/on"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "fragment GEMV tests on the card"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests/gpu/test_gemv_mma_cuda.py 2>&1 | tail -15
step "probe (M = $ms)"
timeout 170 python3 scripts/gpu_gemv_mma_probe.py --m $ms --json "$out/probe.json" 2>&1 | grep -v Warning | tail -40
step "engine decode, fragment GEMV off"
NVFP4KIT_FRAG_GEMV=0 timeout 130 python3 scripts/gpu_decode_variants.py --out "$out/off" --variants 0:1 \
  --batches 1 4 8 16 --steps 48 --profile 2>"$out/off/profile.txt" | tail -6
step "engine decode, fragment GEMV on"
NVFP4KIT_FRAG_GEMV=1 timeout 130 python3 scripts/gpu_decode_variants.py --out "$out/on" --variants 0:1 \
  --batches 1 4 8 16 --steps 48 --profile --expect-tokens "$out/off/decode_variants.json" 2>"$out/on/profile.txt" | tail -7
for d in off on; do echo "-- profile $d"; grep -v Warning "$out/$d/profile.txt" | head -24 | cut -c1-120; done
if [ -n "${C100_PROFILE:-}" ]; then
  step "the concurrency-100 decode step (batch 96, 800-token context), default kernels"
  timeout 150 python3 -m nvfp4kit bench engine --decode-batches 96 --context 800 --steps 16 --prefill 512 \
    --baseline none --profile --json "$out/c100.json" 2>"$out/c100.log" | tail -4
  grep -A30 "decode step" "$out/c100.log" | cut -c1-120 | head -34
fi
step "done"
