"""Structured output through the OpenAI server: response_format (json_object, json_schema) on chat, vLLM's
structured_outputs and guided_* on both endpoints, streaming; bad specs are 400s with an OpenAI error body.
A real server and the real `openai` client."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from nanoflow import LLM
from nanoflow.server.app import ServerThread, build_app

pytestmark = pytest.mark.slow  # the default model behind a real server

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 16}, "country": {"type": "string", "maxLength": 16}}}


@pytest.fixture(scope="module")
def url():
    llm = LLM("default", max_model_len=512, max_num_seqs=8, async_scheduling=True)
    with ServerThread(build_app(llm.engine, ["default"])) as u:
        yield u


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content: str, max_tokens: int = 64, **kw):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, **kw).choices[0]


def test_chat_response_format_json_schema(client):
    for t, q in [(0, "Where is the Eiffel tower?"), (0.7, "Name a big city in Japan.")]:
        c = chat(client, q + " Answer in JSON.", temperature=t, seed=1, max_tokens=128, response_format={
            "type": "json_schema", "json_schema": {"name": "place", "schema": CITY, "strict": True}})
        obj = json.loads(c.message.content)
        assert set(obj) == {"city", "country"} and all(isinstance(v, str) for v in obj.values()), obj
        assert c.finish_reason == "stop", c.message.content


def test_chat_json_object(client):
    c = chat(client, 'Give me a JSON object with one key "ok" set to true.', temperature=0,
             response_format={"type": "json_object"}, max_tokens=64)
    assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c.message.content


def test_structured_outputs_on_both_endpoints(client):
    extra = {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}
    for t in (0, 1.0):
        c = chat(client, "Pick a Greek letter.", temperature=t, extra_body=extra)
        assert c.message.content in ("alpha", "beta", "gamma")
        r = client.completions.create(model="default", prompt="The first Greek letter is", max_tokens=8,
                                      temperature=t, n=2, extra_body=extra)
        assert all(x.text in ("alpha", "beta", "gamma") for x in r.choices)
    r = client.completions.create(model="default", prompt="A date: ", max_tokens=16, temperature=0.8, seed=3,
                                  extra_body={"structured_outputs": {"regex": r"19[0-9]{2}/[01][0-9]"}})
    assert re.fullmatch(r"19[0-9]{2}/[01][0-9]", r.choices[0].text), r.choices[0].text
    r = client.completions.create(model="default", prompt="Coordinates as JSON:", max_tokens=40, temperature=0,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= "(" [0-9]+ "," [0-9]+ ")"'}})
    assert re.fullmatch(r"\(\d+,\d+\)", r.choices[0].text), r.choices[0].text


def test_guided_fields_and_streaming(client):
    stream = client.completions.create(model="default", prompt="Is water wet? Answer:", max_tokens=8, stream=True,
                                       temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) in ("yes", "no")
    c = chat(client, "Give a city as JSON.", temperature=0, extra_body={"guided_json": CITY})
    assert set(json.loads(c.message.content)) == {"city", "country"}
    c = chat(client, "Three digits:", temperature=0.5, extra_body={"guided_regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", c.message.content)


@pytest.mark.parametrize("path,body,param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "structured_outputs"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
    ("completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"choice": []}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ("completions", {"guided_json": "{not json"}, "structured_outputs"),
    ("completions", {"guided_regex": "a", "guided_choice": ["a"]}, "structured_outputs"),
])
def test_invalid_spec_is_400(url, path, body, param):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {"prompt": "hi"})
    r = httpx.post(f"{url}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                   json={"model": "default", "max_tokens": 4, **base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["param"] == param and err["message"], err
