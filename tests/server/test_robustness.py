"""The OpenAI server under bad input and abuse: OpenAI-shaped errors naming the parameter (raw httpx), typed
errors in the `openai` client, client disconnects that free the KV cache, a full waiting queue answering 429,
`nanoflow bench serve` against it, and right answers with a whole KV pool afterwards (server: conftest.py)."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from .conftest import SERVER_MAX_NUM_SEQS, SERVER_MAX_TOKENS, SERVER_MAX_WAITING, SERVER_PROMPTS

pytestmark = pytest.mark.slow  # the default model behind a real server


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
    """SERVER_MAX_NUM_SEQS long requests run, SERVER_MAX_WAITING more wait; the next one is refused with 429."""
    url = server["url"]
    body = {"prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ctxs = [httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)
            for _ in range(SERVER_MAX_NUM_SEQS + SERVER_MAX_WAITING)]
    lines = []  # keep each line iterator alive: dropping one closes its response (= a disconnect)
    try:
        for ctx in ctxs[:SERVER_MAX_NUM_SEQS]:  # running: each has streamed its first token
            lines.append(ctx.__enter__().iter_lines())
            next(lines[-1])
        for ctx in ctxs[SERVER_MAX_NUM_SEQS:]:
            ctx.__enter__()  # headers arrive at once; the requests sit in the waiting queue
        deadline = time.time() + 30
        while metric(url, "num_requests_waiting") < SERVER_MAX_WAITING and time.time() < deadline:
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
    p = SERVER_PROMPTS[3]
    r = client.completions.create(model="default", prompt=p, max_tokens=SERVER_MAX_TOKENS, temperature=0)
    assert r.choices[0].text == server["refs"][p]
    wait_idle_and_full(server["url"])
    text = httpx.get(server["url"] + "/metrics").text
    assert "nanoflow:request_rejected" in text
    assert json.loads(httpx.get(server["url"] + "/v1/models").text)["object"] == "list"
