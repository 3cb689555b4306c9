"""Async scheduling on/off, interleaved (on, off, on, off, ...) in one process so that a shared machine's load
drifts over both modes alike. Prints per round: wall s, device ms/step, CPU ms/step, device idle %.

    .venv/bin/python benchmarks/async_ab.py --rounds 3 --num-requests 8 --input-len 32 --output-len 32
"""
from __future__ import annotations

import argparse
import statistics

from nanoflow import LLM, SamplingParams
from nanoflow.engine.engine import StepStats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    engines = {mode: LLM("default", dtype=args.dtype, kv_cache_gb=0.25, async_scheduling=mode == "async")
               for mode in ("async", "no-async")}
    prompts = [[(7 * i + j) % 1000 + 100 for j in range(args.input_len)] for i in range(args.num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    results: dict[str, list[dict]] = {m: [] for m in engines}
    outs = {}
    for r in range(args.rounds):
        for mode, llm in engines.items():
            llm.engine.stats = StepStats()
            outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            st = llm.engine.stats
            row = {"wall_s": st.step_time_s, **st.breakdown()}
            results[mode].append(row)
            print(f"round {r} {mode:9s} wall {row['wall_s']:6.1f} s  device {row['device_ms']:8.1f} ms/step  "
                  f"CPU {row['cpu_ms']:5.2f} ms/step  idle {row['device_idle_pct']:.3f}%", flush=True)
    assert outs["async"] == outs["no-async"], "async changed the tokens"
    for mode, rows in results.items():
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
        print(f"median {mode:9s} wall {med['wall_s']:6.1f} s  device {med['device_ms']:8.1f} ms/step  "
              f"CPU {med['cpu_ms']:5.2f} ms/step (schedule {med['schedule_ms']:.2f}, prepare {med['prepare_ms']:.2f}, "
              f"read-back {med['process_ms']:.2f})  idle {med['device_idle_pct']:.3f}%")


if __name__ == "__main__":
    main()
