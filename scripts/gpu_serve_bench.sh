#!/usr/bin/env bash
# The serving measurement of issue 17 on one GPU: `nvfp4kit serve --random-weights 26b-a4b` (FP8 KV, CUDA graphs,
# the start-up warm-up) started here, then `nvfp4kit bench serve` against it. First a server with
# --no-prefix-caching: (b') 8-turn chats of ~1K-token user messages, the baseline of the multi-turn comparison
# (its start pays Triton's cold compiles; the second start reads them from the disk cache). Then the server with
# the prefix cache: (b) the same chats, (c) n=4 on a 4K prompt (prefill tokens from /metrics), (a) SGLang's
# random workload (~610 in / ~422 out) at concurrency 100 and 1; a level starts only before budget_s (540 s).
# After each level the Triton compile counters are read from /metrics (a compile after the warm-up stalled
# every stream). Writes $OUT/serve-<card>.json (one row per level, partial if a step fails) and prints a compact
# table last. About 6 minutes on an H200.
# Usage from the repository root (wheels for what the device lacks in .whl/, installed when present):
#   bash scripts/gpu_serve_bench.sh OUT_DIR          # the GPU run
#   bash scripts/gpu_serve_bench.sh OUT_DIR --smoke  # the same steps on the CPU demo model, tiny counts
# Environment: C1_PROMPTS / C100_PROMPTS (default 32 / 1000: SGLang's cookbook anchor ran 1,000 prompts at concurrency
# 100; fewer weigh the ramp and the tail of the last requests more), CHUNK (--max-num-batched-tokens; default the card's),
# SERVE_EXTRA (more serve options, e.g. --no-warmup), LEVELS (the levels to run, default
# "turns_uncached turns_cached n4 c100 c1"; without turns_uncached no uncached server is started).
set -u -o pipefail
out=${1:?out dir}
mode=${2:-gpu}
mkdir -p "$out"
if ! python3 -c "import fastapi, uvicorn" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NVFP4KIT_CACHE_DIR=$out/cache
began=$(date +%s)
step() { echo "== $1 ($(date +%T), +$(( $(date +%s) - began )) s)"; }

if [ "$mode" = --smoke ]; then  # CPU: the demo model, counts that only prove every step runs
  card=cpu-smoke
  serve=(--device cpu --max-model-len 2048 --max-num-seqs 8)
  c1=(--input-len 24 --output-len 4 --num-prompts 2); c100=(--concurrency 4 --input-len 24 --output-len 4 --num-prompts 8)
  nfour=(--input-len 200 --output-len 2 --num-prompts 2); turns=(--turns 3 --input-len 24 --output-len 3 --num-prompts 2 --warmup 1 --extra-body '{"logprobs": true}')
  health=300; level_timeout=300
else
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  serve=(--random-weights 26b-a4b --device cuda --kv-cache-dtype fp8_e4m3 --max-model-len 16384 --max-num-seqs 128)
  # sessions 4-6 ran with 2048 tokens a step; CHUNK=2048 repeats that, unset the card's default (8192 on an H200)
  [ -n "${CHUNK:-}" ] && serve+=(--max-num-batched-tokens "$CHUNK")
  c1=(--input-len 610 --input-range 0.2 --output-len 422 --output-range 0.2 --num-prompts "${C1_PROMPTS:-32}"
      --warmup 4)
  c100=(--concurrency 100 --input-len 610 --input-range 0.2 --output-len 422 --output-range 0.2
        --num-prompts "${C100_PROMPTS:-1000}" --warmup 16)
  nfour=(--input-len 4096 --output-len 32 --num-prompts 4)
  # logprobs: a chunk per token even when a random model's reply is markup the chat parsers hold back
  turns=(--turns 8 --input-len 1024 --output-len 48 --num-prompts 3 --warmup 1 --extra-body '{"logprobs": true}')
  health=420; level_timeout=240  # the first start compiles every kernel variant (cold Triton cache)
fi
read -r -a extra <<<"${SERVE_EXTRA:-}"
serve+=("${extra[@]}")
result=$out/serve-$card.json
rows=$out/rows
mkdir -p "$rows"
log=$out/server.log
server_pid=""

start_server() {  # $1: a name for the log; the rest: more serve options
  local name=$1; shift
  port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  url=http://127.0.0.1:$port
  step "start server ($name): serve ${serve[*]} $*"
  python3 -m nvfp4kit serve "${serve[@]}" "$@" --host 127.0.0.1 --port "$port" >"$log.$name" 2>&1 &
  server_pid=$!
  for _ in $(seq $((health * 2))); do
    if python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url/health" \
      2>/dev/null; then
      step "server ready"
      grep -h -E "warm-up:|captured (decode|prefill) CUDA graphs" "$log.$name" | sed 's/^/   /' | tee "$rows/server_$name.txt"
      return 0
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
    sleep 0.5
  done
  echo "server did not come up:"; tail -30 "$log.$name"; return 1
}

stop_server() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=""
}
trap stop_server EXIT

compiles() {  # the Triton compile, preemption and engine-step counters of /metrics as JSON ({} when none)
  python3 - "$url/metrics" <<'PY'
import json, sys, urllib.request
try:
    text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
except OSError:
    text = ""
found = {}
for line in text.splitlines():  # compile counters, preemptions, engine steps and their seconds by kind
    name, _, value = line.rpartition(" ")
    if name.startswith(("nvfp4kit_kernel_compiles", "nvfp4kit_preemptions", "nvfp4kit_engine_step")):
        found[name.removeprefix("nvfp4kit_")] = float(value)
print(json.dumps(found))
PY
}

level() {  # $1: row name; the rest: bench serve options
  local name=$1; shift
  case " ${LEVELS:-turns_uncached turns_cached n4 c100 c1} " in *" $name "*) ;; *) return 0 ;; esac
  if [ $(( $(date +%s) - began )) -gt "${budget_s:-540}" ]; then  # the device lends 10 minutes a command
    echo "skipping $name: $(( $(date +%s) - began )) s spent"; return 0
  fi
  step "bench $name: $*"
  compiles >"$rows/$name.compiles_before.json"
  timeout "$level_timeout" python3 -m nvfp4kit bench serve --base-url "$url" --no-progress --json "$rows/$name.json" "$@" \
    2>&1 | grep -v -E "^(INFO|DEBUG)" | tail -4
  compiles | tee "$rows/$name.compiles.json"
  python3 scripts/gpu_serve_report.py "$result" "$rows" --card "$card" --server "serve ${serve[*]}" --quiet
}

# without the prefix cache first: the multi-turn baseline; its start compiles the kernels for the second one
if [[ " ${LEVELS:-turns_uncached} " == *" turns_uncached "* ]] && start_server uncached --no-prefix-caching; then
  level turns_uncached --endpoint chat "${turns[@]}"
  stop_server
fi
if start_server cached; then
  level turns_cached --endpoint chat "${turns[@]}"
  level n4 --n 4 "${nfour[@]}"
  level c100 "${c100[@]}"
  level c1 "${c1[@]}"
  stop_server
fi
grep -h -c "compiled a kernel variant while serving" "$log.uncached" "$log.cached" 2>/dev/null \
  | paste -sd' ' | sed 's/^/compile warnings in the server logs (uncached cached): /'
grep -h "compiled a kernel variant while serving" "$log.cached" 2>/dev/null | head -5 | cut -c1-300
tail -3 "$log.cached" 2>/dev/null
step "done"
python3 scripts/gpu_serve_report.py "$result" "$rows" --card "$card" --server "serve ${serve[*]}"
