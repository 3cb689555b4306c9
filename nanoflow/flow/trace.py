"""`nanoflow trace`: one step's timeline per execution unit, as Chrome trace JSON and a Gantt PNG.

Events come from `executor.trace` (unit name, NanoTask, start s, end s), recorded by the executors/backends
around every nano-op. Open the JSON in chrome://tracing or https://ui.perfetto.dev; the PNG draws the whole
step and a zoom on one layer, like the paper's pipeline figure (Fig. 6).
"""
from __future__ import annotations

import argparse
import json
import os
import random

KIND_COLORS = {"compute": "#4C72B0", "memory": "#DD8452", "network": "#55A868", "other": "#9A9A9A"}


def _kinds() -> dict[str, str]:
    from nanoflow.flow.ops import layer_operations
    return {o.name: o.kind for o in layer_operations(tp_size=2)}  # every kind, network included


def chrome_trace(events: list, info: dict | None = None) -> dict:
    """Chrome trace-event format: one complete ('X') event per nano-op, one thread row per unit."""
    t0 = min(e[2] for e in events)
    units = list(dict.fromkeys(e[0] for e in events))
    kinds = _kinds()
    out = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": u}} for i, u in enumerate(units)]
    for unit, task, start, end in sorted(events, key=lambda e: e[2]):
        out.append({"name": f"{task.op}#{task.index}", "cat": kinds.get(task.op, "other"), "ph": "X", "pid": 1,
                    "tid": units.index(unit), "ts": (start - t0) * 1e6, "dur": (end - start) * 1e6,
                    "args": {"layer": task.layer, "tokens": [task.start, task.end]}})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": info or {}}


def gantt(events: list, path: str, title: str, zoom_layer: int | None = None) -> None:
    """Bars per unit coloured by resource kind; a second panel zooms on two layers (the second one's labels
    are primed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    t0 = min(e[2] for e in events)
    units = list(dict.fromkeys(e[0] for e in events))
    layers = sorted({e[1].layer for e in events})
    zoom = layers[len(layers) // 2] if zoom_layer is None else zoom_layer
    kinds = _kinds()
    fig, axes = plt.subplots(2, 1, figsize=(13, 2.2 + 1.1 * len(units) * 2))
    for ax, sel, sub in ((axes[0], events, "whole step"),
                         (axes[1], [e for e in events if e[1].layer in (zoom, zoom + 1)], f"layers {zoom}-{zoom + 1}")):
        lo, hi = min(e[2] for e in sel), max(e[3] for e in sel)
        for unit, task, start, end in sel:
            y = units.index(unit)
            x, w = (start - t0) * 1e3, (end - start) * 1e3
            ax.broken_barh([(x, w)], (y - 0.4, 0.8), facecolors=KIND_COLORS[kinds.get(task.op, "other")],
                           edgecolor="white", linewidth=0.4)
            if sel is not events and w > 0.006 * (hi - lo) * 1e3:  # label the bars wide enough to read
                ax.text(x + w / 2, y, f"{task.op}#{task.index}" + ("'" if task.layer != zoom else ""),
                        ha="center", va="center", fontsize=6, rotation=90)
        ax.set_yticks(range(len(units)), units)
        ax.set_xlabel("ms since step start")
        ax.set_title(f"{title} - {sub}", fontsize=9)
        if sel is not events:
            ax.set_xlim((lo - t0) * 1e3, (hi - t0) * 1e3)
    axes[0].legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLORS.items()], fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace")
    g.add_argument("--out", default="trace", help="directory for trace.json and gantt.png")
    g.add_argument("--num-requests", type=int, default=None, help="requests in flight (default: dense_batch / 4)")
    g.add_argument("--prompt-len", type=int, default=48)
    g.add_argument("--warmup-steps", type=int, default=4, help="steps before the traced one (mixes decode/prefill)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from nanoflow import LLM, SamplingParams
    from nanoflow.config import engine_config_from_args
    cfg = asdict(engine_config_from_args(args))
    llm = LLM(cfg.pop("model"), **cfg)
    eng, rng = llm.engine, random.Random(0)
    n = args.num_requests or max(2, eng.config.dense_batch // 4)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"t{i}", [rng.randrange(llm.model_config.vocab_size) for _ in range(args.prompt_len)], params)
    for _ in range(args.warmup_steps):
        eng.step()
    executor = eng.runner.executor
    executor.trace, executor.trace_steps = [], []
    while not executor.trace_steps and eng.has_unfinished_requests():  # async: the step may run a call later
        eng.step()
    if not executor.trace_steps:
        raise ValueError("no step was traced: use fewer --warmup-steps or more requests")
    (tokens, decode, count), events, executor.trace = executor.trace_steps[0], executor.trace, None
    events = events[:count]  # the first traced step only
    info = {"model": args.model, "executor": args.executor, "dense_batch": eng.config.dense_batch,
            "step_tokens": tokens, "decode_tokens": decode,
            "plan": executor.plan.meta.get("name", args.plan), "step_ms": 1e3 * (max(e[3] for e in events)
                                                                              - min(e[2] for e in events))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trace.json"), "w") as f:
        json.dump(chrome_trace(events, info), f)
    title = (f"{args.model} {args.dtype}, {args.executor} ({info['plan']}), {info['step_tokens']} tokens "
             f"({info['decode_tokens']} decode), {info['step_ms']:.1f} ms")
    gantt(events, os.path.join(args.out, "gantt.png"), title)
    print(f"{title}\nwrote {args.out}/trace.json (chrome://tracing, ui.perfetto.dev) and {args.out}/gantt.png")
    return 0
