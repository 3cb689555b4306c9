"""Auto-search (MILP stages), the R -> P reduction, profile storage, and `--plan auto` end to end."""
import pytest

from nanoflow.tune.milp import OpSpec, Problem, p_of, search_structure, split_candidates, stage1, stage2

CHAIN = [OpSpec("gemm", "compute"), OpSpec("attn", "memory", ("gemm",))]


def _linear(op: str, rows: int) -> float:
    return rows / 100 * 10.0  # both ops: 10 time units for the whole batch of 100 rows


def _problem(layers=1, rp=None, **kw) -> Problem:
    return Problem(CHAIN, dense_batch=100, num_decode=100, duration=_linear, tile=10, layers=layers,
                   rp=rp or {}, **kw)


FREE_MEMORY = {"memory": [0.0] + [1.0] * 10}  # a memory op at any share runs at full speed
LINEAR_MEMORY = {"memory": [i / 10 for i in range(11)]}  # no free lunch: P = R


def test_two_nano_batches_overlap_perfectly():
    # gemm1 | gemm2 + attn1 | attn2: 15 units instead of 20, the known optimum for two nano-batches.
    s = stage1(_problem(), 2)
    assert s.splits == [0, 50, 100]
    assert s.makespan == pytest.approx(15.0, abs=1e-6)
    assert s.order["compute"] == [(0, "gemm", 0), (0, "gemm", 1)]
    assert s.starts[(0, "attn", 0)] == pytest.approx(s.starts[(0, "gemm", 1)], abs=1e-6)


def test_sequential_when_one_nano_batch():
    s = stage1(_problem(layers=2), 1)
    assert s.makespan == pytest.approx(40.0)
    assert not s.cross_layer()


def test_refinement_stops_and_crosses_layers():
    res = search_structure(_problem(layers=2), max_nano=3)
    assert [s.num_nano for s in res] == [1, 2, 3]
    assert res[1].makespan == pytest.approx(25.0, abs=1e-6)  # layer 2's gemm1 overlaps layer 1's attn2
    assert res[1].cross_layer()


def test_stage2_uses_cheap_memory_share():
    s2 = stage2(_problem(rp=FREE_MEMORY), stage1(_problem(), 2))
    assert s2.shares == {"compute": 0.75, "memory": 0.25}
    # compute runs at 0.75 for 10/0.75 units, the last attn half (5) follows: 13.33 + ... < 20 sequential
    assert s2.makespan < 20.0 - 1e-6


def test_stage2_returns_sequential_when_overlap_cannot_help():
    s2 = stage2(_problem(rp=LINEAR_MEMORY), stage1(_problem(), 2))
    assert s2.shares == {"compute": 1.0, "memory": 1.0}
    assert s2.makespan == pytest.approx(20.0, abs=1e-6)  # full shares, no overlap: the serial time


def test_zero_row_nano_ops_cost_nothing():
    ops = [OpSpec("gemm", "compute"), OpSpec("dec", "memory", ("gemm",), rows="decode"),
           OpSpec("pf", "compute", ("gemm",), rows="prefill", causal=True)]
    p = Problem(ops, dense_batch=100, num_decode=50, duration=_linear, tile=50, layers=1)
    s = stage1(p, 2)
    assert s.durations[(0, "dec", 1)] == 0.0 and s.durations[(0, "pf", 0)] == 0.0
    # pf on nano-batch 1 reads K/V of earlier rows: it waits for gemm on nano-batch 0 too
    assert s.starts[(0, "pf", 1)] >= s.starts[(0, "gemm", 0)] + s.durations[(0, "gemm", 0)] - 1e-9


def test_p_of_and_candidates():
    assert p_of({}, "compute", 0.4) == 0.4
    assert p_of({"memory": [0, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1]}, "memory", 0.15) == \
        pytest.approx(0.25)
    assert split_candidates(256, 64, 2) == [[0, 64, 256], [0, 128, 256], [0, 192, 256]]
    assert split_candidates(64, 64, 2) == []
    assert len(split_candidates(2048, 128, 3, limit=10)) == 10
