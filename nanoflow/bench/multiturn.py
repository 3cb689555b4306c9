"""Multi-round KV reuse benchmark: `nanoflow bench offline --workload multiturn:lmsys --kv-reuse off,device,full`.

Conversations with trace-sampled lengths run interleaved; round k+1 of a conversation is submitted as soon as
round k finishes, with prompt = previous prompt + previous output + new user tokens. Every mode runs the same
conversations on ONE loaded model (loading takes minutes on a shared CPU box); between modes the engine's KV
bookkeeping is rebuilt, so each mode starts cold. Modes:

  off           no reuse: every round re-prefills the whole history
  device        device prefix cache, full-size KV pool
  device-small  device prefix cache, small KV pool (what the tiers add on top of it)
  full          small KV pool + host tier + disk tier (finished rounds offloaded, history reloaded)
  offload       full-size pool + tiers: pays every offload copy but seldom reloads (the cost of offloading)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from rich.console import Console
from rich.table import Table

from nanoflow.bench.workloads import Conversation, sample_conversations

# mode -> (prefix caching, small device pool, host/disk tiers)
MODES = {"off": (False, False, False), "device": (True, False, False), "device-small": (True, True, False),
         "full": (True, True, True), "offload": (True, False, True)}


def run_multiturn(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from nanoflow import LLM, SamplingParams
    from nanoflow.bench.report import write_json
    from nanoflow.config import engine_config_from_args
    modes = [m.strip() for m in args.kv_reuse.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown --kv-reuse mode {bad[0] if bad else ''!r}: choose from {', '.join(MODES)}")
    cfg = asdict(engine_config_from_args(args))
    cfg.update(prefix_caching=True, host_kv_cache_gb=0.0, disk_kv_cache_gb=0.0)  # the modes set these
    llm = LLM(cfg.pop("model"), **cfg)
    eng = llm.engine
    convs = sample_conversations(args.workload, args.num_requests, args.workload_seed, llm.model_config.vocab_size,
                                 eng.max_model_len, args.max_input, args.max_output)
    bs = eng.scheduler.config.block_size
    conv_blocks = [-(-(sum(map(len, c.user)) + sum(c.output_lens)) // bs) for c in convs]
    final_blocks = sum(conv_blocks)
    # Small pool: a quarter of all the conversations' final history, so idle histories get evicted.
    small = args.reuse_device_blocks or max(final_blocks // 4, max(conv_blocks) + 1)
    block_bytes = sum(kv[:, 0].numel() * kv.element_size() for kv in eng.runner.kv_caches)
    host = int(args.host_kv_cache_gb * (1 << 30)) or final_blocks // 2 * block_bytes  # half: the rest spills
    disk = int(args.disk_kv_cache_gb * (1 << 30)) or 4 << 30
    llm.generate([[1000] * 20], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up (kernel set-up)
    rows = []
    for mode in modes:
        kv_dir = args.kv_cache_dir or tempfile.mkdtemp(prefix="nanoflow-kv-")
        try:
            _configure(eng, mode, small, host, disk, kv_dir)
            rows.append({"mode": mode, **drive(eng, convs)})
            r = rows[-1]
            print(f"{mode}: {r['elapsed_s']:.1f} s, prefill computed {r['prefill_computed']}, "
                  f"{r['total_tokens_per_s']:.1f} tok/s, background offload copies {r['offload_copy_s']:.2f} s",
                  flush=True)
        finally:
            if eng.kv_tiers is not None:
                eng.kv_tiers.close(persist=False)
            if args.kv_cache_dir is None:
                shutil.rmtree(kv_dir, ignore_errors=True)
    title = (f"{args.workload}: {len(convs)} conversations, {sum(c.num_rounds for c in convs)} rounds; "
             f"device pool {eng.runner.kv_caches[0].shape[1]} blocks (small: {small}), host tier "
             f"{host / 2**20:.0f} MiB, disk tier {disk / 2**30:.1f} GiB, block {bs} tokens")
    print_rows(rows, title)
    if args.json:
        write_json(args.json, {"workload": args.workload, "num_conversations": len(convs), "dtype": args.dtype,
                               "small_device_blocks": small, "host_bytes": host, "disk_bytes": disk, "results": rows})
    return 0


def _configure(eng, mode: str, small_blocks: int, host: int, disk: int, kv_dir: str) -> None:
    """Fresh, cold KV bookkeeping for `mode` on the loaded engine (the KV tensors are reused: a small pool
    simply hands out fewer of their blocks)."""
    from nanoflow.engine.block_manager import BlockManager
    from nanoflow.engine.kv_tiers import KVTiers
    assert not eng.has_unfinished_requests()
    if eng.kv_tiers is not None:
        eng.kv_tiers.close(persist=False)
    caching, small, tiers = MODES[mode]
    sched, c = eng.scheduler, eng.scheduler.config
    c.num_blocks = small_blocks if small else eng.runner.kv_caches[0].shape[1]
    c.prefix_caching = caching
    sched.block_manager = BlockManager(c.num_blocks, c.block_size, caching, c.cache_salt)
    sched.kv_tiers = eng.kv_tiers = KVTiers(eng.runner.kv_caches, host, disk, kv_dir) if tiers else None
    sched.num_prefix_hit_tokens = sched.num_tier_hit_tokens = sched.num_preemptions = 0
    sched._avg_output_len = None
    eng.stats = type(eng.stats)()


def drive(eng, convs: list[Conversation], record: dict | None = None) -> dict:
    """Run every conversation to its last round; returns compute, reuse, throughput and TTFT
    (`record`, if given, receives each round's output token ids by request id)."""
    from nanoflow import SamplingParams
    live: dict[str, tuple] = {}  # request id -> (conversation, round, prompt, submit time)
    ttft: list[float] = []
    tokens = {"prompt": 0, "output": 0, "rounds": 0}

    def submit(ci: int, k: int, history: list[int]) -> None:
        prompt = history + convs[ci].user[k]
        rid = f"c{ci}r{k}"
        eng.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=convs[ci].output_lens[k],
                                                    ignore_eos=True))
        live[rid] = (ci, k, prompt, time.perf_counter())

    start = time.perf_counter()
    for ci in range(len(convs)):
        submit(ci, 0, [])
    first_seen: set[str] = set()
    while eng.has_unfinished_requests():
        for out in eng.step():
            rid, now = out.request_id, time.perf_counter()
            if rid not in first_seen and out.outputs[0].token_ids:
                first_seen.add(rid)
                ttft.append(now - live[rid][3])
            if out.finished:
                ci, k, prompt, _ = live.pop(rid)
                toks = out.outputs[0].token_ids
                assert len(toks) == convs[ci].output_lens[k], "lost tokens"
                if record is not None:
                    record[rid] = list(toks)
                tokens["prompt"] += len(prompt)
                tokens["output"] += len(toks)
                tokens["rounds"] += 1
                if k + 1 < convs[ci].num_rounds:
                    submit(ci, k + 1, prompt + toks)
    elapsed = time.perf_counter() - start
    st, tiers = eng.stats, eng.kv_tiers
    return {"rounds": tokens["rounds"], "prompt_tokens": tokens["prompt"], "output_tokens": tokens["output"],
            "prefill_computed": st.prompt_tokens, "prefix_hit_tokens": st.prefix_hit_tokens,
            "tier_hit_tokens": st.tier_hit_tokens, "computed_tokens": st.prompt_tokens + tokens["output"],
            "elapsed_s": elapsed, "total_tokens_per_s": (tokens["prompt"] + tokens["output"]) / elapsed,
            "mean_ttft_s": sum(ttft) / max(1, len(ttft)), "preemptions": eng.scheduler.num_preemptions,
            "offloaded_blocks": tiers.num_offloaded if tiers else 0,
            "host_hit_blocks": tiers.num_host_hits if tiers else 0,
            "disk_hit_blocks": tiers.num_disk_hits if tiers else 0, "offload_copy_s": tiers.copy_s if tiers else 0.0}


def print_rows(rows: list[dict], title: str) -> None:
    base = rows[0]
    table = Table(title=title)
    cols = ("mode", "prefill computed", "prefix hits", "tier hits", "compute ÷", "prefill ÷", "total tok/s",
            "tput vs first", "mean TTFT s", "preempt", "offl/host/disk blocks")
    for i, h in enumerate(cols):
        table.add_column(h, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
    for r in rows:
        table.add_row(r["mode"], str(r["prefill_computed"]), str(r["prefix_hit_tokens"]), str(r["tier_hit_tokens"]),
                      f"{base['computed_tokens'] / r['computed_tokens']:.2f}x",
                      f"{base['prefill_computed'] / max(1, r['prefill_computed']):.2f}x",
                      f"{r['total_tokens_per_s']:.1f}", f"{r['total_tokens_per_s'] / base['total_tokens_per_s']:.3f}",
                      f"{r['mean_ttft_s']:.2f}", str(r["preemptions"]),
                      f"{r['offloaded_blocks']}/{r['host_hit_blocks']}/{r['disk_hit_blocks']}")
    Console(width=max(Console().width, 160)).print(table)
    print("compute = prefill tokens computed + decode tokens; ÷ = the first mode's over this mode's "
          "(how many times less work); total tok/s counts every round's whole prompt + output.")
