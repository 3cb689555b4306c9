#!/usr/bin/env bash
# The side-by-side throughput table of docs/benchmarks.md: nanoflow (default flags) against vLLM's CPU engine
# (best of its token budgets) on the same requests, three workloads, plus the async ablation and a profile.
#   make bench-deps && bash benchmarks/vs_vllm.sh [OUT_DIR]        (~30 min on 2 cores; vLLM starts take minutes)
# VLLM_TOKEN_BUDGETS (default 1024,2048) sets vLLM's budgets for all three; VLLM_BUDGETS_CONST256 / _CONST64 /
# _SHAREGPT one workload's (e.g. only the best budget of an earlier run, to save its engine starts). REPEATS=N
# (default 1) runs const x 256 as N interleaved rounds of ours and vLLM (`--repeats`: the median ratio).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/vs-vllm/$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
NF=.venv/bin/nanoflow
BUDGETS=${VLLM_TOKEN_BUDGETS:-1024,2048}
{ date; lscpu | grep -E "Model name|Flags" | sed 's/Flags:/flags:/'; } > "$OUT/machine.txt"
run() {  # name, args...
  local name=$1; shift
  echo "== $name: nanoflow bench offline $*" | tee "$OUT/$name.log"
  "$NF" bench offline "$@" --json "$OUT/$name.json" 2>&1 | grep -v "it/s\]\|req/s\]" | tee -a "$OUT/$name.log"
}
run const256 --workload const:128/128 --num-requests 256 --compare vllm --vllm-token-budgets "${VLLM_BUDGETS_CONST256:-$BUDGETS}" \
  $([ "${REPEATS:-1}" -gt 1 ] && echo "--repeats $REPEATS" || echo --compare-async)
run const64 --workload const:128/128 --num-requests 64 --compare vllm,hf --hf-batch-sizes 64 --vllm-token-budgets "${VLLM_BUDGETS_CONST64:-$BUDGETS}"
run sharegpt64 --workload sharegpt --max-input 512 --max-output 512 --num-requests 64 --compare vllm \
  --vllm-token-budgets "${VLLM_BUDGETS_SHAREGPT:-$BUDGETS}"
run sharegpt64-profile --workload sharegpt --max-input 512 --max-output 512 --num-requests 64 --profile --no-async
echo "results in $OUT"
