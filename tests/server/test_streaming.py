"""Streaming from the OpenAI server (server-sent events through the official `openai` client): the same text
as without streaming, usage in a last chunk, n > 1 choices interleaved (server: conftest.py)."""
from __future__ import annotations

import pytest

from .conftest import SERVER_MAX_TOKENS, SERVER_PROMPTS

pytestmark = pytest.mark.slow  # the default model behind a real server


def test_streaming_with_usage(server, client):
    p = SERVER_PROMPTS[2]
    stream = client.completions.create(model="default", prompt=p, max_tokens=SERVER_MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == SERVER_MAX_TOKENS
    assert "".join(c.choices[0].text for c in chunks[:-1]) == server["refs"][p]
    assert chunks[-2].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=SERVER_MAX_TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)
    stream = client.completions.create(model="default", prompt=p, max_tokens=SERVER_MAX_TOKENS, temperature=0,
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
