"""`nanoflow profile` and `nanoflow tune` (argument parsing and output; the work is in profile.py/search.py)."""
from __future__ import annotations

import argparse
import json
import os

import torch


def _common(p: argparse.ArgumentParser) -> None:
    from nanoflow.config import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--tile", type=int, default=None, help="token-count step of the profile (128 GPU, 32 CPU)")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode tokens of the synthetic step "
                   "(default: half the dense batch; the rest is prefill)")
    p.add_argument("--context-len", type=int, default=256, help="context of each decode token")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds of repeats per solo timing")
    p.add_argument("--window", type=float, default=0.3, help="seconds per co-run")
    p.add_argument("--refresh", action="store_true", help="re-measure even if a stored profile exists")
    p.add_argument("--out", default=None, help="also write the result (JSON) here")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="profile / tune rank 0's shard, with all-reduces timed over this many ranks on this machine")


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--max-nano", type=int, default=3, help="largest number of nano-batches Stage I tries")
    p.add_argument("--layers", type=int, default=2, help="layers unrolled in the MILPs (cross-layer overlap)")
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds per MILP solve (HiGHS)")
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds per candidate")
    p.add_argument("--measure-layers", type=int, default=4, help="model layers run when measuring candidates")


def load_model(args):
    from nanoflow.config import resolve_device
    from nanoflow.models.loader import build_model, load_config, parse_dtype, resolve_model
    device = resolve_device(args.device)  # the engine's rule and errors
    src = resolve_model(args.model)
    cfg = load_config(src)
    shard = None
    if args.tensor_parallel_size > 1:
        from nanoflow.distributed.shard import TPShard
        shard = TPShard.of(cfg, 0, args.tensor_parallel_size)
    return build_model(src, cfg, parse_dtype(args.dtype, device), device=torch.device(device), shard=shard)


def _grid(args) -> dict:
    """The profile grid; also fills in --dense-batch's default (the engine's, for this device and dtype)."""
    if args.dense_batch is None:
        from nanoflow.config import EngineConfig
        args.dense_batch = EngineConfig(dtype=args.dtype, device=args.device).dense_batch
    if args.dense_batch < 1:
        raise ValueError(f"--dense-batch must be at least 1, got {args.dense_batch}")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be at least 1, got {args.tile}")
    g = {"tile": args.tile, "context_len": args.context_len, "min_time": args.min_time, "window": args.window}
    if args.decode_tokens is not None:
        if not 0 <= args.decode_tokens <= args.dense_batch:
            raise ValueError(f"--decode-tokens must lie in [0, {args.dense_batch}], got {args.decode_tokens}")
        g["num_decode"] = args.decode_tokens
    return g


def run_profile_cmd(args) -> int:
    from nanoflow.autosearch.interference import format_table
    from nanoflow.autosearch.profile import load_or_profile
    grid = _grid(args)  # bad options fail before the model loads
    model = load_model(args)
    prof, path = load_or_profile(model, args.dense_batch, refresh=args.refresh, **grid)
    print(f"profile: {path}")
    rows = prof.solo["qkv"][f"{1.0:.3f}"]
    print(f"{'op':14s} " + " ".join(f"{k:>10s}" for k in rows) + "   (ms by rows, full share)")
    for op, by_share in prof.solo.items():
        print(f"{op:14s} " + " ".join(f"{1e3 * v:10.3f}" for v in by_share[f"{1.0:.3f}"].values()))
    for c in prof.coruns:
        print(f"co-run {c['compute_op']} + {c['other_op']} on {c['config']}: R={c['r_compute']:.2f} "
              f"P={c['p_other']:.2f}")
    print(format_table(prof.rp))
    if args.out:
        prof.save(args.out)
    return 0


def run_tune_cmd(args) -> int:
    from nanoflow.autosearch.search import tune
    grid = _grid(args)
    if args.max_nano < 1 or args.layers < 1 or args.rounds < 1 or args.measure_layers < 1 or args.time_limit <= 0:
        raise ValueError("--max-nano, --layers, --rounds and --measure-layers must be >= 1, --time-limit > 0")
    model = load_model(args)
    if args.out and os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plan, decision = tune(model, args.dense_batch, out=args.out, refresh=args.refresh, layers=args.layers,
                          max_nano=args.max_nano, time_limit=args.time_limit, rounds=args.rounds,
                          measure_layers=args.measure_layers, **grid)
    print(json.dumps({"decision": decision, "plan": plan.meta.get("name"), "executor": plan.meta.get("executor"),
                      "out": args.out}))
    return 0
