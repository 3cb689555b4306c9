"""The auto-search's scheduling problem, shared by both MILP stages (`milp.py`): the layer's operations, the
problem (profiled durations, R -> P table, realizable shares), a schedule, and the nano-op dependency graph.

A nano-op is (layer, op name, nano-batch index); cuts into nano-batches are common to all ops.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

UNIT_OF_KIND = {"compute": "compute", "other": "compute", "memory": "memory", "network": "network"}


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: str  # compute | memory | network | other
    deps: tuple[str, ...] = ()  # ops of the same layer it waits for
    rows: str = "all"  # which rows of its range it works on: all | decode | prefill
    causal: bool = False  # reads its parents' rows [0, end) (prefill attention reads earlier chunks' K/V)


@dataclass
class Problem:
    ops: list[OpSpec]  # one layer, program order
    dense_batch: int
    num_decode: int  # rows [0, num_decode) are decode tokens, the rest prefill
    duration: Callable[[str, int], float]  # (op, rows) -> seconds at full share
    tile: int = 128
    layers: int = 2
    rp: dict[str, list[float]] = field(default_factory=dict)  # kind -> P at R = 0, 0.1, ..., 1
    shares: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # realizable shares of the device
    time_limit: float = 20.0


@dataclass
class Schedule:
    splits: list[int]  # nano-batch boundaries [0, ..., B]
    order: dict[str, list[tuple[int, str, int]]]  # unit -> [(layer, op, nano index)] in start order
    starts: dict[tuple[int, str, int], float]
    durations: dict[tuple[int, str, int], float]
    shares: dict[str, float]
    makespan: float  # seconds for `layers` layers
    status: str = ""
    nano_shares: dict[tuple[int, str, int], float] = field(default_factory=dict)  # Stage II per_nano only

    @property
    def num_nano(self) -> int:
        return len(self.splits) - 1

    def cross_layer(self) -> bool:
        """Does a later layer start before the previous one has finished (the pipeline crosses layers)?"""
        ends = {}
        for (l, _op, _i), s in self.starts.items():
            ends[l] = max(ends.get(l, 0.0), s + self.durations[(l, _op, _i)])
        return any(s < ends.get(l - 1, 0.0) - 1e-12 for (l, _o, _i), s in self.starts.items() if l > 0)


def rows_in(op: OpSpec, lo: int, hi: int, num_decode: int) -> int:
    """Rows of [lo, hi) the op works on (decode rows are [0, num_decode))."""
    if op.rows == "decode":
        return max(0, min(hi, num_decode) - lo)
    if op.rows == "prefill":
        return max(0, hi - max(lo, num_decode))
    return hi - lo


def p_of(rp: dict[str, list[float]], kind: str, r: float) -> float:
    """Normalized performance at share r; GEMMs (and small 'other' ops) scale with their share: P = R."""
    table = rp.get(kind)
    if kind in ("compute", "other") or not table:
        return r
    x = r * (len(table) - 1)
    i = min(int(x), len(table) - 2)
    return table[i] + (table[i + 1] - table[i]) * (x - i)


def split_candidates(dense_batch: int, tile: int, n: int, limit: int = 24) -> list[list[int]]:
    """Tile-aligned cuts of [0, B) into n non-empty nano-batches (evenly thinned to `limit`)."""
    points = list(range(tile, dense_batch, tile))
    combos = [list(c) for c in itertools.combinations(points, n - 1)]
    if len(combos) > limit:
        step = len(combos) / limit
        combos = [combos[int(i * step)] for i in range(limit)]
    return [[0, *c, dense_batch] for c in combos]


def nano_deps(p: Problem, n: int) -> list[tuple[tuple, tuple]]:
    """Edges between nano-ops (layer, op, i): parent dependency plus intersecting token ranges.

    Cuts are common to all ops, so range i meets only range i, and a causal reader also meets ranges < i.
    """
    by_name = {o.name: o for o in p.ops}
    sinks = [o.name for o in p.ops if not any(o.name in q.deps for q in p.ops)]
    sources = [o.name for o in p.ops if not o.deps]
    edges = []
    for layer in range(p.layers):
        for op in p.ops:
            for dep in op.deps:
                for i in range(n):
                    for k in (range(i + 1) if by_name[op.name].causal else (i,)):
                        edges.append(((layer, dep, k), (layer, op.name, i)))
        if layer + 1 < p.layers:
            for i in range(n):
                edges += [((layer, s, i), (layer + 1, t, i)) for s in sinks for t in sources]
    return edges
