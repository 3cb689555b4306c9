"""CPU fast paths that must not change results: steps of decode rows and short prefill chunks in one C++ call
(flow/cpp_stack.py), the same hidden states as the Python forward bit for bit (and the Python forward for every
step or model it does not fit); greedy tokens straight from the LM-head kernel, the same as logits then argmax."""
import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.flow.cpp_stack import CppLayerStack, stack_tensors

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Once upon a time,"]


def _stack_llm(dtype: str, **kwargs) -> LLM:
    llm = LLM("default", dtype=dtype, **kwargs)
    if not isinstance(llm.engine.runner.executor, CppLayerStack) or stack_tensors(llm.engine.runner.model) is None:
        pytest.skip(f"no C++ panel GEMM for {dtype} here (bf16: AVX512-BF16; float32: AVX2 without AVX-512), "
                    "so no stack")
    return llm


@pytest.fixture
def bf16_llm():
    return _stack_llm("bfloat16")


@pytest.fixture(params=["bfloat16", "float32"])
def stack_llm(request):
    return _stack_llm(request.param)


def _decode_step(llm, n_steps: int = 3):
    """Inputs of an all-decode step of the engine's requests (prompts prefilled, a few tokens decoded); the
    engine is left with that step prepared and not run."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"s{i}", llm.tokenizer.encode(p), params)
    for _ in range(n_steps):
        eng.step()
    batch = eng.scheduler.schedule()
    assert batch.decodes and not batch.prefills
    return eng.runner.prepare(batch)


def _mixed_step(llm):
    """Inputs of a step mixing decode rows and prefill chunks (two new prompts, one with a cached prefix)."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:2]):
        eng.add_request(f"m{i}", llm.tokenizer.encode(p * 5), params)
    eng.step()
    eng.step()
    eng.add_request("m2", llm.tokenizer.encode(PROMPTS[2] * 3), params)
    eng.add_request("m3", llm.tokenizer.encode(PROMPTS[0] * 5 + " and"), params)  # (a prefix of m0's prompt)
    batch = eng.scheduler.schedule()
    assert batch.decodes and len(batch.prefills) == 2
    return eng.runner.prepare(batch)


@pytest.mark.parametrize("step", [_decode_step, _mixed_step])
@pytest.mark.parametrize("kv_packed", [True, False])
def test_stack_equals_python_forward_bit_for_bit(stack_llm, step, kv_packed):
    """Packed KV pages (written by the attention kernel in all-decode steps, before it otherwise) and rows
    (written by index_copy_)."""
    if not kv_packed:
        stack_llm = _stack_llm(stack_llm.engine.config.dtype, packed_kv_cache=False)
    runner = stack_llm.engine.runner
    inp = step(stack_llm)
    assert inp.meta.kv_packed == kv_packed
    stack, plain = runner.executor, runner.executor.executor
    assert stack._rows(inp.input_ids, inp.meta) is not None and stack._stack_tensors() is not None  # C++ runs
    # (each call writes the step's K/V to the same slots with the same values: the calls do not disturb each other)
    fast = stack(inp.input_ids, inp.positions, inp.meta, runner.kv_caches).clone()
    slow = plain(inp.input_ids, inp.positions, inp.meta, runner.kv_caches)
    assert torch.equal(fast, slow)


def test_same_tokens_and_logprobs_with_and_without(stack_llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    on = stack_llm.generate(PROMPTS, params, use_tqdm=False)
    off = LLM("default", dtype=stack_llm.engine.config.dtype, cpp_layer_stack=False)
    assert not isinstance(off.engine.runner.executor, CppLayerStack)
    off_outs = off.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off_outs]
    assert [o.outputs[0].logprobs for o in on] == [o.outputs[0].logprobs for o in off_outs]


def test_models_and_steps_it_does_not_fit():
    """F.linear GEMMs (--no-cpp-gemm), oneDNN's packed GEMM and other executors keep the Python forward."""
    f32 = LLM("default", dtype="float32", cpp_gemm=False)
    assert stack_tensors(f32.engine.runner.model) is None
    onednn = LLM("default", dtype="bfloat16", cpp_gemm=False)
    assert stack_tensors(onednn.engine.runner.model) is None
    nano = LLM("default", dtype="bfloat16", executor="nanobatch")
    assert not isinstance(nano.engine.runner.executor, CppLayerStack)


def test_trace_of_the_sequential_executor_still_records_every_operation(tmp_path):
    """Tracing times each nano-op: traced steps run the Python forward (the wrapper passes trace settings on)."""
    import json

    from nanoflow.cli import main
    out = tmp_path / "trace"
    assert main(["trace", "--executor", "sequential", "--dtype", "bfloat16", "--dense-batch", "16",
                 "--num-requests", "6", "--prompt-len", "8", "--warmup-steps", "3", "--out", str(out)]) == 0
    events = json.load(open(out / "trace.json"))["traceEvents"]
    assert {"qkv", "decode_attn", "gate_up", "down"} <= {e["name"].split("#")[0] for e in events if e["ph"] == "X"}


def test_fused_greedy_head_same_tokens_as_logits_then_argmax(bf16_llm):
    """Plain greedy steps take their tokens from the LM-head kernel's running argmax (the default with the C++
    GEMM); a batch mixing in a logprobs request takes the logits path for that step. Same tokens either way."""
    model = bf16_llm.engine.runner.model
    assert model.greedy_tokens(model.embed_tokens.weight[:3].contiguous()) is not None  # the fused path exists here
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    fused = bf16_llm.generate(PROMPTS, plain, use_tqdm=False)
    mixed = bf16_llm.generate(PROMPTS, [plain] * 3 + [SamplingParams(temperature=0.0, max_tokens=16,
                                                                     ignore_eos=True, logprobs=1)], use_tqdm=False)
    unfused = LLM("default", dtype="bfloat16", fused_greedy_head=False).generate(PROMPTS, plain, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in fused]
    assert tokens == [o.outputs[0].token_ids for o in unfused] == [o.outputs[0].token_ids for o in mixed]
