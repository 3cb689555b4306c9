"""The model as operations: one nano-batch is the plain forward; any valid split gives the same hidden states."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow.flow.executor import compile_program, make_executor
from nanoflow.flow.ops import StepState, layer_operations, run_op
from nanoflow.flow.plan import Plan, Unit, validate
from tests.helpers import mixed_step, tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: a 2-thread OpenMP team's fork/join costs more than the math on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model, step):
    return _plain(model, step)


@pytest.fixture(scope="module")
def step():
    return mixed_step()


def _plain(model, step):
    ids, pos, meta, kv = step
    kv = [c.clone() for c in kv]
    with torch.inference_mode():
        return model(ids, pos, meta, kv), kv


def _run(executor, step):
    ids, pos, meta, kv = step
    kv = [c.clone() for c in kv]
    return executor(ids, pos, meta, kv), kv


def test_operations_declare_kinds_and_buffers():
    ops = layer_operations()
    assert [o.name for o in ops] == ["attn_norm", "qkv", "rope_append", "decode_attn", "prefill_attn", "o_proj",
                                     "ffn_norm", "gate_up", "down"]
    kinds = {o.name: o.kind for o in ops}
    assert kinds["decode_attn"] == "memory" and kinds["prefill_attn"] == "compute" and kinds["qkv"] == "compute"
    assert "kv_cache" in dict((o.name, o.writes) for o in ops)["rope_append"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_nano_batch_is_the_plain_forward(step, dtype):
    model = tiny_model(dtype)
    ids, pos, meta, kv = step
    kv = [c.to(dtype) for c in kv]
    ref, ref_kv = _plain(model, (ids, pos, meta, kv))
    out, out_kv = _run(make_executor("sequential", None, model, dense_batch=len(ids)), (ids, pos, meta, kv))
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(out_kv, ref_kv))


def test_run_op_on_ranges_by_hand(model, step):
    """run_op directly: every op on [0, 6) then [6, T) (cutting a prefill chunk) equals the plain forward."""
    ref, _ = _plain(model, step)
    ids, pos, meta, kv = step
    kv = [c.clone() for c in kv]
    with torch.inference_mode():
        state = StepState(model, ids, pos, meta, kv, split=True)
        for layer in range(len(model.layers)):
            for op in layer_operations():
                for a, b in ((0, 6), (6, len(ids))):
                    run_op(model, layer, op.name, state, a, b)
        out, _ = model.norm(state.hidden, state.residual)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _random_plan(data, total: int) -> Plan:
    """Random boundaries per op; compute/other ops in op order on one unit, decode attention on another."""
    cuts = {}
    for o in layer_operations():
        inner = data.draw(st.lists(st.integers(1, total - 1), max_size=3, unique=True), label=o.name)
        cuts[o.name] = [0, *sorted(inner), total]
    main = [f"{o.name}#{i}" for o in layer_operations() if o.kind != "memory" for i in range(len(cuts[o.name]) - 1)]
    mem = [f"decode_attn#{i}" for i in range(len(cuts["decode_attn"]) - 1)]
    units = [Unit("compute", ["compute", "other"], 0.5), Unit("memory", ["memory"], 0.5)]
    return Plan(total, units, cuts, {"compute": main, "memory": mem})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_valid_splits_match_the_plain_forward(model, step, reference, data):
    ids = step[0]
    dense = data.draw(st.integers(len(ids) - 4, len(ids) + 6), label="dense_batch")  # clip and stretch ranges
    plan = _random_plan(data, dense)
    validate(plan)
    kind = data.draw(st.sampled_from(["nanobatch", "overlap"]), label="executor")
    ref, ref_kv = reference
    executor = make_executor(kind, plan, model)
    out, out_kv = _run(executor, step)
    executor.close()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_kv, ref_kv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_program_dependencies_point_backwards():
    from nanoflow.flow.plan import overlap_plan
    from tests.helpers import TINY
    prog = compile_program(overlap_plan(64), TINY.num_layers)
    assert [len(t) for t in prog.tasks] == [16 * TINY.num_layers, 2 * TINY.num_layers]
    mem = prog.tasks[1]
    # decode_attn#0 of layer 1 waits for rope_append#0 of layer 1 on the compute unit (position 16 + 2)
    assert mem[2].layer == 1 and mem[2].deps == ((0, 18),)


def test_overlap_executor_records_a_trace(model, step):
    ex = make_executor("overlap", None, model, dense_batch=len(step[0]))
    ex.trace = []
    _run(ex, step)
    units = {u for u, *_ in ex.trace}
    assert units == {"compute", "memory"}
    assert len(ex.trace) == 18 * len(model.layers)
    assert all(t1 >= t0 for *_, t0, t1 in ex.trace)


def test_overlap_without_cross_layer_overlap(model, step, reference):
    """cross_layer=false puts a barrier after every layer: same result, and no nano-op of layer l+1 starts
    before every nano-op of layer l has ended."""
    from nanoflow.flow.plan import overlap_plan
    plan = overlap_plan(len(step[0]), split=6)
    plan.cross_layer = False
    ex = make_executor("overlap", plan, model)
    ex.trace = []
    out, _ = _run(ex, step)
    ex.close()
    torch.testing.assert_close(out, reference[0], rtol=1e-5, atol=1e-5)
    for layer in range(1, len(model.layers)):
        end_prev = max(t1 for _, task, _, t1 in ex.trace if task.layer == layer - 1)
        start = min(t0 for _, task, t0, _ in ex.trace if task.layer == layer)
        assert start >= end_prev
