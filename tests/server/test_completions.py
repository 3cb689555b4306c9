"""The OpenAI server's completions endpoint, end to end with the official `openai` client: greedy text equal to
LLM.generate, every prompt form, stop strings and sampling options, seeds, logprobs, concurrent requests. The
server (conftest.py) is one for the package; few tokens per request."""
from __future__ import annotations

import threading

import httpx
import pytest

from .conftest import SERVER_MAX_TOKENS, SERVER_PROMPTS

pytestmark = pytest.mark.slow  # the default model behind a real server


def test_models_health_version(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["default", "smollm2"]
    assert models[0].model_extra["max_model_len"] == 512
    assert httpx.get(server["url"] + "/health").status_code == 200
    assert httpx.get(server["url"] + "/version").json()["version"]


def test_greedy_completion_equals_llm_generate(server, client):
    for p in SERVER_PROMPTS[:2]:
        r = client.completions.create(model="default", prompt=p, max_tokens=SERVER_MAX_TOKENS, temperature=0)
        assert r.choices[0].text == server["refs"][p]
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(server["prompt_ids"][p])
        assert r.usage.completion_tokens == SERVER_MAX_TOKENS


def test_prompt_forms(server, client):
    p0, p1 = SERVER_PROMPTS[:2]
    r = client.completions.create(model="smollm2", prompt=[p0, p1], max_tokens=SERVER_MAX_TOKENS, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [server["refs"][p0], server["refs"][p1]]
    ids = server["prompt_ids"][p0]
    r = client.completions.create(model="default", prompt=ids, max_tokens=SERVER_MAX_TOKENS, temperature=0)
    assert r.choices[0].text == server["refs"][p0]
    r = client.completions.create(model="default", prompt=[ids, server["prompt_ids"][p1]], max_tokens=SERVER_MAX_TOKENS,
                                  temperature=0, echo=True)
    assert r.choices[0].text.endswith(server["refs"][p0]) and p0 in r.choices[0].text
    r = client.completions.create(model="default", prompt=p0, temperature=0)  # max_tokens omitted: 16
    assert r.usage.completion_tokens <= 16


def test_stop_and_options(client):
    r = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0,
                                  stop=[" 8"], extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.0})
    assert r.choices[0].finish_reason == "stop" and " 8" not in r.choices[0].text
    r = client.completions.create(model="default", prompt="Hello", max_tokens=6, temperature=0.7, top_p=0.9,
                                  presence_penalty=0.5, frequency_penalty=0.5, seed=3, user="u1",
                                  extra_body={"ignore_eos": True, "min_tokens": 6})
    assert r.usage.completion_tokens == 6


def test_seed_reproducible(client):
    kw = dict(model="default", prompt="The weather today", max_tokens=8, temperature=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_logprobs_shapes(client):
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(2 <= len(t) <= 3 and max(t.values()) <= 0 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy picks the top token
    assert bytes(content[0].bytes).decode() == content[0].token


def test_concurrent_requests(server, client):
    results: dict[str, str] = {}

    def one(p: str) -> None:
        results[p] = client.completions.create(model="default", prompt=p, max_tokens=SERVER_MAX_TOKENS,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(p,)) for p in SERVER_PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == server["refs"]
