"""Plans: the JSON format round-trips, the built-in plans are valid, bad plans fail with the rule that broke."""
import json

import pytest

from nanoflow.flow.plan import Plan, PlanError, Unit, issue_order, nanobatch_plan, overlap_plan, sequential_plan, \
    validate


@pytest.fixture
def good() -> Plan:
    return overlap_plan(256)


def _broken(plan: Plan, **changes) -> Plan:
    d = plan.to_dict()
    d.update(changes)
    return Plan.from_dict(json.loads(json.dumps(d)))


def _rule(plan: Plan, rule: str, *words: str) -> None:
    with pytest.raises(PlanError) as e:
        validate(plan)
    assert e.value.rule == rule, str(e.value)
    assert str(e.value).startswith(rule + ":")
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("make", [sequential_plan, overlap_plan, nanobatch_plan])
def test_builtin_plans_are_valid_and_round_trip(make, tp_size, tmp_path):
    plan = make(256, tp_size=tp_size)
    validate(plan)
    network = [u.name for u in plan.units if "network" in u.kinds]
    assert bool(network) == (tp_size > 1 or make is not overlap_plan)  # all-reduces get their own unit
    if tp_size > 1:
        assert "attn_all_reduce" in plan.nano_batches and "mlp_all_reduce" in plan.nano_batches
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again == plan
    assert json.load(open(tmp_path / "p.json"))["version"] == 1


def test_issue_order_interleaves_units(good):
    order = [f"{o}#{i}" for o, i in issue_order(good)]
    assert order.index("decode_attn#0") < order.index("qkv#1")  # decode attention 0 overlaps qkv 1
    assert order.index("decode_attn#1") < order.index("o_proj#0")


def test_uncovered_tokens(good):
    _rule(_broken(good, nano_batches={**good.nano_batches, "qkv": [0, 128, 200]}), "coverage", "qkv", "[200, 256)")
    _rule(_broken(good, nano_batches={**good.nano_batches, "down": [8, 256]}), "coverage", "down", "[0, 8)")


def test_overlapping_ranges(good):
    _rule(_broken(good, nano_batches={**good.nano_batches, "gate_up": [0, 150, 100, 256]}), "coverage",
          "gate_up", "overlap", "[100, 150)")


def test_missing_or_duplicate_nano_op(good):
    order = dict(good.order)
    order["compute"] = [s for s in order["compute"] if s != "down#1"]
    _rule(_broken(good, order=order), "issue", "down#1", "never issued")
    order = dict(good.order)
    order["memory"] = order["memory"] + ["decode_attn#0"]
    _rule(_broken(good, order=order), "issue", "decode_attn#0", "twice")


def test_op_on_a_unit_that_cannot_run_its_kind(good):
    order = {"compute": good.order["compute"] + ["decode_attn#1"], "memory": ["decode_attn#0"]}
    _rule(_broken(good, order=order), "unit kind", "compute", "decode_attn#1", "memory")


def test_broken_dependency_on_one_unit(good):
    order = dict(good.order)
    seq = list(order["compute"])
    i, j = seq.index("qkv#0"), seq.index("rope_append#0")
    seq[i], seq[j] = seq[j], seq[i]
    order["compute"] = seq
    _rule(_broken(good, order=order), "dependency", "rope_append#0", "qkv#0", "compute")


def test_deadlock_across_units(good):
    # The memory unit runs decode_attn#1 first; it waits for rope_append#1 on the compute unit, which comes
    # after o_proj#0 there, which waits for decode_attn#0, queued behind decode_attn#1: a cycle.
    seq = [s for s in good.order["compute"] if s not in ("prefill_attn#0", "o_proj#0")]
    at = seq.index("attn_norm#1")
    seq[at:at] = ["prefill_attn#0", "o_proj#0"]
    bad = _broken(good, order={"compute": seq, "memory": ["decode_attn#1", "decode_attn#0"]})
    _rule(bad, "deadlock", "decode_attn#1", "o_proj#0", "memory")
    validate(_broken(good, order={"compute": seq, "memory": ["decode_attn#0", "decode_attn#1"]}))  # fine


def test_prefill_attention_waits_for_earlier_kv(good):
    # prefill_attn#1 may read KV of its chunk's earlier tokens in nano-batch 0: before rope_append#0 is illegal.
    seq = [s for s in good.order["compute"] if s != "prefill_attn#1"]
    seq.insert(seq.index("rope_append#1") + 1, "prefill_attn#1")
    seq.remove("rope_append#0")
    seq.insert(seq.index("prefill_attn#1") + 1, "rope_append#0")
    # still covered and issued once; rope_append#0 now comes after prefill_attn#1 on the same unit
    _rule(_broken(good, order={**good.order, "compute": seq}), "dependency", "prefill_attn#1", "rope_append#0")


def test_format_errors(good):
    _rule(_broken(good, units=[{"name": "x", "kinds": ["gpu"], "share": 1}]), "format", "gpu")
    _rule(_broken(good, version=2), "format", "version")
    with pytest.raises(PlanError, match="format"):
        Plan.from_dict({"dense_batch": 4})
    bad = Plan(64, [Unit("a", ["compute"], 1.5)], {}, {})
    _rule(bad, "format", "share")
