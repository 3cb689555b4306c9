"""Where a step's time goes: labelled ranges for torch.profiler (free when not profiling) and a
breakdown table. Used by `nanoflow bench offline --profile`."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

_active = False


def set_active(flag: bool) -> None:
    global _active
    _active = flag


def region(name: str):
    """A named profiler range while profiling; a no-op context otherwise (the hot path stays cheap)."""
    return torch.profiler.record_function(name) if _active else contextlib.nullcontext()


# Profiler event name -> group in the breakdown. Labelled regions come first: they contain aten ops,
# and only self time is summed, so nothing is counted twice.
_GROUPS = (("nanoflow::gemm_bf16", "GEMM (linear layers)"), ("nanoflow::gemm_f32", "GEMM (linear layers)"),
           ("nanoflow::", None), ("aten::mm", "GEMM (linear layers)"),
           ("aten::addmm", "GEMM (linear layers)"),
           ("mkldnn::_linear_pointwise", "GEMM (linear layers)"), ("aten::linear", "GEMM (linear layers)"),
           ("aten::_scaled_dot_product", "prefill attention (SDPA)"), ("aten::index_copy_", "KV cache write"))


def _group(name: str) -> str:
    for prefix, group in _GROUPS:
        if name.startswith(prefix):
            return group or name[len(prefix):]
    return "other torch ops"


def breakdown(prof, wall_s: float) -> list[tuple[str, float, float]]:
    """(group, seconds, % of wall) rows from a torch.profiler run, largest first; the remainder of
    the wall time (Python, scheduling, detokenization, idle threads) is its own row."""
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        totals[_group(ev.key)] += ev.self_cpu_time_total / 1e6
    totals["python + scheduler + other (untraced)"] = max(0.0, wall_s - sum(totals.values()))
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(name, secs, 100.0 * secs / wall_s) for name, secs in rows]
