#!/usr/bin/env bash
# Does tuning the dense linears at serving's batch sizes pay in the engine? One device call: `nvfp4kit tune
# --kernels linear` at TOKENS into a fresh cache (the mid-size tiles of tuning/search.py, 128-row blocks included),
# then `bench engine` decode at BATCHES (816-token contexts: the c100 workload's middle, FP8 KV, CUDA graphs; the
# first run also profiles one step of each) with the shipped table and with that cache. About 7-9 minutes.
# Usage on the GPU machine from the repository root:
#   bash scripts/gpu_decode_tune_ab.sh OUT_DIR ["TOKENS" ["BATCHES"]]
set -u -o pipefail
out=${1:?out dir}
tokens=${2:-96 128}
batches=${3:-64 96 112}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out/tuned" "$out/shipped"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step() { echo "== $1 ($(date +%T))"; }
bench() {  # $1: cache folder, $2: json name, then more options
  local cache=$1 name=$2; shift 2
  NVFP4KIT_CACHE_DIR="$cache" timeout 230 python3 -m nvfp4kit bench engine --decode-batches $batches --context 816 \
    --kv-dtype fp8_e4m3 --max-model-len 16384 --prefill 1024 --baseline none --json "$out/$name.json" "$@" 2>&1 |
    grep -E "decode batch|prefill|one decode step| ms +[0-9]+x" | cut -c1-150
}
step "bench engine, shipped table (and the kernels of one step at each batch)"
bench "$out/shipped" engine_shipped --profile
step "tune --kernels linear --tokens $tokens"
timeout 200 python3 -m nvfp4kit tune --kernels linear --tokens $tokens --cache-dir "$out/tuned" --budget-s 170 \
  --log 2>"$out/tune.log" | tail -1
grep -E "^linear " "$out/tune.log" | cut -c1-200 | tail -24
step "bench engine, tuned cache"
bench "$out/tuned" engine_tuned
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {name: {r["batch"]: r for r in json.load(open(f"{out}/engine_{name}.json"))["rows"] if r["scenario"] == "decode"}
        for name in ("shipped", "tuned")}
print("| batch | shipped tok/s | GPU ms | tuned tok/s | GPU ms | tuned/shipped |")
print("|---|---|---|---|---|---|")
for b, s in sorted(rows["shipped"].items()):
    t = rows["tuned"].get(b)
    if t:
        print(f"| {b} | {s['tokens_per_s']:.1f} | {s['gpu_ms_per_step']:.2f} | {t['tokens_per_s']:.1f} |"
              f" {t['gpu_ms_per_step']:.2f} | {t['tokens_per_s'] / s['tokens_per_s']:.3f} |")
PY
step "done"
