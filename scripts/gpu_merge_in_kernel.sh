#!/usr/bin/env bash
# The split merge inside the decode attention kernel (`attention_launch.MERGE_IN_KERNEL`, off until timed) against
# its own launch, in one device call (~4 minutes on an H100): the attention CUDA tests, decode attention alone with
# both (`--merge`), then `bench engine` decode at batch 1-64 with the default (a merge launch) and with the flag on.
# Usage on the GPU machine from the repository root: bash scripts/gpu_merge_in_kernel.sh OUT_DIR ["BATCHES"]
set -u -o pipefail
out=${1:?out dir}
batches=${2:-1 4 16 64}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
step "attention CUDA tests"
TRITON_INTERPRET=0 timeout 150 python3 -m pytest tests/kernels/test_paged_attention.py -q -p no:cacheprovider -rf \
  --tb=line 2>&1 | tail -4
step "decode attention alone, merge in the kernel and as a launch"
timeout 200 python3 scripts/gpu_decode_attention_check.py --batches $batches --defaults-only --merge \
  --json "$out/attention.json" 2>&1 | grep "^|"
for merge in False True; do
  step "bench engine, MERGE_IN_KERNEL=$merge"
  timeout 200 python3 -c "
import sys
from nvfp4kit.kernels import attention_launch
attention_launch.MERGE_IN_KERNEL = $merge
from nvfp4kit.cli import main
sys.exit(main(sys.argv[1:]))" bench engine --decode-batches $batches --context 816 --kv-dtype fp8_e4m3 \
    --max-model-len 16384 --prefill 1024 --baseline none --json "$out/engine_merge_$merge.json" 2>&1 |
    grep -E "decode batch|compiled" | cut -c1-140
done
