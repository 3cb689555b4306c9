"""Auto-search (MILP stages), the R -> P reduction, profile storage, and `--plan auto` end to end."""
import pytest

from nanoflow.autosearch.milp import search_structure, stage1, stage2
from nanoflow.autosearch.problem import OpSpec, Problem, p_of, split_candidates
from tests.helpers import tiny_model

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


# ---- R -> P reduction
def test_pareto_drops_dominated_pairs():
    from nanoflow.autosearch.interference import pareto_frontier
    pts = [(0.8, 0.3), (0.7, 0.25), (0.6, 0.6), (0.4, 0.8), (0.5, 0.5), (0.8, 0.2)]
    assert pareto_frontier(pts) == [(0.8, 0.3), (0.6, 0.6), (0.4, 0.8)]


def test_rp_table_is_monotone_and_bounded():
    from nanoflow.autosearch.interference import CoRun, rp_table, rp_tables
    # the paper's example: giving up 0.2 of GEMM performance buys 0.3 of GEMV performance
    t = rp_table([(0.8, 0.3), (0.6, 0.6), (0.7, 0.1)])
    assert t[0] == 0.0 and t[-1] == 1.0 and t[2] == pytest.approx(0.3) and t[4] == pytest.approx(0.6)
    assert all(a <= b for a, b in zip(t, t[1:]))
    assert rp_table([]) == pytest.approx([i / 10 for i in range(11)])  # no data: P = R
    tabs = rp_tables([CoRun("gate_up", "decode_attn", "memory", "1+1", 0.5, 0.9)])
    assert set(tabs) == {"memory"} and tabs["memory"][5] == pytest.approx(0.9)


# ---- profiles: measured on a tiny model, stored, reused
FAST = dict(tile=16, min_time=0.0, window=0.02, context_len=40)


def test_profile_round_trip_and_reuse(tmp_path, monkeypatch):
    from nanoflow.autosearch import profile
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    model = tiny_model()
    prof, path = profile.load_or_profile(model, 32, log=lambda *a: None, **FAST)
    assert path.startswith(str(tmp_path)) and set(prof.solo) >= {"qkv", "decode_attn", "gate_up"}
    assert set(prof.solo["qkv"]) == {f"{s:.3f}" for s in prof.shares} and set(prof.solo["qkv"]["1.000"]) == {"16", "32"}
    assert prof.duration("qkv", 0) == 0.0 and prof.duration("qkv", 8) > 0
    assert prof.rp["memory"][0] == 0.0 and prof.rp["memory"][-1] == 1.0 and prof.coruns
    assert profile.Profile.load(path) == prof
    monkeypatch.setattr(profile, "run_profile", lambda *a, **k: pytest.fail("profiled twice"))
    again, path2 = profile.load_or_profile(model, 32, log=lambda *a: None, **FAST)
    assert path2 == path and again == prof


def test_tune_plans_are_valid(tmp_path, monkeypatch):
    from nanoflow.flow.plan import Plan, validate
    from nanoflow.autosearch.search import tune
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    plan, decision = tune(tiny_model(), 32, out=str(tmp_path / "plan.json"), rounds=1, measure_layers=1,
                          time_limit=5, max_nano=2, log=lambda *a: None, **FAST)
    validate(plan)
    assert Plan.load(str(tmp_path / "plan.json")).to_dict() == plan.to_dict()
    names = [c["name"] for c in plan.meta["candidates"]]
    assert names[0] == "sequential" and len(names) >= 2
    assert decision.startswith("overlap does not pay") == (plan.meta["executor"] == "sequential")
    assert plan.meta["decision"] == decision and plan.meta["tune_seconds"] > 0


@pytest.mark.slow
def test_plan_auto_tunes_once_and_keeps_greedy_tokens(tmp_path, monkeypatch):
    """`--plan auto` on the default model: a valid tuned plan, loaded from the cache, same greedy tokens."""
    from nanoflow import LLM, SamplingParams
    from nanoflow.flow.plan import validate
    from nanoflow.autosearch import search
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 19842, 253, 1345, 23051, 563, 260, 5887, 30]]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = LLM("default", dtype="float32", dense_batch=16)
    ref = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]
    plan, _ = search.tune(plain.engine.runner.model, 16, rounds=1, measure_layers=1, time_limit=5, max_nano=2,
                          log=lambda *a: None, **FAST)
    monkeypatch.setattr(search, "tune", lambda *a, **k: pytest.fail("--plan auto re-tuned a cached plan"))
    auto = LLM("default", dtype="float32", dense_batch=16, executor="overlap", plan="auto")
    validate(auto.engine.runner.executor.plan)
    assert auto.engine.runner.executor.plan.to_dict() == plan.to_dict()
    assert [o.outputs[0].token_ids for o in auto.generate(prompts, greedy, use_tqdm=False)] == ref


def test_choose_keeps_sequential_unless_the_gain_is_clear():
    from nanoflow.flow.plan import sequential_plan
    from nanoflow.autosearch.search import Candidate, choose
    plan = sequential_plan(64)

    def cands(seq, other):
        return [Candidate("sequential", "sequential", plan, 1.0, seq), Candidate("milp-2", "overlap", plan, 1.0, other)]
    best, why = choose(cands(1.0, 0.98))  # 2% is within the noise margin
    assert best.executor == "sequential" and why.startswith("overlap does not pay on this hardware")
    best, why = choose(cands(1.0, 1.3))
    assert best.executor == "sequential" and "-30.0%" in why
    best, why = choose(cands(1.0, 0.8))
    assert best.name == "milp-2" and "20.0% faster" in why


@pytest.mark.parametrize("argv", [["profile", "--dense-batch", "0"],
                                  ["profile", "--dense-batch", "8", "--decode-tokens", "9"],
                                  ["tune", "--tile", "0"], ["tune", "--max-nano", "0"]])
def test_cli_bad_options_are_clear_errors(argv, capsys):
    from nanoflow.cli import main
    assert main(argv) == 2
    assert "nanoflow: error:" in capsys.readouterr().err


def _check_schedule(p, s, capacity: bool, eps=1e-6):
    """Dependencies hold, one unit never runs two nano-ops at once, and (Stage II) overlapping units fit."""
    from nanoflow.autosearch.problem import UNIT_OF_KIND, nano_deps
    kind = {o.name: o.kind for o in p.ops}
    end = {j: s.starts[j] + s.durations[j] for j in s.starts}
    for a, b in nano_deps(p, s.num_nano):
        assert s.starts[b] >= end[a] - eps, (a, b)
    live = [j for j in s.starts if s.durations[j] > eps]
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if s.starts[a] < end[b] - eps and s.starts[b] < end[a] - eps:  # they overlap
                ua, ub = UNIT_OF_KIND[kind[a[1]]], UNIT_OF_KIND[kind[b[1]]]
                assert ua != ub, (a, b)
                assert not capacity or s.shares[ua] + s.shares[ub] <= 1 + eps, (a, b, s.shares)


@pytest.mark.parametrize("seed", range(3))
def test_random_layer_schedules_are_feasible(seed):
    import random
    from nanoflow.autosearch.search import op_specs
    rng = random.Random(seed)
    scale = {o.name: rng.uniform(0.1, 3.0) for o in op_specs()}
    p = Problem(op_specs(), dense_batch=64, num_decode=rng.choice([16, 32, 48]),
                duration=lambda op, rows: scale[op] * (rows + 4), tile=16, layers=2,
                rp={"memory": [0.0] + sorted(rng.random() for _ in range(9)) + [1.0]},
                shares=(0.25, 0.5, 0.75, 1.0), time_limit=5)
    s1 = stage1(p, 2)
    _check_schedule(p, s1, capacity=False)  # Stage I: no interference, units overlap freely
    s2 = stage2(p, s1)
    _check_schedule(p, s2, capacity=True)
    assert s2.makespan >= s1.makespan * (1 - 1e-2)  # interference never makes the layer faster


def test_stage2_per_nano_op_shares_are_at_least_as_good():
    p = _problem(layers=2, rp=FREE_MEMORY)
    s1 = stage1(p, 2)
    unit, nano = stage2(p, s1), stage2(p, s1, per_nano=True)
    assert nano.makespan <= unit.makespan + 1e-6
    assert set(nano.nano_shares) == set(s1.starts)
    # overlapping nano-ops never hold more than the device between them
    end = {j: nano.starts[j] + nano.durations[j] for j in nano.starts}
    for a in nano.starts:
        for b in nano.starts:
            if a < b and nano.starts[a] < end[b] - 1e-6 and nano.starts[b] < end[a] - 1e-6:
                assert nano.nano_shares[a] + nano.nano_shares[b] <= 1 + 1e-6
