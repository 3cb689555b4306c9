"""`nanoflow bench offline`: our engine on a trace sample, with peers measured in the same run."""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from dataclasses import asdict

from nanoflow import profiling
from nanoflow.bench.report import print_breakdown
from nanoflow.bench.workloads import BenchRequest, sample_workload, throughput_metrics
from nanoflow.profiling import breakdown


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="sharegpt",
                   help="splitwise | lmsys | sharegpt | const:IN/OUT | multiturn:TRACE[:rounds=LO-HI]")
    g.add_argument("--num-requests", type=int, default=128, help="requests (multiturn: conversations)")
    g.add_argument("--kv-reuse", default="off,device,full",
                   help="multiturn only: modes to compare in one run: off, device, device-small, full, offload")
    g.add_argument("--reuse-device-blocks", type=int, default=None,
                   help="multiturn only: KV blocks of the small device pool of device-small/full (default: auto)")
    g.add_argument("--workload-seed", type=int, default=0)
    g.add_argument("--max-input", type=int, default=None, help="cap prompt lengths (tokens)")
    g.add_argument("--max-output", type=int, default=None, help="cap output lengths (tokens)")
    g = p.add_argument_group("comparison")
    g.add_argument("--compare", default="", help="comma list of peers: hf, llama.cpp, vllm")
    g.add_argument("--hf-batch-sizes", default="16,32,64", help="static batch sizes HF tries")
    g.add_argument("--vllm-token-budgets", default="256,1024,2048",
                   help="max_num_batched_tokens values vLLM tries (one engine each; the best is its row)")
    g.add_argument("--vllm-venv", default=None,
                   help="vLLM's virtualenv (default: $NANOFLOW_VLLM_VENV, else .venv-vllm at the repo root)")
    g.add_argument("--llamacpp-parallel", type=int, default=64)
    g.add_argument("--repeats", type=int, default=1,
                   help="rounds of ours then the peers, interleaved (ours on a fresh engine each round): a slow "
                        "phase of a shared machine then hits both sides; prints each round's ratio and the median")
    g.add_argument("--peak-seconds", type=float, default=1.0, help="GEMM peak measurement time")
    g.add_argument("--json", default=None, help="write results to this file")
    g.add_argument("--profile", action="store_true",
                   help="run ours under torch.profiler and print where the time goes")
    g.add_argument("--compare-async", action="store_true",
                   help="run ours with async scheduling on and off; print CPU ms/step by part and device idle %%")


def run_ours(llm, requests: list[BenchRequest], profile: bool = False) -> dict:
    from nanoflow import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate([requests[0].prompt_token_ids[:8]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    llm.engine.stats = type(llm.engine.stats)()  # count the measured run only
    tp = getattr(getattr(llm.engine, "runner", None), "tp", None)  # (data-parallel replicas: no runner here)
    if tp is not None:
        tp.all_reduce_s, tp.all_reduce_calls = 0.0, 0
    with _maybe_profile(profile) as prof:
        start = time.perf_counter()
        outs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=True)
        elapsed = time.perf_counter() - start
    if profile:
        print_breakdown(breakdown(prof, elapsed), f"where the time goes ({elapsed:.1f} s wall, profiled run)")
    assert all(len(o.outputs[0].token_ids) == r.output_len for o, r in zip(outs, requests)), "lost tokens"
    stats = llm.engine.stats
    preemptions = getattr(llm.engine.scheduler, "num_preemptions", None)  # (None: data-parallel replicas)
    row = {**throughput_metrics(requests, elapsed), "preemptions": preemptions,
           "steps": stats.num_steps, **stats.breakdown()}
    if tp is not None:  # rank 0's wall time inside the layers' all-reduces (includes waiting for the other ranks)
        row["allreduce_ms_per_step"] = ar = 1e3 * tp.all_reduce_s / max(1, stats.num_steps)
        row["note"] = (f"{tp.world_size} ranks: all-reduces {ar:.1f} ms of {row['device_ms']:.1f} ms per step "
                       f"({tp.all_reduce_calls} calls, rank 0's wall time incl. waiting for the others)")
    return row


def _engine(args, **overrides):
    """A fresh LLM of the command's engine arguments, with `overrides` of EngineConfig fields."""
    from nanoflow import LLM
    from nanoflow.config import engine_config_from_args
    cfg = {**asdict(engine_config_from_args(args)), **overrides}
    return LLM(cfg.pop("model"), **cfg)


def run_rounds(args, requests: list[BenchRequest], first: list[dict]) -> list[dict]:
    """`--repeats`: round 1 is `first` (ours, then the peers); each further round runs ours on a fresh engine
    (the last round's prompts would hit its prefix cache), then the peers. Every row is marked with its round."""
    rows = [dict(r, round=1) for r in first] if args.repeats > 1 else first
    for k in range(2, args.repeats + 1):
        llm = _engine(args)
        ours = {"system": _ours_label(args, llm.engine.config.async_scheduling), **run_ours(llm, requests)}
        rows += [dict(r, round=k) for r in (ours, *run_peers(args, llm, requests))]
        llm.engine.shutdown()
        del llm
        gc.collect()
    return rows


def _check_repeats(args) -> None:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.repeats > 1 and (args.more_executors or len(args.tp_sizes) > 1 or args.compare_async or args.profile):
        raise ValueError("--repeats runs one configuration of ours: no executor or TP lists, --compare-async, "
                         "--profile")


def run_async_off(args, requests: list[BenchRequest]) -> dict:
    """Ours again with the async-scheduling switch flipped (a second engine, same workload)."""
    from nanoflow.config import engine_config_from_args
    llm = _engine(args, async_scheduling=not engine_config_from_args(args).async_scheduling)
    return {"system": _ours_label(args, llm.engine.config.async_scheduling), **run_ours(llm, requests)}


def _ours_label(args, async_on: bool, tp: int | None = None) -> str:
    extra = (", async" if async_on else ", --no-async") if args.compare_async else ""
    extra += f", {args.executor}" if getattr(args, "more_executors", None) else ""
    tp = args.tp_sizes[0] if tp is None and getattr(args, "tp_sizes", None) else tp
    extra += f", tp={tp}" if tp and (tp > 1 or len(getattr(args, "tp_sizes", [])) > 1) else ""
    return f"nanoflow ({args.dtype}{extra})"


def run_tp_sizes(args, requests: list[BenchRequest]) -> list[dict]:
    """Ours again per further size of `--tensor-parallel-size a,b` (a fresh engine each, the same requests)."""
    rows = []
    for tp in args.tp_sizes[1:]:
        llm = _engine(args, tensor_parallel_size=tp)
        rows.append({"system": _ours_label(args, llm.engine.config.async_scheduling, tp), **run_ours(llm, requests)})
        llm.engine.shutdown()
        del llm
    return rows


def run_executors(args, requests: list[BenchRequest]) -> list[dict]:
    """Ours again per further executor of `--executor a,b,c` (the paper's ablation): a fresh engine each (no
    prefix-cache carry-over), the same requests."""
    rows = []
    for kind in args.more_executors:
        llm = _engine(args, executor=kind)
        rows.append({"system": _ours_label(args, llm.engine.config.async_scheduling).replace(
            f", {args.executor}", f", {kind}"), **run_ours(llm, requests)})
        llm.engine.runner.executor.close()
        llm.engine.shutdown()
        del llm
    return rows


@contextlib.contextmanager
def _maybe_profile(on: bool):
    if not on:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile
    profiling.set_active(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield prof
    finally:
        profiling.set_active(False)


def optimum(cfg, dtype, dense_batch: int, seconds: float, device: str = "cpu") -> tuple[float, float]:
    from nanoflow.costmodel.analysis import optimal_throughput
    from nanoflow.costmodel.peak import measure_gemm_peak
    # Re-measured every run (the cache keeps the best value seen, so a loaded run cannot lower it), on the
    # engine's device: on a GPU, % of optimal is against the GPU's GEMM peak.
    peak = measure_gemm_peak(cfg, dtype, dense_batch, seconds=seconds, refresh=True, device=device)
    return peak, optimal_throughput(cfg, peak)


def run_peers(args, llm, requests: list[BenchRequest]) -> list[dict]:
    from nanoflow.models.loader import resolve_model
    src = resolve_model(args.model)
    rows = []
    for peer in [p.strip() for p in args.compare.split(",") if p.strip()]:
        if peer == "hf":
            from nanoflow.bench.hf_baseline import run_hf
            d, f = (os.path.dirname(src.path), os.path.basename(src.path)) if src.kind == "gguf" else (src.path, None)
            sizes = [int(s) for s in args.hf_batch_sizes.split(",")]
            rows.append({"system": "HF transformers", **run_hf(d, f, requests, llm.engine.dtype, sizes)})
        elif peer == "llama.cpp":
            from nanoflow.bench.llamacpp_baseline import llamacpp_available, run_llamacpp
            if src.kind != "gguf" or not llamacpp_available():
                print("skipping llama.cpp: needs a GGUF model and `pip install llama-cpp-python`")
                continue
            rows.append({"system": "llama.cpp", **run_llamacpp(src.path, requests, args.llamacpp_parallel)})
        elif peer == "vllm":
            rows.append(run_vllm_peer(args, llm, requests))
        else:
            raise ValueError(f"unknown peer {peer!r}: choose hf, llama.cpp, vllm")
    return rows


def run_vllm_peer(args, llm, requests: list[BenchRequest]) -> dict:
    """vLLM's row: the model as an HF dir (a GGUF is converted once, cached), our dtype, each token budget.
    A row that says why (``note``, no throughput) when vLLM or the conversion cannot run here."""
    from nanoflow.bench.vllm_baseline import default_venv, failure_row, missing_venv, run_vllm
    dtype = llm.engine.dtype
    try:
        budgets = [int(b) for b in args.vllm_token_budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"bad --vllm-token-budgets {args.vllm_token_budgets!r}: expected e.g. 256,1024") from None
    venv = args.vllm_venv or default_venv()
    if why := missing_venv(venv):  # say so before converting the model for nothing
        return failure_row(why, dtype)
    try:
        from nanoflow.bench.hf_export import hf_model_dir
        model_dir = hf_model_dir(args.model)
    except Exception as e:  # noqa: BLE001 - e.g. dummy: models have no weights to give vLLM
        return failure_row(f"no HF model directory for vLLM: {type(e).__name__}: {e}", dtype)
    return run_vllm(model_dir, requests, dtype, budgets, venv=venv)


def _kernels_note(llm) -> str | None:
    """Why our row may be slow for reasons of this machine, not the engine: C++ kernels asked for on a CPU but not
    built (no compiler, or another process held the build lock past its timeout): the torch fallback ran."""
    from nanoflow.kernels import cpu_ext
    cfg = llm.engine.config
    if cfg.device == "cpu" and cfg.cpp_kernels and cpu_ext.enabled() and cpu_ext.load() is None:
        return "C++ kernels unavailable here (see the warning above): the torch fallback ran"
    return None


def run(args: argparse.Namespace) -> int:
    if args.workload.startswith("multiturn:"):
        from nanoflow.bench.multiturn import run_multiturn
        return run_multiturn(args)
    from nanoflow import LLM
    from nanoflow.bench.report import print_rounds, print_step_breakdown, print_summary, write_json
    from nanoflow.config import engine_config_from_args
    args.executor, *args.more_executors = [k.strip() for k in args.executor.split(",") if k.strip()] or ["sequential"]
    args.tp_sizes = [int(x) for x in str(args.tensor_parallel_size).split(",") if x.strip()] or [1]
    _check_repeats(args)
    cfg = asdict(engine_config_from_args(args))
    args.dtype = cfg["dtype"]  # "auto" resolved for this hardware: the rows, the labels and the JSON say which
    llm = LLM(cfg.pop("model"), **cfg)
    requests = sample_workload(args.workload, args.num_requests, args.workload_seed,
                               llm.model_config.vocab_size, llm.engine.max_model_len, args.max_input, args.max_output)
    device = llm.engine.config.device
    peak, best = optimum(llm.model_config, llm.engine.dtype, llm.engine.config.dense_batch, args.peak_seconds, device)
    rows = [{"system": _ours_label(args, llm.engine.config.async_scheduling),
             **run_ours(llm, requests, args.profile)}]
    if (note := _kernels_note(llm)) is not None:  # (beside a tensor-parallel row's all-reduce note, if any)
        rows[0]["note"] = "; ".join(filter(None, (rows[0].get("note"), note)))
    if getattr(llm.engine, "tp_workers", None) is not None:
        llm.engine.shutdown()  # one tensor-parallel engine per process: the next rows start their own
    rows += run_executors(args, requests)
    rows += run_tp_sizes(args, requests)
    if args.compare_async:
        rows.append(run_async_off(args, requests))
        print_step_breakdown(rows)
    rows += run_peers(args, llm, requests)
    dense_batch = llm.engine.config.dense_batch
    if args.repeats > 1:  # (the next rounds' engines need its memory)
        llm.engine.shutdown()
        del llm
        gc.collect()
    rows = run_rounds(args, requests, rows)
    for r in rows:
        if r.get("total_tokens_per_s"):  # a peer that could not run has a note instead of a throughput
            r["pct_of_optimal"] = 100.0 * r["total_tokens_per_s"] / best
    print_summary(rows, f"{args.workload}, {len(requests)} requests, optimum {best:.0f} tok/s "
                        f"(measured GEMM peak {peak / 1e9:.0f} GFLOP/s)")
    print_rounds(rows)
    if args.json:
        write_json(args.json, {"workload": args.workload, "num_requests": len(requests), "dtype": args.dtype,
                               "device": device, "dense_batch": dense_batch, "peak_flops": peak,
                               "optimal_tokens_per_s": best, "results": rows})
    return 0
