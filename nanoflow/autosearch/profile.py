"""`nanoflow profile`: time every operation per token count and resource share, then pairwise co-runs
reduced to the paper's R -> P table (§4.1.1). Stored per (model shape, device, dtype) under
~/.cache/nanoflow/profiles/ and reused by `nanoflow tune`.

A synthetic step stands in for a real one: `num_decode` decode tokens with `context_len` tokens of paged
context, then prefill chunks of `prefill_len` tokens (decode first, prefill last, as the runner lays steps out).
Shares are CPU cores here (worker threads pinned with `cpu_units.limit_this_thread`) or SMs on a GPU
(green-context streams of `cuda_units`; that path has not been run on a GPU).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from nanoflow.flow.ops import StepState, run_op
from nanoflow.kernels.attention import AttentionMetadata, PrefillChunk
from nanoflow.autosearch.interference import CoRun, rp_tables
from nanoflow.env import cache_dir

ROW_KIND = {"decode_attn": "decode", "prefill_attn": "prefill"}  # rows an op works on within a range
CORUN_PAIRS = [("gate_up", "decode_attn"), ("qkv", "decode_attn")]  # compute x memory (network: TP only)


@dataclass
class Profile:
    key: dict
    tile: int
    dense_batch: int
    num_decode: int
    context_len: int
    shares: list[float]
    solo: dict[str, dict[str, dict[str, float]]]  # op -> share -> rows -> seconds
    coruns: list[dict] = field(default_factory=list)
    rp: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0  # how long profiling took

    def duration(self, op: str, rows: int, share: float = 1.0) -> float:
        """Seconds for `rows` rows at a share: linear between profiled counts (and through 0 below the first)."""
        if rows <= 0:
            return 0.0
        table = self.solo[op][_share_key(share)]
        pts = [(0, 0.0)] + sorted((int(k), v) for k, v in table.items())
        if len(pts) == 1:  # no rows of this kind in the profiled step
            return 0.0
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if rows <= x1:
                return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = pts[-2], pts[-1]  # beyond the grid: extend the last segment
        return y1 + (y1 - y0) * (rows - x1) / max(1, x1 - x0)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Profile":
        with open(path) as f:
            return cls(**json.load(f))


def _share_key(share: float) -> str:
    return f"{share:.3f}"


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda:{p.name}:{p.multi_processor_count}sm"
    return f"cpu:{platform.processor() or platform.machine()}:{len(os.sched_getaffinity(0))}cores"


def profile_key(cfg, dtype: torch.dtype, device: torch.device, **grid) -> dict:
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                                          "head_dim", "vocab_size")}
    return {"model": shape, "device": device_tag(device), "dtype": str(dtype).replace("torch.", ""), **grid}


def tp_key(model) -> dict:
    """Part of a profile/plan key: the tensor-parallel size where there is one (single-device keys unchanged)."""
    return {"tp_size": model.tp_size} if model.tp_size > 1 else {}


def cache_path(kind: str, key: dict) -> str:
    """~/.cache/nanoflow/<kind>/<hash of key>.json (kind: profiles or plans; NANOFLOW_CACHE_DIR moves it)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(kind), f"{digest}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def synthetic_step(model, dense_batch: int, num_decode: int, context_len: int, prefill_len: int = 128,
                   block_size: int = 16, num_layers: int | None = None):
    """(input_ids, positions, meta, kv_caches) of a full step: decode tokens first, then prefill chunks."""
    cfg, dev = model.cfg, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_decode = min(num_decode, dense_batch)
    per_req = -(-context_len // block_size)
    chunks, left = [], dense_batch - num_decode
    while left > 0:
        chunks.append(min(prefill_len, left))
        left -= chunks[-1]
    num_blocks = num_decode * per_req + sum(-(-c // block_size) for c in chunks) + 1
    ids = torch.randint(0, cfg.vocab_size, (dense_batch,), generator=torch.Generator().manual_seed(0))
    pos, slots, next_block = [], [], 1  # block 0 stays unused (padding of block tables)
    tables = []
    for _ in range(num_decode):
        tables.append(list(range(next_block, next_block + per_req)))
        next_block += per_req
        pos.append(context_len - 1)
        slots.append(tables[-1][(context_len - 1) // block_size] * block_size + (context_len - 1) % block_size)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=num_decode)
    if num_decode:
        meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
        meta.decode_context_lens = torch.full((num_decode,), context_len, dtype=torch.long, device=dev)
        meta.decode_max_len = context_len
    row = num_decode
    for c in chunks:
        blocks = list(range(next_block, next_block + -(-c // block_size)))
        next_block += len(blocks)
        pos += list(range(c))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(c)]
        meta.prefills.append(PrefillChunk(row, c, c, torch.tensor(blocks, dtype=torch.long, device=dev)))
        row += c
    meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
    shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    kv = [torch.randn(shape, generator=torch.Generator().manual_seed(i)).mul_(0.5).to(dev, dtype)
          for i in range(num_layers or cfg.num_layers)]
    return ids.to(dev), torch.tensor(pos, dtype=torch.long, device=dev), meta, kv


def op_range(op: str, rows: int, num_decode: int) -> tuple[int, int]:
    """Token range giving `op` `rows` rows of its kind (decode rows lie first, prefill rows after them)."""
    if ROW_KIND.get(op) == "prefill":
        return num_decode, num_decode + rows
    return 0, rows


def token_grid(dense_batch: int, tile: int) -> list[int]:
    grid = list(range(tile, dense_batch + 1, tile))
    return grid if grid and grid[-1] == dense_batch else grid + [dense_batch]


def default_tile(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32  # the GEMM tile on a GPU; finer steps on a CPU


def run_profile(model, dense_batch: int, num_decode: int | None = None, context_len: int = 256,
                tile: int | None = None, min_time: float = 0.02, window: float = 0.3, log=print) -> Profile:
    """Solo timings per (op, rows, share) and co-runs -> R -> P, on layer 0 of a synthetic step."""
    t_begin = time.perf_counter()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tile = tile or default_tile(dev)
    num_decode = dense_batch // 2 if num_decode is None else num_decode
    ids, pos, meta, kv = synthetic_step(model, dense_batch, num_decode, context_len, num_layers=1)
    with torch.inference_mode():
        state = StepState(model, ids, pos, meta, kv, split=True)
        ops = [o.name for o in model.operations() if o.kind != "network"]  # network: netprofile.py
        for op in ops:  # fill every buffer once so each op finds real inputs
            run_op(model, 0, op, state, 0, dense_batch)
    gpu = dev.type == "cuda"
    if gpu:
        from nanoflow.autosearch import measure
        total = torch.cuda.get_device_properties(dev).multi_processor_count
        shares = [c / total for c in measure.gpu_share_ladder(total)[::2]] + [1.0]
    else:
        from nanoflow.autosearch import measure
        all_cores = sorted(os.sched_getaffinity(0))
        if model.tp_size > 1:  # rank 0 of a tensor-parallel engine owns its block of the cores only
            from nanoflow.distributed.launch import rank_cores
            all_cores = rank_cores(0, model.tp_size)
        shares = measure.cpu_shares(len(all_cores))
    key = profile_key(model.cfg, dtype, dev, dense_batch=dense_batch, tile=tile, num_decode=num_decode,
                      context_len=context_len, **tp_key(model))
    solo: dict[str, dict[str, dict[str, float]]] = {op: {} for op in ops}
    grid_of = {op: token_grid(num_decode if ROW_KIND.get(op) == "decode" else
                              dense_batch - num_decode if ROW_KIND.get(op) == "prefill" else dense_batch, tile)
               for op in ops}

    def call(op, rows):
        a, b = op_range(op, rows, num_decode)
        return lambda: run_op(model, 0, op, state, a, b)

    for share in shares:
        def sweep():
            out = {}
            for op in ops:
                out[op] = {str(r): _time(call(op, r), gpu, min_time) for r in grid_of[op] if r > 0}
            return out
        if gpu:  # NOT RUN: the op on a green-context stream of `share` of the SMs, the rest idle
            n = round(share * total)
            streams = measure.gpu_streams({"p": n, "rest": total - n}, dev) if n < total else None
            with torch.cuda.stream(streams["p"]) if streams else contextlib.nullcontext():
                res = sweep()
        else:
            res = measure.on_cores(measure.cores_for(share, all_cores), sweep)
        for op, t in res.items():
            solo[op][_share_key(share)] = t
        log(f"profile: solo timings at share {share:.2f} done ({time.perf_counter() - t_begin:.1f}s)")
    coruns = []
    if model.tp_size > 1:
        from nanoflow.autosearch.netprofile import profile_network_ops
        coruns = profile_network_ops(model, call, solo, shares, token_grid(dense_batch, tile), all_cores, _share_key)
        log(f"profile: all-reduces over {model.tp_size} ranks done ({time.perf_counter() - t_begin:.1f}s)")
    prof = Profile(key, tile, dense_batch, num_decode, context_len, shares, solo)
    prof.coruns = [asdict(c) for c in _coruns(model, state, prof, call, window, gpu) + coruns]
    prof.rp = rp_tables([CoRun(**c) for c in prof.coruns])
    prof.seconds = round(time.perf_counter() - t_begin, 2)
    log(f"profile: {len(prof.coruns)} co-runs, done in {prof.seconds:.1f}s")
    return prof


def _time(fn, gpu: bool, min_time: float) -> float:
    from nanoflow.autosearch.measure import time_fn
    return time_fn(fn, min_time, sync=torch.cuda.synchronize if gpu else (lambda: None))


def _coruns(model, state, prof: Profile, call, window: float, gpu: bool) -> list[CoRun]:
    """Each (compute, memory) pair on a nano-batch: solo rates on the whole device, then side by side
    under every way of sharing it; R = compute's co-run rate / solo rate, P likewise for the memory op."""
    half, dec = prof.dense_batch // 2, max(1, prof.num_decode // 2)
    out = []
    for comp, mem in CORUN_PAIRS:
        fa, fb = call(comp, half), call(mem, dec)
        solo_a = 1.0 / prof.duration(comp, half)
        solo_b = 1.0 / prof.duration(mem, dec)
        for label, ra, rb in _corun_configs(fa, fb, window, gpu):
            out.append(CoRun(comp, mem, "memory", label, round(ra / solo_a, 4), round(rb / solo_b, 4)))
    return out


def _corun_configs(fa, fb, window: float, gpu: bool):
    from nanoflow.autosearch import measure
    if gpu:  # NOT RUN: compute on n SMs, memory on the rest, for a ladder of n
        dev = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(dev).multi_processor_count
        for n in measure.gpu_share_ladder(total)[1:-1:2]:
            streams = measure.gpu_streams({"a": n, "b": total - n}, dev)
            ra, rb = measure.corun_gpu(fa, fb, (streams["a"], streams["b"]))
            yield f"{n}+{total - n} SMs", ra, rb
        return
    cores = sorted(os.sched_getaffinity(0))
    n = len(cores)
    configs = [(cores[:k], cores[k:]) for k in range(1, n)] + [(cores, cores), (cores, cores[:1]), (cores[:1], cores)]
    for ca, cb in configs:
        ra, rb = measure.corun_cpu(fa, ca, fb, cb, window)
        yield f"cores {ca}+{cb}", ra, rb


def load_or_profile(model, dense_batch: int, refresh: bool = False, log=print, **grid) -> tuple[Profile, str]:
    """The stored profile for this (model shape, device, dtype, grid), measured once."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = {"tile": grid.get("tile") or default_tile(dev), "num_decode": grid.get("num_decode", dense_batch // 2),
         "context_len": grid.get("context_len", 256)}
    path = cache_path("profiles", profile_key(model.cfg, dtype, dev, dense_batch=dense_batch, **tp_key(model), **g))
    if not refresh and os.path.exists(path):
        log(f"profile: reusing {path}")
        return Profile.load(path), path
    prof = run_profile(model, dense_batch, g["num_decode"], g["context_len"], g["tile"], log=log,
                       **{k: grid[k] for k in ("min_time", "window") if k in grid})
    prof.save(path)
    return prof, path
