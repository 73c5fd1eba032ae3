#!/usr/bin/env bash
# Session 31's decode attention launch rules measured in one device call (~5 minutes on an H100): key splits by
# waves of resident programs (`choose_num_splits`) and three-stage FP8 sliding tiles, against an older tree in the
# same run: the attention kernels' CUDA tests, decode attention alone (tile variants at their own split counts),
# `bench engine` decode at batch 1-112 and the greedy tokens of both trees.
# Usage on the GPU machine from the repository root, OLD an older checkout holding src/ and scripts/ (e.g. from
# `git archive 056e665 src scripts | tar -x -C old`):
#   bash scripts/gpu_attention_waves.sh OUT_DIR OLD ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
old=${2:?an older checkout}
batches=${3:-1 16 64 96 112}
export PYTHONUNBUFFERED=1
mkdir -p "$out/new" "$out/old"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "attention CUDA tests"
TRITON_INTERPRET=0 PYTHONPATH=$PWD/src timeout 150 python3 -m pytest tests/kernels/test_paged_attention.py \
  tests/kernels/test_prefill_attention.py tests/kernels/test_attention_launch.py -q -p no:cacheprovider 2>&1 | tail -3
step "decode attention alone: new tree with variants, old tree's defaults"
PYTHONPATH=$PWD/src timeout 200 python3 scripts/gpu_decode_attention_check.py --batches $batches \
  --json "$out/new/attention.json" 2>&1 | grep "^|"
(cd "$old" && PYTHONPATH=$old/src timeout 100 python3 scripts/gpu_decode_attention_check.py --batches $batches \
  --defaults-only --json "$out/old/attention.json" 2>&1 | grep "^|")
for tree in new old; do
  src=$PWD/src; [ "$tree" = old ] && src=$old/src
  step "bench engine, $tree tree"
  PYTHONPATH=$src timeout 200 python3 -m nvfp4kit bench engine --decode-batches $batches --context 816 \
    --kv-dtype fp8_e4m3 --max-model-len 16384 --prefill 1024 --baseline none --json "$out/$tree/engine.json" 2>&1 |
    grep -E "decode batch|compiled" | cut -c1-160
done
step "greedy tokens: old tree, then the new one against it"
PYTHONPATH=$old/src timeout 200 python3 scripts/gpu_decode_variants.py --out "$out/old" --variants d:1 --batches 1 \
  2>&1 | grep -E "greedy|Error" | tail -2
PYTHONPATH=$PWD/src timeout 200 python3 scripts/gpu_decode_variants.py --out "$out/new" --variants d:1 --batches 1 \
  --expect-tokens "$out/old/decode_variants.json" 2>&1 | grep -E "greedy|expect|Error" | tail -3
