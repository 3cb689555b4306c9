"""`nanoflow bench batch`: an offline job with shared prefixes (K system prompts + trace-length user turns,
shuffled), run with shared-prefix grouping off and on, on 1 engine and on N data-parallel replicas, in one run.

Each configuration gets a fresh engine (a cold prefix cache) and the same requests; the table reports prefill
tokens computed (StepStats.prompt_tokens) and reused (prefix_hit_tokens), wall time and throughput."""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch job")
    g.add_argument("--workload", default="sharegpt", help="trace of the user turns' lengths (or const:IN/OUT)")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--num-prefixes", type=int, default=8, help="distinct system prompts (K)")
    g.add_argument("--prefix-len", default="300,1000", help="system prompt length range in tokens: LO,HI")
    g.add_argument("--max-input", type=int, default=256, help="cap on a user turn's tokens")
    g.add_argument("--max-output", type=int, default=32)
    g.add_argument("--workload-seed", type=int, default=0)
    g.add_argument("--dp-sizes", default="1,2", help="data-parallel sizes to run, comma-separated")
    g.add_argument("--json", default=None, help="write the rows to this file")


def run_config(cfg: dict, requests, grouping: bool, dp: int) -> dict:
    """One fresh engine: warm up on an unrelated prompt, then the job; its numbers."""
    from nanoflow import LLM, SamplingParams
    cfg = {**cfg, "prefix_grouping": grouping, "data_parallel_size": dp}
    if dp > 1:
        cfg["num_threads"] = None  # each replica: its share of the cores
    llm = LLM(cfg.pop("model"), **cfg)
    try:
        warm = [[101 + r] + [108 + i % 7 for i in range(300)] for r in range(dp)]  # each replica; no shared prefix
        llm.generate(warm, SamplingParams(max_tokens=4), use_tqdm=False)
        llm.engine.stats = type(llm.engine.stats)()
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
        start = time.perf_counter()
        outs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == r.output_len for o, r in zip(outs, requests)), "lost tokens"
        st = llm.engine.stats
    finally:
        getattr(llm.engine, "shutdown", lambda: None)()
    n_in = sum(r.input_len for r in requests)
    n_out = sum(r.output_len for r in requests)
    return {"grouping": "on" if grouping else "off", "replicas": dp, "elapsed_s": elapsed,
            "prefill_computed": st.prompt_tokens, "prefix_hits": st.prefix_hit_tokens, "input_tokens": n_in,
            "total_tokens_per_s": (n_in + n_out) / elapsed, "output_tokens_per_s": n_out / elapsed}


def run(args: argparse.Namespace) -> int:
    from nanoflow.bench.report import write_json
    from nanoflow.bench.workloads import sample_shared_prefix
    from nanoflow.config import engine_config_from_args
    from nanoflow.models.loader import load_config, resolve_model
    cfg = asdict(engine_config_from_args(args))
    mc = load_config(resolve_model(cfg["model"]))
    max_len = min(cfg["max_model_len"] or mc.max_position_embeddings, mc.max_position_embeddings)
    lo, hi = (int(x) for x in args.prefix_len.split(","))
    requests = sample_shared_prefix(args.workload, args.num_requests, args.num_prefixes, (lo, hi),
                                    args.workload_seed, mc.vocab_size, max_len, args.max_input, args.max_output)
    rows = []
    for dp in args.dp_sizes.split(","):
        for grouping in (False, True):
            rows.append(run_config(cfg, requests, grouping, int(dp)))
            print(rows[-1], flush=True)  # (a long run keeps what it measured)
    print(f"\nshared-prefix batch job: {len(requests)} requests, {args.num_prefixes} prefixes of {lo}-{hi} tokens, "
          f"user turns {args.workload} (<= {args.max_input}), outputs <= {args.max_output}, dtype {cfg['dtype']}")
    print(f"{'replicas':>8} {'grouping':>8} {'prefill computed':>17} {'prefix hits':>12} {'wall s':>8} "
          f"{'total tok/s':>12} {'out tok/s':>10}")
    for r in rows:
        print(f"{r['replicas']:>8} {r['grouping']:>8} {r['prefill_computed']:>17} {r['prefix_hits']:>12} "
              f"{r['elapsed_s']:>8.1f} {r['total_tokens_per_s']:>12.1f} {r['output_tokens_per_s']:>10.1f}")
    if args.json:
        write_json(args.json, {"num_requests": len(requests), "num_prefixes": args.num_prefixes,
                               "prefix_len": [lo, hi], "rows": rows})
    return 0
