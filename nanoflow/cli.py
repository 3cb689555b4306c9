"""`nanoflow` command line: generate, chat, run, bench, serve, run-batch, roofline, trace, profile, tune."""
from __future__ import annotations

import argparse
import json
import sys

from nanoflow.config import add_engine_arguments, engine_config_from_args


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sampling-seed", dest="sample_seed", type=int, default=None,
                   help="per-request seed (same seed, same output)")
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("-n", type=int, default=1)


def _sampling_params(args):
    from nanoflow import SamplingParams
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.sample_seed, max_tokens=args.max_tokens,
        stop=args.stop, ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def _llm(args):
    from nanoflow import LLM
    from dataclasses import asdict
    cfg = asdict(engine_config_from_args(args))
    return LLM(cfg.pop("model"), **cfg)


def cmd_generate(args) -> int:
    params = _sampling_params(args)  # validate before the model loads
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = _llm(args)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    if args.json:
        print(json.dumps({"prompt_token_ids": out.prompt_token_ids, "outputs": [
            {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason, "logprobs": o.logprobs}
            for o in out.outputs]}))
    else:
        for o in out.outputs:
            print(o.text)
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _llm(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("nanoflow chat - empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        print(reply)
        history.append({"role": "assistant", "content": reply})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nanoflow.bench import offline, online
    from nanoflow.server import launch
    from nanoflow import demo
    from nanoflow.costmodel import roofline
    parser = argparse.ArgumentParser(prog="nanoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete one prompt (argument or stdin)")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--json", action="store_true", help="print token ids and logprobs as JSON")
    add_engine_arguments(p)
    _add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    p.add_argument("--system", default=None)
    add_engine_arguments(p)
    _add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("run", help="the demo: answer built-in chat prompts, then an offline throughput job")
    add_engine_arguments(p)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("offline", help="offline throughput on a trace sample, side by side with peers")
    add_engine_arguments(p)
    offline.add_arguments(p)
    p.set_defaults(func=offline.run)
    from nanoflow.bench import batch as batch_bench
    p = bench.add_parser("batch", help="a shared-prefix batch job: prefix grouping off/on, 1 vs N replicas")
    add_engine_arguments(p)
    batch_bench.add_arguments(p)
    p.set_defaults(func=batch_bench.run)
    p = bench.add_parser("serve", help="online latency through a running server's HTTP API (Poisson arrivals)")
    online.add_arguments(p)
    p.set_defaults(func=online.run)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_engine_arguments(p)
    launch.add_arguments(p)
    p.set_defaults(func=launch.run)
    from nanoflow.batch import run_batch
    p = sub.add_parser("run-batch", help="an OpenAI batch file (JSONL) through the engine, streamed and resumable")
    add_engine_arguments(p)
    run_batch.add_arguments(p)
    p.set_defaults(func=run_batch.run)
    p = sub.add_parser("roofline", help="the paper's cost model and optimal throughput")
    roofline.add_arguments(p)
    p.set_defaults(func=roofline.run)
    from nanoflow.flow import trace
    p = sub.add_parser("trace", help="one step's timeline per execution unit: Chrome trace JSON + Gantt PNG")
    add_engine_arguments(p)
    trace.add_arguments(p)
    p.set_defaults(func=trace.run)
    from nanoflow.autosearch import commands as tune_commands
    p = sub.add_parser("profile", help="time every operation per token count and share; the R -> P table")
    tune_commands.add_profile_arguments(p)
    p.set_defaults(func=tune_commands.run_profile_cmd)
    p = sub.add_parser("tune", help="auto-search a plan (MILP), confirm candidates by measuring, cache it")
    tune_commands.add_tune_arguments(p)
    p.set_defaults(func=tune_commands.run_tune_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as e:
        print(f"nanoflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
