"""NanoFlow's auto-search as two disjunctive-scheduling MILPs (paper §4.1.2-4.1.3), solved by HiGHS.

Stage I (structure, no interference): the dense batch is cut into N nano-batches (the cut is a one-hot choice
among tile-aligned candidates inside the MILP); every op becomes N nano-ops on its unit (compute, memory,
network); nano-ops on one unit never overlap (big-M ordering binaries), a nano-op waits for its parents'
nano-ops whose token ranges intersect its input range, and the objective is the makespan over `layers`
unrolled layers. N grows while the makespan improves (the paper's iterative refinement).

Stage II (resource shares with interference): the Stage-I cut and per-unit order are fixed; each unit picks a
share R from the device's realizable shares (one-hot), a nano-op lasts D_full / P_kind(R) (the R -> P table),
and units whose nano-ops overlap may not hold more than the whole device (R_a + R_b <= 1 where any pair
overlaps). Shares are per unit because execution units are static partitions (green contexts, pinned threads).

The problem, the schedule and the nano-op dependency edges both stages share are in `problem.py`.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from nanoflow.autosearch.problem import UNIT_OF_KIND, OpSpec, Problem, Schedule, nano_deps, p_of, rows_in, \
    split_candidates


class _Model:
    """Rows of a sparse MILP, built one constraint at a time."""

    def __init__(self) -> None:
        self.cost, self.lo, self.hi, self.integer = [], [], [], []
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, lo: float = 0.0, hi: float = math.inf, integer: bool = False, cost: float = 0.0) -> int:
        self.cost.append(cost), self.lo.append(lo), self.hi.append(hi), self.integer.append(int(integer))
        return len(self.cost) - 1

    def add(self, coeffs: dict[int, float], lo: float = -math.inf, hi: float = math.inf) -> None:
        self.rows.append((coeffs, lo, hi))

    def solve(self, time_limit: float) -> tuple[np.ndarray | None, str]:
        r, c, v = [], [], []
        for i, (coeffs, _, _) in enumerate(self.rows):
            for j, a in coeffs.items():
                r.append(i), c.append(j), v.append(a)
        a = coo_matrix((v, (r, c)), shape=(len(self.rows), len(self.cost))).tocsr()
        cons = LinearConstraint(a, [x[1] for x in self.rows], [x[2] for x in self.rows]) if self.rows else None
        res = milp(np.array(self.cost), integrality=np.array(self.integer), bounds=Bounds(self.lo, self.hi),
                   constraints=cons, options={"time_limit": time_limit, "mip_rel_gap": 1e-3})
        return (res.x if res.x is not None else None), res.message


def _combine(*terms: dict[int, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for t in terms:
        for k, a in t.items():
            out[k] = out.get(k, 0.0) + a
    return out


def _sub(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    return _combine(a, {k: -v for k, v in b.items()})


def _schedule_model(nanos: list[tuple], dur: dict[tuple, dict[int, float]], m: _Model, edges: list,
                    fixed_order: dict[str, list[tuple]] | None, units: dict[tuple, str]):
    """Start times, makespan, dependencies and per-unit no-overlap (big-M ordering binaries, or a fixed
    per-unit order); returns (start vars, end expressions, makespan var, big M)."""
    big_m = sum(max(list(d.values()) + [0.0]) for d in dur.values()) or 1.0
    start = {j: m.var(cost=1e-4) for j in nanos}
    cmax = m.var(cost=1.0)
    end = {j: _combine({start[j]: 1.0}, dur[j]) for j in nanos}
    for j in nanos:
        m.add(_sub({cmax: 1.0}, end[j]), lo=0.0)
    for a, b in edges:  # b starts after a ends
        m.add(_after(start[b], end[a]), lo=0.0)
    if fixed_order is not None:
        for seq in fixed_order.values():
            for a, b in zip(seq, seq[1:]):
                m.add(_after(start[b], end[a]), lo=0.0)
        return start, end, cmax, big_m
    before = _closure(nanos, edges)
    for a, b in itertools.combinations(nanos, 2):
        if units[a] != units[b] or b in before[a] or a in before[b]:
            continue
        _disjoint(m, start, end, a, b, big_m)
    return start, end, cmax, big_m


def _after(start_b: int, end_a: dict[int, float]) -> dict[int, float]:
    """start_b - end_a (>= 0 means b starts after a ends)."""
    return _sub({start_b: 1.0}, end_a)


def _disjoint(m: _Model, start, end, a, b, big_m: float, slack: dict[int, float] | None = None) -> int:
    """a and b do not overlap (unless `slack` turns the pair off): o = 1 puts a first, o = 0 puts b first."""
    o = m.var(0, 1, integer=True)
    relax = {k: big_m * v for k, v in (slack or {}).items()}  # slack = 1 drops the pair
    m.add(_combine(_after(start[b], end[a]), {o: -big_m}, relax), lo=-big_m)
    m.add(_combine(_after(start[a], end[b]), {o: big_m}, relax), lo=0.0)
    return o


def _closure(nanos: list[tuple], edges: list) -> dict[tuple, set]:
    succ: dict[tuple, set] = {j: set() for j in nanos}
    for a, b in edges:
        succ[a].add(b)
    out: dict[tuple, set] = {}

    def visit(j):
        if j not in out:
            out[j] = set()
            for k in succ[j]:
                out[j] |= {k} | visit(k)
        return out[j]

    for j in nanos:
        visit(j)
    return out


def _expr_value(expr: dict[int, float], x: np.ndarray) -> float:
    return float(sum(a * x[k] for k, a in expr.items()))


def _orders(nanos, units, starts) -> dict[str, list[tuple]]:
    order: dict[str, list[tuple]] = {}
    for j in sorted(nanos, key=lambda j: (starts[j], j[0], j[2])):
        order.setdefault(units[j], []).append(j)
    return order


def _nanos(p: Problem, n: int) -> list[tuple[int, str, int]]:
    return [(layer, o.name, i) for layer in range(p.layers) for o in p.ops for i in range(n)]


def stage1(p: Problem, n: int) -> Schedule | None:
    """Best cut into n nano-batches and per-unit order at full shares (no interference)."""
    cands = [[0, p.dense_batch]] if n == 1 else split_candidates(p.dense_batch, p.tile, n)
    if not cands:
        return None
    by = {o.name: o for o in p.ops}
    m = _Model()
    y = [m.var(0, 1, integer=True) for _ in cands]
    m.add({v: 1.0 for v in y}, 1.0, 1.0)
    nanos = _nanos(p, n)
    units = {j: UNIT_OF_KIND[by[j[1]].kind] for j in nanos}
    dur = {j: {y[c]: _solo(p, by[j[1]], cut, j[2]) for c, cut in enumerate(cands)} for j in nanos}
    # Symmetry breaking: nano-batch i of an op goes before nano-batch i+1 on its unit (as in the paper's figures).
    edges = nano_deps(p, n) + [((l_, o, i), (l_, o, i + 1)) for (l_, o, i) in nanos if i + 1 < n]
    start, _end, cmax, _ = _schedule_model(nanos, dur, m, edges, None, units)
    x, msg = m.solve(p.time_limit)
    if x is None:
        return None
    cut = cands[int(np.argmax([x[v] for v in y]))]
    starts = {j: float(x[start[j]]) for j in nanos}
    durs = {j: _solo(p, by[j[1]], cut, j[2]) for j in nanos}
    return Schedule(cut, _orders(nanos, units, starts), starts, durs, {u: 1.0 for u in set(units.values())},
                    float(x[cmax]), msg)


def _solo(p: Problem, op: OpSpec, cut: list[int], i: int) -> float:
    rows = rows_in(op, cut[i], cut[i + 1], p.num_decode)
    return p.duration(op.name, rows) if rows else 0.0


def search_structure(p: Problem, max_nano: int = 4, min_gain: float = 0.01) -> list[Schedule]:
    """Stage I for N = 1, 2, ... while the makespan improves by at least `min_gain` (iterative refinement)."""
    out = [stage1(p, 1)]
    for n in range(2, max_nano + 1):
        s = stage1(p, n)
        if s is None:
            break
        out.append(s)
        if s.makespan > min(x.makespan for x in out[:-1]) * (1 - min_gain):
            break
    return out


def stage2(p: Problem, s1: Schedule, per_nano: bool = False) -> Schedule | None:
    """Shares R (one-hot over realizable shares) with durations D / P(R); the Stage-I order is kept.

    Default: one R per unit (static partitions: what the executors run). `per_nano=True` is the paper's
    form, one R per nano-op with R_a + R_b <= 1 for every overlapping pair; its unit shares are the largest R
    of each unit's nano-ops (a bound on what per-nano-op partitions could gain, not an executable plan)."""
    by = {o.name: o for o in p.ops}
    units = {j: u for u, seq in s1.order.items() for j in seq}
    names = sorted(s1.order)
    nanos = list(s1.starts)
    owner = (lambda j: j) if per_nano else (lambda j: units[j])
    m = _Model()
    z = {k: {r: m.var(0, 1, integer=True) for r in p.shares} for k in (nanos if per_nano else names)}
    for k in z:
        m.add({v: 1.0 for v in z[k].values()}, 1.0, 1.0)
    share = {k: {v: r for r, v in z[k].items()} for k in z}
    dur = {j: {z[owner(j)][r]: s1.durations[j] / max(p_of(p.rp, by[j[1]].kind, r), 1e-3) for r in p.shares}
           for j in nanos}
    edges = nano_deps(p, s1.num_nano)
    start, end, cmax, big_m = _schedule_model(nanos, dur, m, edges, s1.order, units)
    w = {} if per_nano else {pair: m.var(0, 1, integer=True) for pair in itertools.combinations(names, 2)}
    for (ua, ub), wv in w.items():  # units allowed to overlap must fit on the device together
        m.add(_combine(share[ua], share[ub], {wv: 1.0}), hi=2.0)
    if len(names) == 3 and not per_nano:
        m.add(_combine(*share.values(), {v: 2.0 for v in w.values()}), hi=7.0)
    before = _closure(nanos, edges)
    for a, b in itertools.combinations(nanos, 2):
        if units[a] == units[b] or b in before[a] or a in before[b]:
            continue
        if s1.durations[a] == 0 or s1.durations[b] == 0:
            continue
        if per_nano:  # this pair may overlap only if its two shares fit together
            v = m.var(0, 1, integer=True)
            m.add(_combine(share[a], share[b], {v: 1.0}), hi=2.0)
        else:
            v = w[tuple(sorted((units[a], units[b])))]
        _disjoint(m, start, end, a, b, big_m, slack={v: 1.0})
    x, msg = m.solve(p.time_limit)
    if x is None:
        return None
    chosen = {k: r for k in z for r, v in z[k].items() if x[v] > 0.5}
    shares = {u: max(chosen[j] for j in nanos if units[j] == u and s1.durations[j] > 0) if per_nano
              else chosen[u] for u in names}
    starts = {j: float(x[start[j]]) for j in nanos}
    durs = {j: _expr_value(dur[j], x) for j in nanos}
    out = Schedule(s1.splits, _orders(nanos, units, starts), starts, durs, shares, float(x[cmax]), msg)
    out.nano_shares = {j: chosen[j] for j in nanos} if per_nano else {}
    return out
