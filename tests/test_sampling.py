"""Sampling parameters and stop conditions on the real default model (float32)."""
import pytest

from nanoflow import SamplingParams

PROMPT = "Once upon a time, a dragon"


def _one(llm, prompt=PROMPT, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs


@pytest.mark.slow
def test_seed_reproducible_whatever_the_batch(llm_fp32):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm_fp32.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)] * 3
    batch = llm_fp32.generate(["Hi", PROMPT, "What is 2+2?", "Say something."], [others[0], p] + others[1:],
                              use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = _one(llm_fp32, temperature=1.0, top_p=0.9, seed=99, max_tokens=24, ignore_eos=True)
    assert other_seed[0].token_ids != alone


@pytest.mark.slow
def test_top_k_one_is_greedy(llm_fp32):
    greedy = _one(llm_fp32, temperature=0.0, max_tokens=16)[0].token_ids
    assert _one(llm_fp32, temperature=0.8, top_k=1, seed=3, max_tokens=16)[0].token_ids == greedy
    assert _one(llm_fp32, temperature=0.8, min_p=1.0, seed=3, max_tokens=16)[0].token_ids == greedy


@pytest.mark.slow
def test_max_tokens_and_length_reason(llm_fp32):
    out = _one(llm_fp32, temperature=0.0, max_tokens=5, ignore_eos=True)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.slow
def test_stop_string_not_in_output(llm_fp32):
    full = _one(llm_fp32, "1, 2, 3, 4,", temperature=0.0, max_tokens=20)[0].text
    assert "7" in full
    out = _one(llm_fp32, "1, 2, 3, 4,", temperature=0.0, max_tokens=20, stop=["7"])[0]
    assert out.finish_reason == "stop" and out.stop_reason == "7"
    assert out.text == full[: full.index("7")]
    inc = _one(llm_fp32, "1, 2, 3, 4,", temperature=0.0, max_tokens=20, stop="7", include_stop_str_in_output=True)
    assert inc[0].text == full[: full.index("7") + 1]


@pytest.mark.slow
def test_stop_token_ids(llm_fp32):
    prompt = "Once upon a time, there was"
    greedy = _one(llm_fp32, prompt, temperature=0.0, max_tokens=10, ignore_eos=True)[0].token_ids
    out = _one(llm_fp32, prompt, temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=[greedy[3]])[0]
    assert out.token_ids == greedy[: greedy.index(greedy[3]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == greedy[3]


@pytest.mark.slow
def test_eos_stops_unless_ignored(llm_fp32):
    chat = llm_fp32.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  add_generation_prompt=True, tokenize=False)
    ids = llm_fp32.tokenizer.encode(chat, add_special_tokens=False)
    out = llm_fp32.generate([ids], SamplingParams(temperature=0.0, max_tokens=60), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and "Paris" in out.text
    ign = llm_fp32.generate([ids], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(ign.token_ids) == 60 and ign.token_ids[: len(out.token_ids)] == out.token_ids


@pytest.mark.slow
def test_n_and_logprobs(llm_fp32):
    outs = _one(llm_fp32, n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2, ignore_eos=True)
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for o in outs:
        assert len(o.logprobs) == 8
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert lp["token_id"] == tok and lp["logprob"] <= 0.0 and len(lp["top"]) == 2
            assert lp["top"][0][1] >= lp["top"][1][1] >= lp["logprob"] - 1e-6 or tok in dict(lp["top"])


@pytest.mark.slow
def test_greedy_logprob_is_top(llm_fp32):
    out = _one(llm_fp32, temperature=0.0, max_tokens=6, logprobs=1)[0]
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp["top"][0][0] == tok


@pytest.mark.slow
def test_penalties_change_greedy_output(llm_fp32):
    base = _one(llm_fp32, "1, 2, 3, 4,", temperature=0.0, max_tokens=24, ignore_eos=True)[0].token_ids
    for kw in ({"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):
        out = _one(llm_fp32, "1, 2, 3, 4,", temperature=0.0, max_tokens=24, ignore_eos=True, **kw)[0].token_ids
        assert out != base, kw


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 2},
                                {"max_tokens": 0}, {"n": 0}, {"logprobs": 50}, {"presence_penalty": 3},
                                {"repetition_penalty": 0}, {"stop": [""]}])
def test_bad_params_rejected(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_penalties_without_unique_or_bincount_match_the_reference():
    """The sampler's penalties use scatter masks/counts (torch.unique and bincount read their output size back
    to the host: a GPU sync per request); the values equal the unique/bincount formulas exactly."""
    import torch
    from nanoflow.engine.sampler import SampleRow, Sampler
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    hist = [[1, 2, 2, 7, 7, 7, 40], [3, 3, 9], [0, 49, 5, 5]]
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(repetition_penalty=0.8), SamplingParams(frequency_penalty=1.5)]
    rows = [SampleRow(f"r{i}", p, h, 2) for i, (p, h) in enumerate(zip(params, hist))]
    want = logits.clone()
    for row, r in zip(want, rows):
        p, h = r.params, torch.tensor(r.history)
        if p.repetition_penalty != 1.0:
            seen = torch.unique(h)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        counts = torch.bincount(h[r.num_prompt:], minlength=row.numel()).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    got = logits.clone()
    Sampler._apply_penalties(got, rows, torch.zeros(3, dtype=torch.long))
    assert torch.equal(got, want)
