#!/usr/bin/env bash
# Serving variants side by side in one device call: `scripts/gpu_serve_bench.sh` once per variant (each its own
# server with those extra `serve` options), the levels of LEVELS (default "c100"), each variant's rows copied to
# OUT/<name>.json and its compact table printed. Three variants of c100 at the anchor's 1,000 prompts take about
# 7 minutes on an H100 (servers after the first start on a warm Triton cache). Short runs (300-400 prompts) weigh
# the first burst of 100 prompts, admitted in full 8K-token steps, far more than a long run does (session 33).
# Usage from the repository root:
#   bash scripts/gpu_serve_ab.sh OUT "default=" "delay96=--admission-delay 96" ["delay16=--admission-delay 16"]
# CPU check of the mechanics (the demo model, tiny counts): AB_MODE=--smoke bash scripts/gpu_serve_ab.sh OUT "a=" "b=--admission-delay 2"
set -u -o pipefail
out=${1:?out dir}; shift
[ $# -gt 0 ] || { echo "give at least one NAME=OPTIONS variant"; exit 2; }
mkdir -p "$out"
export LEVELS=${LEVELS:-"c100"} C100_PROMPTS=${C100_PROMPTS:-1000} C1_PROMPTS=${C1_PROMPTS:-12}
per_variant=$(( ${AB_BUDGET_S:-540} / $# ))
for variant in "$@"; do
  name=${variant%%=*}; options=${variant#*=}
  echo "== variant $name: ${options:-(defaults)} ($(date +%T))"
  SERVE_EXTRA="$options" budget_s=$(( per_variant - 90 )) bash scripts/gpu_serve_bench.sh "/tmp/serve-ab/$name" ${AB_MODE:-} \
    >"/tmp/serve-ab-$name.log" 2>&1
  tail -14 "/tmp/serve-ab-$name.log"
  cp /tmp/serve-ab/"$name"/serve-*.json "$out/$name.json" 2>/dev/null || echo "   (no rows for $name)"
done
