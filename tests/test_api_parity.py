"""OpenAI API parity with vLLM: the model card, continuous usage, finish/stop reasons, n and seed,
logit_bias, min_tokens, vocabulary checks, declined fields, prompt logprobs (echo + logprobs). A real server on
the default model in float32, driven by the `openai` client and raw httpx."""
from __future__ import annotations

import httpx
import openai
import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.server.app import ServerThread, build_app

pytestmark = pytest.mark.slow  # the default model behind a real server

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server():
    llm = LLM("default", dtype="float32", max_model_len=512, max_num_seqs=8, dense_batch=32)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    echo_ref = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, logprobs=2),
                            use_tqdm=False)[0]
    chat = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop", "the reference chat must end on EOS for the min_tokens test"
    app = build_app(llm.engine, ["default"])
    with ServerThread(app) as url:
        yield {"url": url, "ref": ref.outputs[0], "prompt_ids": ref.prompt_token_ids, "chat": chat,
               "decode": llm.tokenizer.decode, "echo_ref": echo_ref}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server['url']}/v1/{endpoint}", json=body, timeout=60)


def test_model_card(client):
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_continuous_usage_stats(server, client):
    n_prompt = len(server["prompt_ids"])
    chunks = list(client.completions.create(
        model="default", prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices and all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(c.usage.prompt_tokens == n_prompt for c in with_choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    plain = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain if c.choices)


def test_stop_string_and_stop_token_reasons(server, client):
    ref = server["ref"]
    stop = ref.text[3:7]  # a piece of the greedy text: the output stops before it
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop
    assert c.text == ref.text[:ref.text.index(stop)]
    tok = ref.token_ids[2]
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [tok]})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == tok
    assert r.usage.completion_tokens == ref.token_ids.index(tok) + 1  # the stop token counts, its text does not
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].model_extra["stop_reason"] is None
    chunks = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0,
                                            stop=[stop], stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].model_extra["stop_reason"] == stop


def test_n_samples_independent_and_seed_reproducible(client):
    def texts(**kw) -> list[str]:
        r = client.completions.create(model="default", prompt="Once upon a time,", max_tokens=12, n=4,
                                      temperature=1.0, **kw)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    free = texts()
    assert len(set(free)) > 1  # four independent draws of 12 tokens at temperature 1, not one copied
    seeded = texts(seed=7)
    assert len(set(seeded)) > 1 and texts(seed=7) == seeded


def test_logit_bias(server, client):
    tok = 1000
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(tok): 100})
    assert r.choices[0].text == server["decode"]([tok] * 3)
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0,
                                  logit_bias={str(server["ref"].token_ids[0]): -100})
    assert not r.choices[0].text.startswith(server["decode"](server["ref"].token_ids[:1]))


def test_min_tokens_bans_eos_and_stop_ids(server, client):
    ref = server["chat"]
    n = len(ref.token_ids)
    r = client.chat.completions.create(model="default", messages=CHAT, max_tokens=n + 20, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == n
    r = client.chat.completions.create(model="default", messages=CHAT, max_tokens=n + 20, temperature=0,
                                       extra_body={"min_tokens": n + 5})
    assert r.usage.completion_tokens >= n + 5
    first = server["ref"].token_ids[0]
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"min_tokens": 4, "stop_token_ids": [first]})
    assert r.usage.completion_tokens >= 4


@pytest.mark.parametrize("endpoint,extra,param", [
    ("completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("completions", {"logit_bias": {"1000000": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("completions", {"return_token_ids": True}, "return_token_ids"),
    ("completions", {"min_tokens": -1}, "min_tokens"),
    ("completions", {"top_k": -2}, "top_k"),
    ("chat/completions", {"echo": True}, "echo"),
    ("chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("chat/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_out_of_range_and_declined_fields_400(server, endpoint, extra, param):
    base = {"prompt": "x"} if endpoint == "completions" else {"messages": CHAT}
    r = post(server, endpoint, {**base, "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]


def test_declined_fields_at_their_defaults_are_fine(server):
    r = post(server, "completions", {"prompt": "x", "max_tokens": 1, "use_beam_search": False, "suffix": None,
                                     "return_token_ids": False, "logit_bias": None})
    assert r.status_code == 200, r.text
    r = post(server, "chat/completions", {"messages": CHAT, "max_tokens": 1, "echo": False,
                                          "add_generation_prompt": True})
    assert r.status_code == 200, r.text


# ---- echo + logprobs: prompt logprobs (item 1) ----
def _check_echo(server, lp, text: str) -> None:
    ref = server["echo_ref"]
    ids, out = ref.prompt_token_ids, ref.outputs[0]
    assert text == PROMPT + out.text
    assert lp.tokens == [server["decode"]([t]) for t in ids + out.token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [e["logprob"] for e in ref.prompt_logprobs[1:]] + [e["logprob"] for e in out.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_logprobs_prompt_forms_and_n(server, client):
    ids = server["echo_ref"].prompt_token_ids
    for prompt in (PROMPT, ids, [PROMPT, PROMPT], [ids]):
        r = client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                      logprobs=2, n=2)
        assert len(r.choices) == (4 if prompt == [PROMPT, PROMPT] else 2)
        for c in r.choices:
            _check_echo(server, c.logprobs, c.text)
        assert r.usage.prompt_tokens * 2 == len(ids) * len(r.choices) and r.usage.completion_tokens == 4 * len(r.choices)


@pytest.mark.parametrize("prompt_form", ["text", "ids"])
def test_echo_logprobs_streamed(server, client, prompt_form):
    prompt = PROMPT if prompt_form == "text" else server["echo_ref"].prompt_token_ids
    chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                            logprobs=2, n=2, stream=True))
    for index in (0, 1):
        text, tokens, lps, tops, offsets = "", [], [], [], []
        for c in (c for ch in chunks for c in ch.choices if c.index == index):
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                tops += c.logprobs.top_logprobs
                offsets += c.logprobs.text_offset
        lp = type("LP", (), {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        _check_echo(server, lp, text)
