"""The throughput cost of structured output: the same batch with no request constrained and with half of them
constrained (xgrammar regexes of 400 characters: EOS is not allowed before, so both modes generate the same
number of tokens), interleaved (none, half, none, half, ...) in one process so that a shared
machine's load drifts over both alike. Greedy; the free rows use ignore_eos.

    .venv/bin/python benchmarks/structured_output_ab.py --rounds 3 --num-requests 32 --output-len 32
"""
from __future__ import annotations

import argparse
import re
import statistics

from nanoflow import LLM, SamplingParams, StructuredOutputsParams
from nanoflow.engine.engine import StepStats

PROMPTS = ["The capital of France is", "Write a short poem about the ocean.", "def fibonacci(n):",
           "Explain why the sky is blue in one paragraph.", "List three uses of a paperclip:",
           "Translate to French: I love reading books in the evening.", "1, 2, 3, 4, 5,",
           "Once upon a time, in a small village by the mountains,"]
REGEXES = [r"[a-z ]{400}", r"[0-9,]{400}"]


def batch(n: int, out_len: int, constrained: bool, tag: str) -> tuple[list[str], list[SamplingParams]]:
    prompts, params = [], []
    for i in range(n):
        prompts.append(PROMPTS[i % len(PROMPTS)] + f" ({tag}{i})")  # no prefix-cache hits across rounds
        if constrained and i % 2:
            so = StructuredOutputsParams(regex=REGEXES[(i // 2) % len(REGEXES)])
            params.append(SamplingParams(temperature=0, max_tokens=out_len, structured_outputs=so))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
    return prompts, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--async", dest="async_scheduling", action="store_true")
    args = ap.parse_args()
    llm = LLM("default", dtype=args.dtype, kv_cache_gb=0.5, async_scheduling=args.async_scheduling)
    rows: dict[str, list[dict]] = {"none": [], "half": []}
    for r in range(args.rounds):
        for mode in rows:
            prompts, params = batch(args.num_requests, args.output_len, mode == "half", f"{r}{mode}")
            llm.engine.stats = StepStats()
            outs = llm.generate(prompts, params, use_tqdm=False)
            st = llm.engine.stats
            for o, p in zip(outs, params):  # constrained outputs are prefixes of a match (cut at max_tokens)
                so = p.structured_outputs
                assert so is None or re.fullmatch(so.regex.replace("{400}", "*"), o.outputs[0].text), o.outputs[0].text
            row = {"wall_s": st.step_time_s, "tokens": st.generated_tokens,
                   "tok_s": st.generated_tokens / st.step_time_s, "steps": st.num_steps, **st.breakdown()}
            rows[mode].append(row)
            print(f"round {r} {mode:4s} wall {row['wall_s']:6.1f} s  {row['tokens']} tokens  "
                  f"{row['tok_s']:6.1f} tok/s  device {row['device_ms']:7.1f} ms/step", flush=True)
    sampler_only(llm, args.num_requests, args.output_len)
    for mode, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        print(f"median {mode:4s} wall {med['wall_s']:6.1f} s  {med['tokens']:.0f} tokens  {med['tok_s']:6.1f} tok/s  "
              f"device {med['device_ms']:7.1f} ms/step  steps {med['steps']:.0f}")


def sampler_only(llm: LLM, n: int, steps: int, reps: int = 5) -> None:
    """The sampler alone on [n, vocab] logits in the engine's dtype: the part of a step structured output
    changes (masks, matcher advance, and the lost greedy fast path); best of `reps`, ms per step."""
    import time

    import torch

    from nanoflow.engine.sampler import SampleRow, Sampler
    eng = llm.engine
    logits = torch.randn(n, eng.model_config.vocab_size).to(eng.dtype)
    ids = torch.zeros(n, dtype=torch.long)
    for mode in ("none", "half"):
        best = float("inf")
        for rep in range(reps):
            _, params = batch(n, steps, mode == "half", "")
            for p in params:
                p._grammar = eng.grammars.compile(p.structured_outputs)
            rows = [SampleRow(f"{rep}-{i}", p) for i, p in enumerate(params)]
            sampler, t0 = Sampler(), time.perf_counter()
            for _ in range(steps):
                sampler(logits, rows, ids)
            best = min(best, (time.perf_counter() - t0) / steps)
        print(f"sampler only, {n} rows, {mode:4s}: {1e3 * best:6.2f} ms/step")


if __name__ == "__main__":
    main()
