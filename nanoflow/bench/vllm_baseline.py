"""vLLM peer baseline: vLLM's CPU engine on the very same requests, in its own virtualenv.

vLLM pins other versions of our dependencies, so it lives in ``.venv-vllm`` (``make bench-deps``) and runs as a
subprocess of that venv's python (``vllm_runner.py``): one fresh engine per token budget
(``max_num_batched_tokens``, vLLM's equivalent of our dense batch), greedy, EOS ignored, forced output lengths,
timed after a warm-up ``generate``. The best budget is the row; every budget's tok/s is in its ``note``.
When vLLM cannot run here (no venv, import error, crash, timeout), the row says why instead of raising.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from nanoflow.bench.workloads import BenchRequest, throughput_metrics
from nanoflow.env import vllm_venv

RUNNER = Path(__file__).with_name("vllm_runner.py")
DEFAULT_BUDGETS = (256, 1024, 2048)


def default_venv() -> Path:
    """$NANOFLOW_VLLM_VENV, else .venv-vllm at the repository root (where `make bench-deps` creates it)."""
    venv = vllm_venv()
    return Path(venv) if venv else Path(__file__).resolve().parents[2] / ".venv-vllm"


def missing_venv(venv: str | os.PathLike) -> str | None:
    """Why vLLM's virtualenv at ``venv`` cannot be used, or None when it has a python."""
    if (Path(venv) / "bin" / "python").is_file():
        return None
    return f"no vLLM virtualenv at {venv} (run `make bench-deps`)"


def cpu_list(cpus: set[int] | None = None) -> str:
    """The CPUs this process may use as a VLLM_CPU_OMP_THREADS_BIND list, e.g. {0, 1, 2, 5} -> "0-2,5"."""
    ids = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    parts, start = [], None
    for i, c in enumerate(ids):
        if start is None:
            start = c
        if i + 1 == len(ids) or ids[i + 1] != c + 1:
            parts.append(str(c) if c == start else f"{start}-{c}")
            start = None
    return ",".join(parts)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def failure_row(why: str, dtype=None) -> dict:
    """The row of a vLLM that could not run: its name and why, no throughput keys."""
    return {"system": "vLLM", "dtype": _dtype_name(dtype) if dtype is not None else None, "note": why,
            "error": why}


def _tail(path: Path) -> str:
    """The last lines of a vLLM log, errors first (its tracebacks end in the line that says why)."""
    try:
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors[-1] + " | " if errors else "") + " / ".join(lines[-3:])


def _run_budget(python: Path, job: dict, budget: int, workdir: Path, env: dict, timeout_s: float) -> dict:
    """One vLLM engine at one token budget in a subprocess: {"elapsed_s", ...} or {"error": why}."""
    job = {**job, "max_num_batched_tokens": budget, "max_num_seqs": min(job["max_num_seqs"], budget)}
    job_path, out_path, log_path = (workdir / f"{name}-{budget}.{ext}"
                                    for name, ext in (("job", "json"), ("out", "json"), ("vllm", "log")))
    job_path.write_text(json.dumps(job))
    with open(log_path, "w") as log:
        # Its own session, so a timeout can end vLLM's engine-core and worker processes with it.
        try:
            proc = subprocess.Popen([str(python), str(RUNNER), str(job_path), str(out_path)], cwd=workdir,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:  # e.g. a venv whose python is not executable here
            return {"error": f"cannot start {python}: {e}"}
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timed out after {timeout_s:.0f} s (log {log_path})"}
    if rc != 0 or not out_path.is_file():
        return {"error": f"exit code {rc}: {_tail(log_path)} (log {log_path})"}
    out = json.loads(out_path.read_text())
    got, want = out["output_lens"], job["output_lens"]
    if len(got) != len(want):
        return {"error": f"vLLM returned {len(got)} outputs for {len(want)} requests"}
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if bad:
        i, g, w = bad[0]
        return {"error": f"vLLM returned {g} tokens for request {i}, expected {w} ({len(bad)} requests short)"}
    return out


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def vllm_preloads(venv: Path) -> list[str]:
    """What vLLM's CPU install guide preloads for its best speed, where present: tcmalloc (Debian's
    libtcmalloc-minimal4, `make bench-deps` installs it when it can) and the Intel OpenMP its wheel ships."""
    found = [p for p in TCMALLOC if os.path.exists(p)][:1]
    iomp = Path(venv) / "lib" / "libiomp5.so"
    return found + ([str(iomp)] if iomp.exists() else [])


def run_vllm(model_dir: str, requests: list[BenchRequest], dtype, budgets: Sequence[int] = DEFAULT_BUDGETS,
             venv: str | os.PathLike | None = None, max_num_seqs: int = 256, kv_cache_gb: int = 4,
             timeout_s: float = 1800.0) -> dict:
    """vLLM's best throughput over ``budgets`` (max_num_batched_tokens) on ``requests``, as a row with the shared
    metric keys; a row with only ``system`` and ``note`` (why) when vLLM cannot run. Never raises for vLLM's
    own failures. ``dtype`` is our engine's (torch dtype or name), so both run the same precision."""
    # Absolute: the runner starts in another working directory.
    venv = Path(venv).resolve() if venv is not None else default_venv()
    if why := missing_venv(venv):
        return failure_row(why, dtype)
    python = venv / "bin" / "python"
    if not requests:
        raise ValueError("no requests")
    budgets = sorted({int(b) for b in budgets if int(b) >= 1})
    if not budgets:
        raise ValueError("no valid token budget")
    job = {"model": str(model_dir), "dtype": _dtype_name(dtype), "max_num_seqs": max_num_seqs,
           "max_model_len": max(r.input_len + r.output_len for r in requests),
           "requests": [{"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len} for r in requests],
           "output_lens": [r.output_len for r in requests]}
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))  # GiB of KV cache
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list())     # the cores we may use, as ours does
    env.pop("PYTHONPATH", None)  # nothing of our venv may leak into vLLM's
    env.setdefault("LD_PRELOAD", ":".join(vllm_preloads(venv)))
    workdir = Path(tempfile.mkdtemp(prefix="nanoflow-vllm-"))
    per_budget = []
    for b in budgets:
        print(f"vLLM: max_num_batched_tokens={b} (engine start-up and compilation can take minutes) ...",
              file=sys.stderr, flush=True)
        res = _run_budget(python, job, b, workdir, env, timeout_s)
        row = {"max_num_batched_tokens": b}
        if "error" in res:
            row["error"] = res["error"]
        else:
            row.update(throughput_metrics(requests, res["elapsed_s"]), startup_s=res["startup_s"],
                       vllm_version=res["vllm_version"])
        per_budget.append(row)
    note = "; ".join(f"B={r['max_num_batched_tokens']}: " +
                     (f"{r['total_tokens_per_s']:.1f} tok/s" if "error" not in r else f"failed ({r['error']})")
                     for r in per_budget)
    ok = [r for r in per_budget if "error" not in r]
    if len(ok) == len(per_budget):
        shutil.rmtree(workdir, ignore_errors=True)  # the logs stay (in workdir) only when something failed
    if not ok:
        return {**failure_row(f"vLLM failed at every budget: {note}", dtype), "per_budget": per_budget}
    best = max(ok, key=lambda r: r["total_tokens_per_s"])
    keys = ("num_requests", "input_tokens", "output_tokens", "elapsed_s", "total_tokens_per_s",
            "output_tokens_per_s", "requests_per_s")
    return {"system": f"vLLM ({_dtype_name(dtype)})", **{k: best[k] for k in keys}, "dtype": _dtype_name(dtype),
            "max_num_batched_tokens": best["max_num_batched_tokens"], "max_num_seqs": max_num_seqs,
            "vllm_version": best["vllm_version"],
            "note": f"best B={best['max_num_batched_tokens']}; {note}; LD_PRELOAD={env.get('LD_PRELOAD') or '-'}",
            "method": "vLLM CPU engine (own venv, subprocess per budget), greedy, ignore_eos, forced output "
                      "lengths, prompts as token ids; timed generate after a warm-up generate",
            "per_budget": per_budget}
