"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port, driven by the
official `openai` client (and raw httpx for bad input). One server for the module; few tokens per request."""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.server.app import ServerThread, build_app
from nanoflow.tokenizer import apply_chat_template

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Once upon a time,"]
MAX_TOKENS = 8
MAX_NUM_SEQS, MAX_WAITING = 4, 4


@pytest.fixture(scope="module")
def server():
    llm = LLM("default", dtype="float32", max_model_len=512, max_num_seqs=MAX_NUM_SEQS)
    # The reference: LLM.generate on the same engine, one prompt at a time, before the server owns it.
    refs = [llm.generate([p], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
            for p in PROMPTS]
    # A chat whose templated prompt leaves exactly 5 tokens of context (for max_tokens=null).
    words = 400
    while len(apply_chat_template(llm.tokenizer, [{"role": "user", "content": "hi " * words}])) < 512 - 5:
        words += 1
    long_chat = [{"role": "user", "content": "hi " * (words - 1)}]
    room = 512 - len(apply_chat_template(llm.tokenizer, long_chat))
    app = build_app(llm.engine, ["default", "smollm2"], max_waiting=MAX_WAITING)
    with ServerThread(app) as url:
        yield {"url": url, "refs": {p: r.outputs[0].text for p, r in zip(PROMPTS, refs)},
               "prompt_ids": {p: r.prompt_token_ids for p, r in zip(PROMPTS, refs)},
               "long_chat": (long_chat, room)}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^nanoflow:{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"metric {name} missing"
    return float(m.group(1))


def wait_idle_and_full(url: str, timeout: float = 30.0) -> None:
    """The KV pool returns to its full size when nothing runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (metric(url, "num_requests_running") == 0 and metric(url, "num_requests_waiting") == 0
                and metric(url, "kv_cache_free_blocks") == metric(url, "kv_cache_total_blocks")):
            return
        time.sleep(0.1)
    raise AssertionError("the KV pool did not return to full")


# ---- real clients ----
def test_models_health_version(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["default", "smollm2"]
    assert models[0].model_extra["max_model_len"] == 512
    assert httpx.get(server["url"] + "/health").status_code == 200
    assert httpx.get(server["url"] + "/version").json()["version"]


def test_greedy_completion_equals_llm_generate(server, client):
    for p in PROMPTS[:2]:
        r = client.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == server["refs"][p]
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(server["prompt_ids"][p])
        assert r.usage.completion_tokens == MAX_TOKENS


def test_prompt_forms(server, client):
    p0, p1 = PROMPTS[:2]
    r = client.completions.create(model="smollm2", prompt=[p0, p1], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [server["refs"][p0], server["refs"][p1]]
    ids = server["prompt_ids"][p0]
    r = client.completions.create(model="default", prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == server["refs"][p0]
    r = client.completions.create(model="default", prompt=[ids, server["prompt_ids"][p1]], max_tokens=MAX_TOKENS,
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


def test_chat(client):
    r = client.chat.completions.create(model="default", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
        max_completion_tokens=MAX_TOKENS, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.completion_tokens <= MAX_TOKENS and r.usage.prompt_tokens > 5


def test_chat_max_tokens_null_fills_the_context(server, client):
    messages, room = server["long_chat"]
    assert 1 <= room <= 8
    r = client.chat.completions.create(model="default", messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"


def test_streaming_with_usage(server, client):
    p = PROMPTS[2]
    stream = client.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert "".join(c.choices[0].text for c in chunks[:-1]) == server["refs"][p]
    assert chunks[-2].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)
    stream = client.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, echo=True)
    assert "".join(c.choices[0].text for c in stream) == p + server["refs"][p]


def test_n_choices_streamed_and_not(client):
    r = client.completions.create(model="default", prompt="Once", max_tokens=5, temperature=1.0, n=2, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    stream = client.completions.create(model="default", prompt="Once", max_tokens=5, temperature=1.0, n=2,
                                       seed=7, stream=True, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == {c.index: c.text for c in r.choices}  # same seed: the same two samples, streamed


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
        results[p] = client.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == server["refs"]


# ---- robustness ----
BAD = [  # (endpoint, raw body, status, param)
    ("completions", "{not json", 400, None),
    ("completions", "[]", 400, None),
    ("completions", '{"prompt": 5}', 400, "prompt"),
    ("completions", '{"prompt": ""}', 400, "prompt"),
    ("completions", '{"prompt": []}', 400, "prompt"),
    ("completions", '{"prompt": [[1, 2], []]}', 400, "prompt"),
    ("completions", '{"prompt": [-1]}', 400, "prompt"),
    ("completions", '{"prompt": [99999999]}', 400, "prompt"),
    ("completions", '{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": 100000000000000000000000}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": 600}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "temperature": -0.5}', 400, "temperature"),
    ("completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("completions", '{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("completions", '{"prompt": "x", "n": 0}', 400, "n"),
    ("completions", '{"prompt": "x", "n": true}', 400, "n"),
    ("completions", '{"prompt": "x", "logprobs": 21}', 400, "logprobs"),
    ("completions", '{"prompt": "x", "seed": 1e30}', 400, "seed"),
    ("completions", '{"prompt": "x", "stop": [""]}', 400, "stop"),
    ("completions", '{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    ("completions", '{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    ("chat/completions", '{"messages": []}', 400, "messages"),
    ("chat/completions", '{"prompt": "x"}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": 3}]}', 400, "messages"),
    ("chat/completions", '{"messages": "hi"}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400,
     "top_logprobs"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30, "logprobs": true}',
     400, "top_logprobs"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "model": "nope"}', 404, "model"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{e}:{b[:40]}" for e, b, _, _ in BAD])
def test_bad_input_gets_openai_error(server, endpoint, body, status, param):
    r = httpx.post(f"{server['url']}/v1/{endpoint}", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == status
    assert err["param"] == param, err


def test_prompt_over_context_names_both_numbers(server):
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": [1] * 600}, timeout=30)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "512" in msg and "600" in msg


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="default", prompt="x", max_tokens=1, logprobs=50)


def test_stream_disconnect_frees_kv(server):
    url = server["url"]
    aborted = metric(url, "request_aborted_total")
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few chunks, then hang up mid-stream
        assert any(line.startswith("data: {") for line in got)
    wait_idle_and_full(url)
    assert metric(url, "request_aborted_total") == aborted + 1


def test_non_stream_disconnect_frees_kv(server):
    url = server["url"]
    aborted = metric(url, "request_aborted_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", timeout=1.5,
                   json={"prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True})
    wait_idle_and_full(url)
    assert metric(url, "request_aborted_total") == aborted + 1


def test_full_waiting_queue_answers_429(server):
    """MAX_NUM_SEQS long requests run, MAX_WAITING more wait; the next one is refused with 429."""
    url = server["url"]
    body = {"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ctxs = [httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)
            for _ in range(MAX_NUM_SEQS + MAX_WAITING)]
    lines = []  # keep each line iterator alive: dropping one closes its response (= a disconnect)
    try:
        for ctx in ctxs[:MAX_NUM_SEQS]:  # running: each has streamed its first token
            lines.append(ctx.__enter__().iter_lines())
            next(lines[-1])
        for ctx in ctxs[MAX_NUM_SEQS:]:
            ctx.__enter__()  # headers arrive at once; the requests sit in the waiting queue
        deadline = time.time() + 30
        while metric(url, "num_requests_waiting") < MAX_WAITING and time.time() < deadline:
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == 429 and "waiting queue" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
    finally:
        for ctx in ctxs:
            ctx.__exit__(None, None, None)
    wait_idle_and_full(url)


def test_bench_serve_against_the_server(server, tmp_path):
    """`nanoflow bench serve` end to end (tiny): streaming metrics, a two-rate sweep, its plot and JSON."""
    from nanoflow.cli import main
    out, png = tmp_path / "serve.json", tmp_path / "sweep.png"
    rc = main(["bench", "serve", "--url", f"a={server['url']}", "--workload", "const:4/3", "--num-requests", "2",
               "--sweep", "50,100", "--json", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50, 100]
    for r in runs:
        assert r["completed"] == 2 and r["failed"] == 0 and r["output_tokens"] == 6
        assert r["ttft_ms"]["mean"] > 0 and r["normalized_ms"]["p99"] >= r["normalized_ms"]["median"] > 0
    wait_idle_and_full(server["url"])


def test_still_correct_after_abuse(server, client):
    """After bad input, disconnects and 429s: answers are still right and the KV pool is whole."""
    wait_idle_and_full(server["url"])
    p = PROMPTS[3]
    r = client.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == server["refs"][p]
    wait_idle_and_full(server["url"])
    text = httpx.get(server["url"] + "/metrics").text
    assert "nanoflow:request_rejected" in text
    assert json.loads(httpx.get(server["url"] + "/v1/models").text)["object"] == "list"

