"""Every executor gives HF's greedy tokens (float32, default model), under chunked prefill and preemption."""
import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.flow.plan import Plan, Unit
from nanoflow.flow.ops import layer_operations

pytestmark = pytest.mark.slow  # the default model under every executor

N = 24  # a prefix of HF's 64 greedy tokens keeps these runs short; the parity tests cover all 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


def _check(llm, refs):
    outs = llm.generate([ids for ids, _ in refs], GREEDY, use_tqdm=False)
    for out, (ids, ref) in zip(outs, refs):
        assert out.outputs[0].token_ids == ref[:N]


def _three_way_plan(path, dense: int) -> str:
    """Uneven 3-way splits that differ per op (attention splits cut prefill chunks), overlapped on 2 units."""
    ops = layer_operations()
    cuts = {o.name: [0, 5, 11, dense] if o.kind != "compute" else [0, 3, 17, dense] for o in ops}
    compute = [f"{o.name}#{i}" for o in ops if o.kind != "memory" for i in range(3)]
    Plan(dense, [Unit("compute", ["compute", "other"], 0.5), Unit("memory", ["memory"], 0.5)], cuts,
         {"compute": compute, "memory": [f"decode_attn#{i}" for i in range(3)]}).save(path)
    return str(path)


@pytest.mark.parametrize("executor", ["nanobatch", "overlap"])
def test_chunked_prefill_matches_hf(hf_reference, executor):
    # 8 prompts of 6-13 tokens in a 32-token budget: chunked prefill, nano-batches cut through chunks.
    _check(LLM("default", dtype="float32", dense_batch=32, executor=executor), hf_reference)


def test_custom_plan_file_matches_hf(hf_reference, tmp_path):
    llm = LLM("default", dtype="float32", dense_batch=24, executor="overlap",
              plan=_three_way_plan(tmp_path / "plan.json", 24))
    _check(llm, hf_reference)


@pytest.mark.parametrize("executor", ["nanobatch", "overlap"])
def test_preemption_matches_hf(hf_reference, executor):
    # 12 blocks of 16 tokens cannot hold 8 requests of ~30 tokens: preemption and recompute.
    llm = LLM("default", dtype="float32", num_kv_blocks=12, admission_control=False, dense_batch=64,
              executor=executor)
    _check(llm, hf_reference)
    assert llm.engine.scheduler.num_preemptions > 0


def test_bad_executor_or_plan_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        LLM("default", executor="warp")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "dense_batch": 8, "units": [], "nano_batches": {}, "order": {}}')
    with pytest.raises(ValueError, match="format"):
        LLM("default", executor="overlap", plan=str(bad))


def test_trace_command_writes_chrome_json_and_gantt(tmp_path):
    import json

    from nanoflow.cli import main
    out = tmp_path / "trace"
    assert main(["trace", "--executor", "overlap", "--dense-batch", "16", "--num-requests", "6", "--prompt-len", "8",
                 "--warmup-steps", "1", "--out", str(out)]) == 0
    events = json.load(open(out / "trace.json"))["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {"compute", "memory"}
    ops = {e["name"].split("#")[0] for e in events if e["ph"] == "X"}
    assert {"qkv", "decode_attn", "gate_up", "down"} <= ops
    assert (out / "gantt.png").stat().st_size > 10_000
