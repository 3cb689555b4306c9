"""One step, four ways, interleaved: the plain forward vs the sequential / nanobatch / overlap executors.

    .venv/bin/python benchmarks/flow_step.py --model default --dense-batch 256 --num-decode 192 --context 512

Shows that running the operation list as one nano-batch costs what the plain forward costs, and what splitting
(nanobatch) and overlapping (overlap) do to one step, with less noise than end-to-end runs: the variants take
turns, round after round, and the median per variant is reported with its ratio to the plain forward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _one_thread(fn):
    """fn on a helper thread whose OpenMP team is 1 thread on any core: no fork/join barriers (what each
    overlap unit does on its own core), to separate that effect from the overlap itself."""
    from concurrent.futures import ThreadPoolExecutor
    from nanoflow.flow.cpu_units import limit_this_thread
    pool = ThreadPoolExecutor(1, initializer=lambda: limit_this_thread(sorted(os.sched_getaffinity(0)), team=1))

    def call(*a):
        def work():
            with torch.inference_mode():
                return fn(*a)
        return pool.submit(work).result()
    return call


def _write_trace(executor, step, args) -> None:
    from nanoflow.flow.trace import chrome_trace, gantt
    executor.trace = []
    executor(*step)
    events, executor.trace = executor.trace, None
    os.makedirs(args.trace, exist_ok=True)
    ms = 1e3 * (max(e[3] for e in events) - min(e[2] for e in events))
    title = (f"{args.model} {args.dtype}, overlap, {args.dense_batch} tokens ({args.num_decode} decode at "
             f"context {args.context}), {ms:.0f} ms")
    with open(os.path.join(args.trace, "trace.json"), "w") as f:
        json.dump(chrome_trace(events, {"title": title}), f)
    gantt(events, os.path.join(args.trace, "gantt.png"), title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dense-batch", type=int, default=256)
    p.add_argument("--num-decode", type=int, default=192, help="decode tokens of the step (the rest is prefill)")
    p.add_argument("--context", type=int, default=512, help="context length of every decode request")
    p.add_argument("--plan", default=None, help="plan JSON for nanobatch/overlap (default: the 2-nano-batch plan)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--verbose", action="store_true", help="print every timing as it is taken")
    p.add_argument("--trace", default=None, help="also write one overlap step's trace.json + gantt.png here")
    args = p.parse_args()

    from nanoflow.flow.executor import make_executor
    from nanoflow.models.loader import build_model, load_config, parse_dtype, resolve_model
    from nanoflow.autosearch.profile import synthetic_step
    src = resolve_model(args.model)
    model = build_model(src, load_config(src), parse_dtype(args.dtype))
    ids, pos, meta, kv = synthetic_step(model, args.dense_batch, args.num_decode, args.context)
    variants = {"plain forward": model}
    for kind in ("sequential", "nanobatch", "overlap"):
        variants[kind] = make_executor(kind, args.plan, model, dense_batch=args.dense_batch)
    variants["sequential, 1 thread"] = _one_thread(variants["sequential"])
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(ids, pos, meta, kv)
                if r:
                    times[name].append(time.perf_counter() - t0)
                if args.verbose:
                    print(f"round {r} {name}: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
    if args.trace:
        _write_trace(variants["overlap"], (ids, pos, meta, kv), args)
    base = statistics.median(times["plain forward"])
    print(f"{args.model} {args.dtype}: {args.dense_batch} tokens ({args.num_decode} decode at context "
          f"{args.context}), {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'variant':<21} {'median ms':>10} {'min ms':>8} {'vs plain':>9}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<21} {m * 1e3:>10.1f} {min(ts) * 1e3:>8.1f} {m / base:>9.3f}")


if __name__ == "__main__":
    main()
