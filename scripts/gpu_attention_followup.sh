#!/usr/bin/env bash
# Session 30's untimed attention changes, measured in one device call (~6-8 minutes on an H100): the attention
# kernels' CUDA tests (fp32 prefill with libdevice sin/cos, the MUFU probe), decode attention alone with the
# register-capped defaults beside the uncapped tiles and other split counts, `bench engine` decode against an older
# tree in the same run, and the greedy tokens of the two trees (derived keys now rotate with MUFU sin/cos). Batch 1
# is in the attention rows for its split counts: `choose_num_splits` keeps 128 keys a split, so a batch-1 global
# layer at 816 tokens runs 12 programs of eight or nine 16-key tiles each (decode attention was 0.3 ms of a 2.98 ms
# batch-1 step in session 19).
# Usage on the GPU machine from the repository root, OLD_SRC an older tree's src folder (e.g. from
# `git archive 00260f8 src | tar -x -C old`):
#   bash scripts/gpu_attention_followup.sh OUT_DIR OLD_SRC ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
old=${2:?the src folder of an older tree}
batches=${3:-1 16 64 96 112}
new=$PWD/src
export PYTHONUNBUFFERED=1
mkdir -p "$out/new" "$out/old"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "attention CUDA tests"
TRITON_INTERPRET=0 PYTHONPATH=$new timeout 150 python3 -m pytest tests/kernels/test_paged_attention.py \
  tests/kernels/test_prefill_attention.py -q -p no:cacheprovider 2>&1 | tail -3
step "decode attention alone, variants"
PYTHONPATH=$new timeout 200 python3 scripts/gpu_decode_attention_check.py --batches 1 64 96 112 \
  --json "$out/attention.json" 2>&1 | grep "^|"
for tree in new old; do
  src=$new; [ "$tree" = old ] && src=$old
  step "bench engine, $tree tree"
  PYTHONPATH=$src timeout 200 python3 -m nvfp4kit bench engine --decode-batches $batches --context 816 \
    --kv-dtype fp8_e4m3 --max-model-len 16384 --prefill 1024 --baseline none --json "$out/$tree/engine.json" 2>&1 |
    grep -E "decode batch" | cut -c1-140
done
step "greedy tokens: old tree, then the new one against it"
PYTHONPATH=$old timeout 200 python3 scripts/gpu_decode_variants.py --out "$out/old" --variants d:1 --batches 1 2>&1 |
  grep -E "greedy|Error" | tail -2
PYTHONPATH=$new timeout 200 python3 scripts/gpu_decode_variants.py --out "$out/new" --variants d:1 --batches 1 \
  --expect-tokens "$out/old/decode_variants.json" 2>&1 | grep -E "greedy|expect|Error" | tail -3
