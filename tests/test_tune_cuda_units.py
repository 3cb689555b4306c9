"""CUDA execution units, the parts that run without a GPU: SM partition arithmetic, graph keys and cache,
issue order, clean failure on a CPU, and the soft-partition op runner under TRITON_INTERPRET=1."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the SM-limited Triton kernels then run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from nanoflow.flow import cuda_graphs as cg  # noqa: E402
from nanoflow.flow import cuda_units as cu  # noqa: E402
from nanoflow.kernels.attention import PrefillChunk  # noqa: E402


def test_arch_constraints():
    assert cu.arch_constraints(9, 0) == (8, 8)  # Hopper: multiples of 8, minimum 8
    assert cu.arch_constraints(10, 0) == (8, 8)
    assert cu.arch_constraints(8, 0) == (4, 2)


@pytest.mark.parametrize("share,sms", [(0.2, 24), (0.01, 8), (0.5, 64), (1.0, 128), (0.97, 128), (0.3, 40)])
def test_share_to_sm_count_on_h100(share, sms):
    assert cu.sm_count_for_share(share, 132) == sms


def test_share_to_sm_count_rejects_bad_shares():
    with pytest.raises(ValueError, match="share"):
        cu.sm_count_for_share(0.0, 132)
    with pytest.raises(ValueError, match="share"):
        cu.sm_count_for_share(1.5, 132)


def test_partition_gives_the_remainder_to_the_biggest_unit():
    assert cu.partition_sms({"compute": 0.8, "memory": 0.2}, 132) == {"memory": 24, "compute": 108}
    assert cu.partition_sms({"compute": 0.6, "memory": 0.2, "network": 0.2}, 132) == \
        {"memory": 24, "network": 24, "compute": 84}
    counts = cu.partition_sms({"a": 0.5, "b": 0.5}, 132)
    assert sum(counts.values()) == 132 and all(c % 8 == 0 or c == max(counts.values()) for c in counts.values())


def test_partition_not_wanted_for_one_unit_or_oversubscribed_shares():
    assert cu.partition_sms({"main": 1.0}, 132) is None
    assert cu.partition_sms({"compute": 1.0, "memory": 1.0}, 132) is None  # never concurrent: whole device each


def test_partition_shrinks_small_units_to_fit():
    counts = cu.partition_sms({"a": 0.34, "b": 0.33, "c": 0.33}, 24)
    assert counts == {"b": 8, "c": 8, "a": 8}
    with pytest.raises(ValueError, match="do not fit"):
        cu.partition_sms({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, 24)


def test_graph_keys():
    pf = [PrefillChunk(3, 5, 9, torch.zeros(1, dtype=torch.long))]
    k1 = cg.graph_key("plan-a", 8, 3, pf, decode_width=3)
    assert k1 == cg.graph_key("plan-a", 8, 3, pf, decode_width=7)  # widths pad to 8 blocks
    assert k1 != cg.graph_key("plan-a", 8, 3, pf, decode_width=9)
    assert k1 != cg.graph_key("plan-b", 8, 3, pf, decode_width=3)  # another plan: another graph
    assert k1 != cg.graph_key("plan-a", 8, 4, [], decode_width=3)
    assert k1.prefill == ((5, 9),)


def test_graph_cache_captures_on_second_sight_and_evicts_lru():
    c = cg.GraphCache(capacity=2)
    assert not c.should_capture("a") and c.should_capture("a")
    c.put("a", 1), c.put("b", 2)
    assert c.get("a") == 1  # a is now most recent
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3


def test_both_backends_provide_the_execution_units_protocol():
    from nanoflow.flow.cpu_units import CpuUnits
    from nanoflow.flow.executor import ExecutionUnits
    members = {m for m in vars(ExecutionUnits) if not m.startswith("_")}
    assert members == {"run", "run_op", "close"}
    for backend in (CpuUnits, cu.CudaUnits):
        assert all(callable(getattr(backend, m, None)) for m in members), backend


def test_issue_sequence_respects_orders_and_dependencies():
    from nanoflow.flow.executor import compile_program
    from nanoflow.flow.plan import overlap_plan
    prog = compile_program(overlap_plan(64), num_layers=2)
    seq = cu.issue_sequence(prog)
    pos = {t: i for i, t in enumerate(seq)}
    assert len(seq) == sum(len(ts) for ts in prog.tasks)
    for u, ts in enumerate(prog.tasks):
        assert [p for v, p in seq if v == u] == list(range(len(ts)))
        for p, task in enumerate(ts):
            assert all(pos[d] < pos[(u, p)] for d in task.deps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_units_fail_clearly_without_a_gpu():
    from nanoflow.flow.cuda_graphs import GraphedStep
    from nanoflow.flow.plan import Unit
    with pytest.raises(RuntimeError, match="need a GPU"):
        cu.CudaUnits([Unit("compute", ["compute"], 0.5), Unit("memory", ["memory"], 0.5)])
    with pytest.raises(RuntimeError, match="need a GPU"):
        GraphedStep(object(), "plan")


def test_plan_fingerprint_keys_graphs_by_plan_content():
    from nanoflow.flow.cuda_graphs import plan_fingerprint
    from nanoflow.flow.plan import overlap_plan, sequential_plan
    assert plan_fingerprint(overlap_plan(64)) == plan_fingerprint(overlap_plan(64))
    assert plan_fingerprint(overlap_plan(64)) != plan_fingerprint(overlap_plan(64, split=16))
    assert plan_fingerprint(overlap_plan(64)) != plan_fingerprint(sequential_plan(64))


@torch.inference_mode()
def test_soft_partition_ops_match_the_normal_path():
    pytest.importorskip("triton", reason="triton is not installed")
    from nanoflow.flow.cuda_soft import run_op_limited
    from nanoflow.flow.ops import StepState, run_op
    from nanoflow.kernels.attention import AttentionMetadata
    from tests.helpers import tiny_model
    model, bs = tiny_model(), 8
    lens = [5, 12, 1]  # three decode tokens with contexts in a paged cache
    tables = torch.tensor([[0, 1], [2, 3], [4, 0]])
    meta = AttentionMetadata(slot_mapping=torch.tensor([4, 8 * 3 + 3, 8 * 4]), num_decode=3,
                             decode_block_tables=tables, decode_context_lens=torch.tensor(lens), decode_max_len=12)
    outs = []
    for limited in (False, True):
        kv = [torch.randn(2, 6, bs, 2, 16, generator=torch.Generator().manual_seed(1))]
        state = StepState(model, torch.tensor([3, 7, 9]), torch.tensor([4, 11, 0]), meta, kv, split=True)
        for op in ("attn_norm", "qkv", "rope_append", "decode_attn", "prefill_attn", "o_proj", "ffn_norm",
                   "gate_up", "down"):
            for a, b in ((0, 2), (2, 3)):  # two nano-batches: partial ranges write rows in place
                if limited:
                    run_op_limited(model, 0, op, state, a, b, num_sms=2)
                else:
                    run_op(model, 0, op, state, a, b)
        outs.append(state.hidden.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_graphed_step_runs_eagerly_while_tracing(monkeypatch):
    """`nanoflow trace` sets executor.trace / trace_steps on the runner's executor, a GraphedStep on a GPU:
    both must reach the wrapped executor, and traced steps run eagerly (a replay times no nano-op)."""
    from nanoflow.flow import cuda_graphs
    from nanoflow.flow.plan import sequential_plan
    from nanoflow.kernels.attention import AttentionMetadata
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    class Exec:
        plan, trace, trace_steps, calls = sequential_plan(8), None, [], 0

        def __call__(self, ids, pos, meta, kv):
            self.calls += 1
            if self.trace is not None:
                self.trace_steps.append((ids.shape[0], 0, 0))
            return ids

    ex = Exec()
    step = cuda_graphs.GraphedStep(ex)
    step.trace, step.trace_steps = [], []
    assert ex.trace == [] and ex.trace_steps == [] and step.trace_steps is ex.trace_steps
    monkeypatch.setattr(step, "_capture", lambda *a: pytest.fail("captured a traced step"))
    meta = AttentionMetadata(slot_mapping=torch.zeros(2, dtype=torch.long))
    for _ in range(3):  # a key's second sight would capture
        step(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), meta, [])
    assert ex.calls == 3 and len(step.trace_steps) == 3


def test_cuda_units_keep_rebound_buffers_alive_for_every_stream(monkeypatch):
    """A whole-step op rebinds a StepState buffer; the old tensor may still be read on another unit's stream,
    so CudaUnits.run_op marks it used on every unit stream (record_stream) before dropping it."""
    from types import SimpleNamespace
    from nanoflow.flow import cuda_soft

    class Buf:
        def __init__(self):
            self.streams = []

        def record_stream(self, s):
            self.streams.append(s)

    old_hidden, qkv, new_hidden = Buf(), Buf(), Buf()
    state = SimpleNamespace(hidden=old_hidden, residual=None, qkv=qkv, act=None, attn_out=Buf())
    monkeypatch.setattr(cuda_soft, "run_op_limited", lambda *a: setattr(state, "hidden", new_hidden))
    units = object.__new__(cu.CudaUnits)
    units.names, units.mechanism, units.streams = ["compute", "memory"], "none", {"compute": "s0", "memory": "s1"}
    units.run_op(None, SimpleNamespace(layer=0, op="o_proj", unit=0), state, 0, 4)
    assert state.hidden is new_hidden and old_hidden.streams == ["s0", "s1"]
    assert qkv.streams == [] and new_hidden.streams == []
