"""SamplingParams.prompt_logprobs: equal to HF transformers on the whole prompt (float32),
with prefill chunked small, with async scheduling, and again when the prompt's blocks are in the prefix cache."""
from __future__ import annotations

import os

import pytest
import torch

from nanoflow import LLM, SamplingParams

pytestmark = pytest.mark.slow  # the default model and HF transformers

PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 4 + "Then it", "Hi", "1, 2, 3, 4, 5,"]
K = 3


@pytest.fixture(scope="module")
def hf_logprobs(default_gguf) -> dict[tuple[int, ...], torch.Tensor]:
    """log-softmax over the vocabulary at every prompt position, from HF on the same GGUF (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(default_gguf), os.path.basename(default_gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.encode(p, add_special_tokens=False)
            out[tuple(ids)] = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return out


def check(outputs, hf_logprobs) -> None:
    for o in outputs:
        ids, plp = o.prompt_token_ids, o.prompt_logprobs
        ref = hf_logprobs[tuple(ids)]
        assert len(plp) == len(ids) and plp[0] is None
        for i in range(1, len(ids)):
            e = plp[i]
            assert e["token_id"] == ids[i]
            assert e["logprob"] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-3)
            vals, top = ref[i - 1].topk(K)
            assert [t for t, _ in e["top"]] == top.tolist()
            assert [v for _, v in e["top"]] == pytest.approx(vals.tolist(), abs=1e-3)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_equal_hf_chunked_async_and_cached(hf_logprobs, async_scheduling):
    # dense_batch 16: the 41-token prompt is prefilled in 3+ chunks, beside the others
    llm = LLM("default", dtype="float32", max_model_len=256, dense_batch=16, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=K, logprobs=1)
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    check(first, hf_logprobs)
    # The same prompts again: their blocks are in the prefix cache, but these requests recompute them.
    hits = llm.engine.stats.prefix_hit_tokens
    again = llm.generate(PROMPTS, params, use_tqdm=False)
    check(again, hf_logprobs)
    assert llm.engine.stats.prefix_hit_tokens == hits
    # Without prompt_logprobs the cache is used, and outputs carry none.
    plain = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and llm.engine.stats.prefix_hit_tokens > hits
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]


def test_prompt_logprobs_with_n_and_zero_k(hf_logprobs):
    llm = LLM("default", dtype="float32", max_model_len=256, dense_batch=64)
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=3, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 2 and all(e["top"] == [] for e in out.prompt_logprobs[1:])
    ref = hf_logprobs[tuple(out.prompt_token_ids)]
    got = [e["logprob"] for e in out.prompt_logprobs[1:]]
    want = [ref[i - 1, t].item() for i, t in enumerate(out.prompt_token_ids) if i]
    assert got == pytest.approx(want, abs=1e-3)
