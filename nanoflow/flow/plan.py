"""Plans: how one step's nano-operations are split, placed on execution units and ordered (a small JSON file).

    {"version": 1, "dense_batch": 256,
     "units": [{"name": "compute", "kinds": ["compute", "other"], "share": 0.5},
               {"name": "memory", "kinds": ["memory"], "share": 0.5}],
     "nano_batches": {"qkv": [0, 128, 256], ...},          # boundaries in tokens of the dense batch, per op
     "order": {"compute": ["attn_norm#0", "qkv#0", ...], "memory": ["decode_attn#0", "decode_attn#1"]},
     "cross_layer": true}

`<op>#<i>` is nano-operation i of op (token rows [b_i, b_i+1) of the op's boundaries). Each unit runs its order
once per layer, layer after layer; with `cross_layer` a unit may start layer l+1 while others finish layer l
(dependencies still hold), without it every layer ends with a barrier. At run time a step with T tokens clips
ranges to T and skips empty ones; the last range of each op stretches to T if T > dense_batch. `share` is the
unit's part of the device (CPU cores; SMs on a GPU).

Dependencies (the paper's rule): nano-op B depends on nano-op A when A comes first (earlier in the layer, or in
the previous layer), they touch a common buffer with at least one writing it (kv_cache is per layer), and
their token ranges intersect - except that prefill attention on [a, b) needs the KV written for every earlier
token, so it depends on rope_append ranges intersecting [0, b) (the chunk's earlier tokens; requests are not
known when the plan is made, so this is conservative).
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field

from nanoflow.flow.ops import ALL_REDUCES, KINDS, NETWORK_OPS, Operation, layer_operations

NanoId = tuple[str, int]  # (op name, nano-op index)
# Ops that read the KV of all earlier tokens of their requests (not only their own rows).
CONTEXT_READERS = {"prefill_attn"}


class PlanError(ValueError):
    """A plan breaks `rule` (format, coverage, issue, unit kind, dependency, deadlock)."""

    def __init__(self, rule: str, where: str) -> None:
        super().__init__(f"{rule}: {where}")
        self.rule = rule


@dataclass
class Unit:
    name: str
    kinds: list[str]
    share: float = 1.0


@dataclass
class Plan:
    dense_batch: int
    units: list[Unit]
    nano_batches: dict[str, list[int]]
    order: dict[str, list[str]]
    cross_layer: bool = True
    version: int = 1
    meta: dict = field(default_factory=dict)  # free-form notes (who made it, predicted times)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            units = [Unit(u["name"], list(u["kinds"]), float(u.get("share", 1.0))) for u in d["units"]]
            return cls(int(d["dense_batch"]), units, {k: list(v) for k, v in d["nano_batches"].items()},
                       {k: list(v) for k, v in d["order"].items()}, bool(d.get("cross_layer", True)),
                       int(d.get("version", 1)), dict(d.get("meta", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise PlanError("format", f"missing or malformed field {e}") from None

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in ("version", "dense_batch", "units", "nano_batches", "order", "cross_layer", "meta")}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def ranges(self, op: str) -> list[tuple[int, int]]:
        b = self.nano_batches[op]
        return list(zip(b[:-1], b[1:]))

    def unit_of(self) -> dict[NanoId, tuple[int, int]]:
        """nano-op -> (unit index, position in that unit's per-layer order)."""
        return {parse_nano(s): (u, p) for u, unit in enumerate(self.units) for p, s in enumerate(self.order[unit.name])}


def parse_nano(s: str) -> NanoId:
    op, _, i = s.partition("#")
    if not i.isdigit():
        raise PlanError("issue", f"{s!r} is not '<op>#<index>'")
    return op, int(i)


def nano_str(n: NanoId) -> str:
    return f"{n[0]}#{n[1]}"


def sequential_plan(dense_batch: int, tp_size: int = 1) -> Plan:
    """One nano-batch, one unit that runs every kind: the baseline."""
    ops = layer_operations(tp_size)
    return Plan(dense_batch, [Unit("main", list(KINDS), 1.0)], {o.name: [0, dense_batch] for o in ops},
                {"main": [f"{o.name}#0" for o in ops]}, meta={"name": "sequential"})


def overlap_plan(dense_batch: int, split: int | None = None, memory_share: float = 0.5, tp_size: int = 1) -> Plan:
    """The paper's single-device (8B) pipeline: every op in 2 nano-ops at `split` (default half the batch;
    decode tokens come first, so nano-batch 0 is mostly decode), decode attention on a memory unit so
    decode_attn#0 overlaps qkv#1 and decode_attn#1 overlaps the O/FFN GEMMs of nano-batch 0.
    With tensor parallelism (the paper's 70B pipeline) the all-reduces run on a network unit: nano-batch 1's
    attention and O GEMM overlap nano-batch 0's attention all-reduce, and each nano-batch's MLP overlaps the
    other's all-reduce."""
    split = dense_batch // 2 if split is None else split
    if not 0 < split < dense_batch:
        raise PlanError("coverage", f"split {split} must lie inside (0, {dense_batch})")
    ops = layer_operations(tp_size)
    head = ["attn_norm#0", "qkv#0", "rope_append#0", "attn_norm#1", "qkv#1", "rope_append#1"]
    units = [Unit("compute", ["compute", "other"], round(1 - memory_share, 3)), Unit("memory", ["memory"], memory_share)]
    order = {"memory": ["decode_attn#0", "decode_attn#1"]}
    if tp_size > 1:
        attn = [f"{o}#{i}" for i in (0, 1) for o in ("prefill_attn", "o_proj")]
        mlp = [f"{o}#{i}" for i in (0, 1) for o in ("ffn_norm", "gate_up", "down")]
        order["compute"] = head + attn + mlp
        order["network"] = [f"{o}#{i}" for o in ("attn_all_reduce", "mlp_all_reduce") for i in (0, 1)]
        units.append(Unit("network", ["network"], 0.1))
    else:
        order["compute"] = head + [f"{o}#{i}" for i in (0, 1)
                                   for o in ("prefill_attn", "o_proj", "ffn_norm", "gate_up", "down")]
    return Plan(dense_batch, units, {o.name: [0, split, dense_batch] for o in ops}, order,
                meta={"name": "overlap-2"})


def nanobatch_plan(dense_batch: int, split: int | None = None, tp_size: int = 1) -> Plan:
    """The same splits on one unit (the paper's nano-batching-without-overlap ablation)."""
    p = overlap_plan(dense_batch, split, tp_size=tp_size)
    after = {f"{gemm}#{i}": [f"{ar.name}#{i}"] for gemm, ar in ALL_REDUCES.items() for i in (0, 1)} \
        if tp_size > 1 else {}
    tail = [s for n in p.order["compute"][6:] for s in [n] + after.get(n, [])]
    order = p.order["compute"][:6] + p.order["memory"] + tail
    return Plan(dense_batch, [Unit("main", list(KINDS), 1.0)], p.nano_batches, {"main": order},
                meta={"name": "nanobatch-2"})


def plan_operations(plan: Plan) -> list[Operation]:
    """The layer operations a plan covers: with all-reduces when it was made for tensor parallelism."""
    return layer_operations(2 if any(n in plan.nano_batches for n in NETWORK_OPS) else 1)


def hazard(a: Operation, b: Operation, same_layer: bool) -> set[str]:
    """Buffers that order op a before op b (one writes what the other touches); kv_cache only within a layer."""
    bufs = (set(a.writes) & (set(b.reads) | set(b.writes))) | (set(a.reads) & set(b.writes))
    return bufs if same_layer else bufs - {"kv_cache"}


def dependencies(plan: Plan, ops: list[Operation]) -> dict[NanoId, list[tuple[NanoId, int]]]:
    """nano-op -> [(nano-op it waits for, layer offset 0 or -1)] (all of them, not a transitive reduction)."""
    deps: dict[NanoId, list[tuple[NanoId, int]]] = {}
    for j, b in enumerate(ops):
        for bi, (b0, b1) in enumerate(plan.ranges(b.name)):
            out = deps.setdefault((b.name, bi), [])
            for i, a in enumerate(ops):
                for offset in ((0, -1) if i < j else (-1,)):
                    bufs = hazard(a, b, offset == 0)
                    if not bufs:
                        continue
                    lo = 0 if offset == 0 and "kv_cache" in bufs and b.name in CONTEXT_READERS else b0
                    out += [((a.name, ai), offset) for ai, (a0, a1) in enumerate(plan.ranges(a.name))
                            if a0 < b1 and lo < a1]
    return deps


def validate(plan: Plan, ops: list[Operation] | None = None) -> None:
    """Raise PlanError naming the broken rule and where; return None for a valid plan."""
    ops = plan_operations(plan) if ops is None else ops
    _check_format(plan)
    _check_coverage(plan, ops)
    where = _check_issue(plan, ops)
    deps = dependencies(plan, ops)
    for n, ds in deps.items():
        for d, offset in ds:
            (u, p), (du, dp) = where[n], where[d]
            if offset == 0 and u == du and dp > p:
                raise PlanError("dependency", f"{nano_str(n)} is issued before {nano_str(d)} on unit "
                                f"'{plan.units[u].name}' but depends on it")
    _check_deadlock(plan, deps, where)


def _check_format(plan: Plan) -> None:
    if plan.version != 1:
        raise PlanError("format", f"unknown version {plan.version}")
    if plan.dense_batch < 1 or not plan.units:
        raise PlanError("format", "dense_batch must be >= 1 and there must be at least one unit")
    names = [u.name for u in plan.units]
    if len(set(names)) != len(names):
        raise PlanError("format", f"duplicate unit names {names}")
    for u in plan.units:
        if bad := [k for k in u.kinds if k not in KINDS]:
            raise PlanError("format", f"unit '{u.name}' has unknown kinds {bad} (known: {list(KINDS)})")
        if not 0 < u.share <= 1:
            raise PlanError("format", f"unit '{u.name}' share {u.share} is not in (0, 1]")


def _check_coverage(plan: Plan, ops: list[Operation]) -> None:
    names = {o.name for o in ops}
    if extra := sorted(set(plan.nano_batches) - names):
        raise PlanError("coverage", f"nano_batches names unknown operations {extra}")
    for o in ops:
        b = plan.nano_batches.get(o.name)
        if not b or len(b) < 2 or any(not isinstance(x, int) for x in b):
            raise PlanError("coverage", f"op '{o.name}' needs integer boundaries [0, ..., {plan.dense_batch}]")
        if b[0] != 0:
            raise PlanError("coverage", f"op '{o.name}': tokens [0, {b[0]}) are not covered")
        if b[-1] != plan.dense_batch:
            lo, hi = sorted((b[-1], plan.dense_batch))
            what = "are not covered" if b[-1] < plan.dense_batch else "lie outside the dense batch"
            raise PlanError("coverage", f"op '{o.name}': tokens [{lo}, {hi}) {what}")
        for i, (x, y) in enumerate(zip(b[:-1], b[1:])):
            if y < x:
                raise PlanError("coverage", f"op '{o.name}': nano-batches {i} and {i + 1} overlap on tokens "
                                f"[{y}, {x}) (covered twice)")
            if y == x:
                raise PlanError("coverage", f"op '{o.name}': nano-batch {i} [{x}, {y}) is empty")


def _check_issue(plan: Plan, ops: list[Operation]) -> dict[NanoId, tuple[int, int]]:
    kinds = {o.name: o.kind for o in ops}
    if extra := sorted(set(plan.order) - {u.name for u in plan.units}):
        raise PlanError("issue", f"order names unknown units {extra}")
    where: dict[NanoId, tuple[int, int]] = {}
    for u, unit in enumerate(plan.units):
        for p, s in enumerate(plan.order.get(unit.name, [])):
            n = parse_nano(s)
            if n[0] not in kinds or not 0 <= n[1] < len(plan.nano_batches[n[0]]) - 1:
                raise PlanError("issue", f"'{s}' on unit '{unit.name}' is not a nano-operation of this plan")
            if n in where:
                raise PlanError("issue", f"'{s}' is issued twice (units '{plan.units[where[n][0]].name}' "
                                f"and '{unit.name}')")
            if kinds[n[0]] not in unit.kinds:
                raise PlanError("unit kind", f"unit '{unit.name}' (kinds {unit.kinds}) cannot run '{s}' "
                                f"({kinds[n[0]]})")
            where[n] = (u, p)
    for o in ops:
        for i in range(len(plan.nano_batches[o.name]) - 1):
            if (o.name, i) not in where:
                raise PlanError("issue", f"'{o.name}#{i}' is never issued")
    return where


def _check_deadlock(plan: Plan, deps, where) -> None:
    """Kahn's topological sort over one layer's nano-ops with dependency edges plus each unit's issue order
    (cross-layer edges only point forward, so a cycle lies within one layer)."""
    succ: dict[NanoId, list[NanoId]] = {n: [] for n in where}
    indeg = dict.fromkeys(where, 0)
    edges = [(d, n) for n, ds in deps.items() for d, off in ds if off == 0]
    for unit in plan.units:
        seq = [parse_nano(s) for s in plan.order.get(unit.name, [])]
        edges += list(zip(seq[:-1], seq[1:]))
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    ready = deque(n for n, k in indeg.items() if k == 0)
    while ready:
        for m in succ[ready.popleft()]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    stuck = [n for n, k in indeg.items() if k > 0]
    if stuck:
        names = ", ".join(f"{nano_str(n)} on '{plan.units[where[n][0]].name}'" for n in sorted(stuck, key=where.get))
        raise PlanError("deadlock", f"these nano-ops wait for each other across units: {names}")


def issue_order(plan: Plan, ops: list[Operation] | None = None) -> list[NanoId]:
    """One layer's nano-ops merged into a single dependency-respecting sequence (round-robin over the units'
    orders): what a single issuer runs (the nanobatch executor, a CUDA launch loop)."""
    ops = plan_operations(plan) if ops is None else ops
    deps = dependencies(plan, ops)
    seqs = [[parse_nano(s) for s in plan.order.get(u.name, [])] for u in plan.units]
    heads, done, out, u = [0] * len(seqs), set(), [], 0
    total = sum(map(len, seqs))
    while len(out) < total:
        for k in range(len(seqs)):
            v = (u + k) % len(seqs)
            if heads[v] < len(seqs[v]):
                n = seqs[v][heads[v]]
                if all(d in done for d, off in deps[n] if off == 0):
                    out.append(n)
                    done.add(n)
                    heads[v] += 1
                    u = (v + 1) % len(seqs)
                    break
        else:
            raise PlanError("deadlock", "no unit can issue its next nano-op (validate the plan first)")
    return out
