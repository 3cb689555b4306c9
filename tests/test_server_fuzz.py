"""Property-based fuzz of the request schema against a real server: random JSON bodies of right and wrong
types (and raw garbage) never get a 5xx, errors always come in the OpenAI body, and the server stays correct."""
from __future__ import annotations

import json
import os
import sys
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow import LLM, SamplingParams
from nanoflow.server.app import ServerThread, build_app

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from fuzz_volume import Fuzz  # noqa: E402  (benchmarks/fuzz_volume.py)

pytestmark = pytest.mark.slow  # the default model behind a real server

REF_PROMPT = "The capital of France is"

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 8),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
anything = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=3))
token_ids = st.lists(st.integers(-3, 60000), max_size=6)
small = st.one_of(st.integers(1, 4), anything)
prob = st.one_of(st.floats(0, 1), anything)
SAMPLING = {
    "model": st.one_of(st.just("default"), anything), "n": st.one_of(st.integers(1, 3), anything),
    "max_tokens": small, "min_tokens": small, "temperature": st.one_of(st.floats(0, 2), anything),
    "top_p": prob, "top_k": st.one_of(st.integers(-1, 50), anything), "min_p": prob,
    "presence_penalty": st.one_of(st.floats(-2, 2), anything), "frequency_penalty": anything,
    "repetition_penalty": st.one_of(st.floats(0.5, 2), anything), "seed": anything,
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), anything),
    "stop_token_ids": st.one_of(token_ids, anything), "ignore_eos": st.one_of(st.booleans(), anything),
    "stream": st.one_of(st.booleans(), anything),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "user": anything, "logit_bias": anything, "response_format": anything, "unknown_field": anything,
}
completion_bodies = st.fixed_dictionaries({}, optional={
    **SAMPLING, "prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=8), max_size=3), token_ids,
                                    st.lists(token_ids, max_size=2), anything),
    "echo": st.one_of(st.booleans(), anything), "logprobs": st.one_of(st.integers(0, 25), anything),
    "suffix": anything, "best_of": anything})
message = st.one_of(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"]), anything),
    "content": st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries(
        {"type": st.one_of(st.just("text"), anything), "text": st.one_of(st.text(max_size=8), anything)}),
        max_size=2), anything)}), anything)
chat_bodies = st.fixed_dictionaries({}, optional={
    **SAMPLING, "messages": st.one_of(st.lists(message, max_size=3), anything),
    "max_completion_tokens": small, "logprobs": st.one_of(st.booleans(), anything),
    "top_logprobs": st.one_of(st.integers(0, 25), anything)})


@pytest.fixture(scope="module")
def server():
    llm = LLM("default", dtype="bfloat16", max_model_len=64, max_num_seqs=8)
    ref = llm.generate([REF_PROMPT], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    app = build_app(llm.engine, ["default"], max_waiting=64)
    with ServerThread(app) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, ref.outputs[0].text


def check(client: httpx.Client, path: str, content: bytes) -> int:
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        body = r.read()
    assert r.status_code < 500, body
    if r.status_code >= 400:
        err = json.loads(body)["error"]
        assert err["message"] and err["code"] == r.status_code and "type" in err and "param" in err
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert json.loads(e).get("error", {}).get("code", 200) < 500, e
    else:
        assert "usage" in json.loads(body)
    return r.status_code


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                database=None)


@FUZZ
@given(body=completion_bodies)
def test_fuzz_completions(server, body):
    check(server[0], "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat(server, body):
    check(server[0], "/v1/chat/completions", json.dumps(body).encode())


@st.composite
def valid_bodies(draw) -> tuple[str, dict]:
    """In-range values only: every one of these must succeed (200), streamed or not."""
    body = {"max_tokens": draw(st.integers(1, 4)), "n": draw(st.integers(1, 2)), "seed": draw(st.integers(0, 2**63 - 1)),
            "temperature": draw(st.floats(0, 2)), "top_p": draw(st.floats(0.01, 1)), "top_k": draw(st.integers(-1, 60000)),
            "min_p": draw(st.floats(0, 1)), "presence_penalty": draw(st.floats(-2, 2)),
            "frequency_penalty": draw(st.floats(-2, 2)), "repetition_penalty": draw(st.floats(0.1, 2)),
            "stop": draw(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
            "stop_token_ids": draw(token_ids.map(lambda ids: [abs(i) % 49152 for i in ids])),  # in the vocabulary
            "ignore_eos": draw(st.booleans()), "stream": draw(st.booleans())}
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=20))}]
        body["logprobs"] = draw(st.booleans())
        if body["logprobs"]:
            body["top_logprobs"] = draw(st.integers(0, 20))
        return "/v1/chat/completions", body
    body["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=20).filter(str.strip),
                                    st.lists(st.integers(0, 40000), min_size=1, max_size=6)))
    if draw(st.booleans()):
        body["logprobs"] = draw(st.integers(0, 20))
    else:
        body["echo"] = draw(st.booleans())
    return "/v1/completions", body


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(case=valid_bodies())
def test_fuzz_valid_bodies_succeed(server, case):
    path, body = case
    assert check(server[0], path, json.dumps(body).encode()) == 200, body


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(raw=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_raw_bytes(server, raw, path):
    check(server[0], path, raw)


def test_fuzz_volume_slice(server):
    """A slice of benchmarks/fuzz_volume.py: a few hundred cases generated from /openapi.json, sent concurrently
    (httpx and the openai client) while streaming clients hang up at random points: no 5xx, no client timeout,
    well-formed errors and streams, the KV pool full again and the fixed prompts' greedy answers unchanged."""
    report = Fuzz(str(server[0].base_url).rstrip("/"), hang_timeout=120).run(240, workers=4, disconnectors=2)
    assert report["fuzzed_requests"] == 240 and report["responses"] >= 240
    assert report["num_5xx"] == 0 and report["hangs"] == 0 and not report["failures"], report
    assert report["kv_free_blocks"] == report["kv_total_blocks"] and report["running_after"] == 0, report
    assert not report["greedy_changed"] and report["ok"], report


def test_still_correct_after_fuzz(server):
    client, ref_text = server
    r = client.post("/v1/completions", json={"prompt": REF_PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref_text
    deadline = time.time() + 30
    while time.time() < deadline:  # the KV pool is whole again once idle
        m = {line.split()[0]: float(line.split()[1]) for line in client.get("/metrics").text.splitlines()
             if line.startswith("nanoflow:") and " " in line}
        if m["nanoflow:kv_cache_free_blocks"] == m["nanoflow:kv_cache_total_blocks"] and \
                m["nanoflow:num_requests_running"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("KV pool not full after the fuzz")
