"""The paper's interference table (§4.1.1, Table 3): pairwise co-runs reduced to R -> P.

A co-run puts a compute op (GEMM) beside a memory (or network) op, each on its own share of the device.
R = the GEMM's speed in the co-run as a fraction of its solo speed; the other op is taken to hold 1 - R, and
P = its speed as a fraction of its own solo speed. Dominated pairs (more GEMM slowdown for less gain) are
dropped, the Pareto frontier is kept, and the table lists P at R = 0, 0.1, ..., 1 (piecewise linear between
frontier points, never decreasing). GEMMs have P = R by definition.
"""
from __future__ import annotations

from dataclasses import dataclass

GRID = [i / 10 for i in range(11)]


@dataclass(frozen=True)
class CoRun:
    compute_op: str
    other_op: str
    other_kind: str  # memory | network
    config: str  # how the device was shared, e.g. "1+1 threads" or "104+24 SMs"
    r_compute: float  # compute op's co-run speed / solo speed
    p_other: float  # other op's co-run speed / solo speed


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(R_compute, P_other) pairs not dominated by another pair, sorted by R_compute descending."""
    best: list[tuple[float, float]] = []
    for r, p in sorted(set(points), key=lambda x: (-x[0], -x[1])):
        if not best or p > best[-1][1]:  # higher P than every pair with at least this R
            best.append((r, p))
    return best


def rp_table(points: list[tuple[float, float]]) -> list[float]:
    """P of the non-compute op at R = 0, 0.1, ..., 1, where its R is 1 - R_compute of a co-run.

    The solo runs bound the table: R = 0 gives P = 0 and R = 1 gives P = 1.
    """
    front = pareto_frontier([(min(max(r, 0.0), 1.0), min(max(p, 0.0), 1.0)) for r, p in points])
    knots = sorted({(0.0, 0.0), (1.0, 1.0)} | {(1.0 - r, p) for r, p in front})
    table = []
    for x in GRID:
        lo = max((k for k in knots if k[0] <= x), key=lambda k: k[0])
        hi = min((k for k in knots if k[0] >= x), key=lambda k: k[0])
        y = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (x - lo[0]) / (hi[0] - lo[0])
        table.append(round(max([y] + table[-1:]), 4))  # monotone: more share never hurts
    return table


def rp_tables(coruns: list[CoRun]) -> dict[str, list[float]]:
    """One table per non-compute kind (the paper finds one mapping serves all shapes, within 5%)."""
    out: dict[str, list[float]] = {}
    for kind in sorted({c.other_kind for c in coruns}):
        out[kind] = rp_table([(c.r_compute, c.p_other) for c in coruns if c.other_kind == kind])
    return out


def format_table(tables: dict[str, list[float]]) -> str:
    head = "| R | " + " | ".join(f"{x:.1f}" for x in GRID) + " |"
    rows = ["| GEMM (P = R) | " + " | ".join(f"{x:.2f}" for x in GRID) + " |"]
    rows += [f"| {k} | " + " | ".join(f"{x:.2f}" for x in t) + " |" for k, t in tables.items()]
    return "\n".join([head, "|" + "---|" * (len(GRID) + 1)] + rows)
