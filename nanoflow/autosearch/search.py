"""`nanoflow tune`: profile -> Stage I/II MILPs -> candidate plans -> measured on this device -> the fastest.

The `sequential` plan is always a candidate; when it wins (overlap does not pay on this hardware) tune says so
and returns it. Plans are cached per (model shape, dtype, dense batch, device) under ~/.cache/nanoflow/plans/
for `--plan auto`; every plan produced passes `flow.plan.validate`.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass, replace

import torch

from nanoflow.flow.executor import make_executor
from nanoflow.flow.ops import layer_operations
from nanoflow.flow.plan import CONTEXT_READERS, Plan, Unit, hazard, sequential_plan, validate
from nanoflow.autosearch.milp import search_structure, stage2
from nanoflow.autosearch.problem import OpSpec, Problem, Schedule
from nanoflow.autosearch.profile import ROW_KIND, Profile, cache_path, load_or_profile, profile_key, synthetic_step, tp_key

UNIT_KINDS = {"compute": ["compute", "other"], "memory": ["memory"], "network": ["network"]}


@dataclass
class Candidate:
    name: str
    executor: str  # sequential | nanobatch | overlap
    plan: Plan
    predicted_s: float  # MILP makespan per layer (seconds)
    measured_s: float = float("nan")  # step time per layer on the device (fastest round)
    cpu_s: float = float("nan")  # process CPU-seconds per layer (fastest round)


def op_specs(tp_size: int = 1) -> list[OpSpec]:
    """The layer's operations for the MILP, with dependencies from the buffers they share (plan.py's rule)."""
    ops = layer_operations(tp_size)
    return [OpSpec(b.name, b.kind, tuple(a.name for a in ops[:j] if hazard(a, b, True)),
                   ROW_KIND.get(b.name, "all"), b.name in CONTEXT_READERS) for j, b in enumerate(ops)]


def make_problem(prof: Profile, cfg=None, layers: int = 2, time_limit: float = 20.0,
                 shares: tuple[float, ...] | None = None) -> Problem:
    return Problem(op_specs(prof.key.get("tp_size", 1)), prof.dense_batch, prof.num_decode, prof.duration, tile=prof.tile, layers=layers,
                   rp=prof.rp, shares=tuple(shares or prof.shares), time_limit=time_limit)


def plan_from_schedule(s: Schedule, cfg, dense_batch: int, name: str, tp_size: int = 1) -> Plan:
    """Layer 0's per-unit start order becomes the plan's issue order; the cut is common to all ops."""
    if s.num_nano == 1 and len([u for u, seq in s.order.items() if seq]) <= 1:
        return sequential_plan(dense_batch, tp_size)
    units = [Unit(u, UNIT_KINDS[u], round(min(1.0, s.shares.get(u, 1.0)), 3)) for u in sorted(s.order)]
    order = {u: [f"{op}#{i}" for (layer, op, i) in seq if layer == 0] for u, seq in s.order.items()}
    plan = Plan(dense_batch, units, {o.name: list(s.splits) for o in layer_operations(tp_size)}, order,
                cross_layer=s.cross_layer(), meta={"name": name, "predicted_layer_s": s.makespan})
    validate(plan, layer_operations(tp_size))
    return plan


def candidates(prof: Profile, cfg, layers: int = 2, max_nano: int = 3, time_limit: float = 20.0,
               log=print) -> list[Candidate]:
    """sequential, plus per nano-batch count the Stage-II plan (overlapped) and its splits on one unit."""
    p, tp = make_problem(prof, cfg, layers, time_limit), prof.key.get("tp_size", 1)
    t0 = time.perf_counter()
    structures = search_structure(p, max_nano=max_nano)
    seq_time = structures[0].makespan / layers
    out = [Candidate("sequential", "sequential", sequential_plan(prof.dense_batch, tp), seq_time)]
    for s1 in structures[1:]:
        s2 = stage2(p, s1)
        log(f"tune: N={s1.num_nano} cut {s1.splits}: Stage I {1e3 * s1.makespan / layers:.2f} ms/layer, "
            f"Stage II {'-' if s2 is None else f'{1e3 * s2.makespan / layers:.2f}'} ms/layer "
            f"(sequential {1e3 * seq_time:.2f})")
        if s2 is None:
            continue
        bound = stage2(p, s1, per_nano=True)  # the paper's per-nano-op shares: what finer partitions could give
        if bound is not None:
            log(f"tune: N={s1.num_nano} Stage II with per-nano-op shares (paper's form): "
                f"{1e3 * bound.makespan / layers:.2f} ms/layer")
        name = f"milp-{s1.num_nano}"
        plan = plan_from_schedule(s2, cfg, prof.dense_batch, name, tp)
        if sum(s2.shares.values()) <= 1 + 1e-9:  # Stage II overlaps units: the pipelined plan
            out.append(Candidate(f"{name} overlap {s2.shares}", "overlap", plan, s2.makespan / layers))
        else:  # Stage II found overlap not worth its interference; still measure Stage I's pipeline, even shares
            even = {u: round(1 / len(s1.order), 3) for u in s1.order}
            s1.shares = even
            out.append(Candidate(f"{name} stage-I overlap {even}", "overlap",
                                 plan_from_schedule(s1, cfg, prof.dense_batch, f"{name}-stage1", tp),
                                 s1.makespan / layers))
        nb_time = sum(s1.durations.values()) / layers  # the same nano-ops back to back
        out.append(Candidate(f"{name} nanobatch", "nanobatch", plan, nb_time))
    log(f"tune: MILPs solved in {time.perf_counter() - t0:.1f}s")
    return out


def _shallow(model, num_layers: int):
    """The model with only its first layers (the same modules): candidates are compared per layer."""
    m = copy.copy(model)
    m._modules = dict(model._modules)
    m._modules["layers"] = torch.nn.ModuleList(list(model.layers)[:num_layers])
    return m


def measure(cands: list[Candidate], model, prof: Profile, rounds: int = 3, num_layers: int = 4,
            log=print) -> None:
    """Step time of each candidate on a synthetic full step: the fastest of `rounds` runs, candidates
    interleaved round by round, so load from other processes hits all of them alike (the minimum is the
    least disturbed run). Process CPU-seconds are recorded too: on a shared CPU a plan with more busy
    threads can win wall time by taking CPU from other processes rather than by overlapping better."""
    m = _shallow(model, min(num_layers, len(model.layers)))
    ids, pos, meta, kv = synthetic_step(m, prof.dense_batch, prof.num_decode, prof.context_len,
                                        num_layers=len(m.layers))
    execs = [make_executor(c.executor, c.plan, m, dense_batch=prof.dense_batch) for c in cands]
    wall: list[list[float]] = [[] for _ in cands]
    cpu: list[list[float]] = [[] for _ in cands]
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    try:
        for e in execs:  # warm-up: threads, OpenMP teams, lazy init
            e(ids, pos, meta, kv)
        for _ in range(rounds):
            for k, e in enumerate(execs):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                e(ids, pos, meta, kv)
                sync()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    finally:
        for e in execs:
            e.close()
    n = len(m.layers)
    for c, w, u in zip(cands, wall, cpu):
        c.measured_s, c.cpu_s = min(w) / n, min(u) / n
        log(f"tune: measured {c.name:48s} {1e3 * c.measured_s:8.2f} ms/layer (median "
            f"{1e3 * statistics.median(w) / n:.2f}, cpu {1e3 * c.cpu_s:.2f} ms; predicted {1e3 * c.predicted_s:.2f})")


def choose(cands: list[Candidate], min_gain: float = 0.05) -> tuple[Candidate, str]:
    """The fastest measured candidate, if it beats sequential by at least `min_gain` (noise margin)."""
    seq = next(c for c in cands if c.executor == "sequential")
    others = [c for c in cands if c is not seq]
    if not others:
        return seq, "overlap does not pay on this hardware: no alternative to sequential; choosing sequential"
    best = min(others, key=lambda c: c.measured_s)
    gain = (seq.measured_s - best.measured_s) / seq.measured_s
    if gain < min_gain:
        return seq, (f"overlap does not pay on this hardware: the best alternative ({best.name}) is "
                     f"{100 * gain:+.1f}% vs sequential (needs > {100 * min_gain:.0f}%); choosing sequential")
    return best, f"choosing {best.name}: {100 * gain:.1f}% faster than sequential per layer"


def confirm(best: Candidate, seq: Candidate, model, prof: Profile, rounds: int, num_layers: int,
            min_gain: float = 0.05, log=print) -> bool:
    """Head to head again (fresh executors, twice the rounds): a win must repeat to count."""
    a, b = copy.copy(best), copy.copy(seq)
    measure([b, a], model, prof, 2 * rounds, num_layers, log=log)
    return (b.measured_s - a.measured_s) / b.measured_s >= min_gain


def plan_key(model, dense_batch: int, device: torch.device) -> dict:
    return profile_key(model.cfg, next(model.parameters()).dtype, device, dense_batch=dense_batch, **tp_key(model))


def tune(model, dense_batch: int, out: str | None = None, refresh: bool = False, layers: int = 2,
         max_nano: int = 3, time_limit: float = 20.0, rounds: int = 3, measure_layers: int = 4, log=print,
         **grid) -> tuple[Plan, str]:
    """The whole pipeline; the chosen plan is cached for `--plan auto` and written to `out` if given."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    prof, ppath = load_or_profile(model, dense_batch, refresh=refresh, log=log, **grid)
    cands = candidates(prof, model.cfg, layers, max_nano, time_limit, log=log)
    if model.tp_size > 1:  # running a candidate needs every rank: choose on the profile-based prediction
        for c in cands:
            c.measured_s = c.predicted_s
        best, decision = choose(cands)
        decision += f" [tensor parallel ({model.tp_size} ranks): predicted from the profile, not measured]"
    else:
        measure(cands, model, prof, rounds, measure_layers, log=log)
        best, decision = choose(cands)
    if best.executor != "sequential" and model.tp_size == 1:
        seq = cands[0]
        if not confirm(best, seq, model, prof, rounds, measure_layers, log=log):
            best, decision = seq, f"overlap does not pay on this hardware: {best.name} did not repeat its win " \
                                  f"head to head; choosing sequential"
        else:
            decision += " (confirmed head to head)"
    load, ncores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > ncores:  # other processes compete for the cores: a unit-threaded plan may just grab more CPU
        decision += f" [shared machine: load average {load:.1f} on {ncores} cores; timings include contention]"
    plan = copy.deepcopy(best.plan)
    plan.meta.update({"name": best.name, "executor": best.executor, "decision": decision, "profile": ppath,
                      "load_average": round(load, 2), "cores": ncores,
                      "tune_seconds": round(time.perf_counter() - t0, 1),
                      "candidates": [{"name": c.name, "executor": c.executor, "predicted_layer_s": c.predicted_s,
                                      "measured_layer_s": c.measured_s, "cpu_layer_s": c.cpu_s} for c in cands]})
    validate(plan, model.operations())
    plan.save(cache_path("plans", plan_key(model, dense_batch, device)))
    if out:
        plan.save(out)
    log(f"tune: {decision} ({plan.meta['tune_seconds']}s in all)")
    return plan, decision


def resolve_auto_plan(config):
    """`plan="auto"` made concrete before an engine is built: the config with the path of the cached tuned plan
    for this model/dtype/dense batch/device, tuned once here if missing (tensor parallel: the stored plan, or
    an error saying what to run). Any other config comes back as it is; engines only ever load a plan file."""
    if config.plan != "auto":
        return config
    if config.executor == "sequential":  # runs no plan
        return replace(config, plan=None)
    from nanoflow.models.loader import load_config, parse_dtype, resolve_model
    model_config, dtype = load_config(resolve_model(config.model)), parse_dtype(config.dtype)
    if config.tensor_parallel_size > 1:
        return replace(config, plan=tensor_parallel_plan_path(model_config, dtype, config.device,
                                                              config.dense_batch, config.tensor_parallel_size))
    path = cache_path("plans", profile_key(model_config, dtype, torch.device(config.device),
                                           dense_batch=config.dense_batch))
    try:
        validate(Plan.load(path), layer_operations())
    except (OSError, ValueError):
        print(f"nanoflow: no tuned plan for this model/dtype/dense batch/device yet; running `nanoflow tune` "
              f"once (cached at {path})")
        from nanoflow.engine.runner import build_model_for
        from nanoflow.kernels import cpu_ext
        if config.num_threads:
            torch.set_num_threads(config.num_threads)  # measure with the threads the engine will use
        with cpu_ext.switched(config.cpp_kernels):  # and its kernels
            tune(build_model_for(config, model_config), config.dense_batch)
    return replace(config, plan=path)


def tensor_parallel_plan_path(cfg, dtype: torch.dtype, device, dense_batch: int, tp_size: int) -> str:
    """`--plan auto` under tensor parallelism: the plan `nanoflow tune --tensor-parallel-size N` stored (keyed by
    rank 0's shard, the rank it profiles); every rank loads the same file. Tuning needs every rank, so the engine
    does not tune on its own: a missing plan is an error saying what to run."""
    from nanoflow.distributed.shard import TPShard
    local = TPShard.of(cfg, 0, tp_size).local_config(cfg)
    path = cache_path("plans", profile_key(local, dtype, torch.device(device), dense_batch=dense_batch,
                                           tp_size=tp_size))
    if not os.path.exists(path):
        raise ValueError(f"--plan auto with tensor_parallel_size {tp_size}: no tuned plan yet; run `nanoflow tune "
                         f"--tensor-parallel-size {tp_size} --dense-batch {dense_batch}` with this model and dtype")
    return path
