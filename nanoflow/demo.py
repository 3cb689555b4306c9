"""`nanoflow run` (what `make run` does): chat answers, then an offline throughput job with a summary."""
from __future__ import annotations

import argparse
from dataclasses import asdict

DEMO_CHATS = [
    "What is the capital of France?",
    "Give me three tips for writing clean Python code.",
    "Explain in two sentences why the sky is blue.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="sharegpt")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-input", type=int, default=256)
    p.add_argument("--max-output", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from nanoflow import LLM, SamplingParams
    from nanoflow.bench.offline import optimum, run_ours
    from nanoflow.bench.report import print_summary
    from nanoflow.bench.workloads import sample_workload
    from nanoflow.config import engine_config_from_args
    console = Console()
    cfg = asdict(engine_config_from_args(args))
    llm = LLM(cfg.pop("model"), **cfg)
    console.rule(f"[bold]Chat with {args.model} ({llm.engine.config.dtype}, dense batch {llm.engine.config.dense_batch})")
    outs = llm.chat([[{"role": "user", "content": q}] for q in DEMO_CHATS],
                    SamplingParams(temperature=0.0, max_tokens=128), use_tqdm=False)
    for q, o in zip(DEMO_CHATS, outs):
        console.print(f"[bold cyan]user:[/] {q}\n[bold green]assistant:[/] {o.outputs[0].text}\n")
    console.rule(f"[bold]Offline throughput: {args.num_requests} {args.workload} requests")
    requests = sample_workload(args.workload, args.num_requests, 0, llm.model_config.vocab_size,
                               llm.engine.max_model_len, args.max_input, args.max_output)
    eng = llm.engine.config
    peak, best = optimum(llm.model_config, llm.engine.dtype, eng.dense_batch, 1.0, eng.device)
    row = {"system": f"nanoflow ({args.dtype})", **run_ours(llm, requests)}
    row["pct_of_optimal"] = 100.0 * row["total_tokens_per_s"] / best
    print_summary([row], f"optimum {best:.0f} tok/s = measured GEMM peak {peak / 1e9:.0f} GFLOP/s / "
                         f"(2 x {llm.model_config.gemm_params() / 1e6:.0f}M params)")
    return 0
