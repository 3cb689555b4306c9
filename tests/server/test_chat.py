"""The OpenAI server's chat endpoint, end to end with the official `openai` client (server: conftest.py)."""
from __future__ import annotations

import pytest

from .conftest import SERVER_MAX_TOKENS

pytestmark = pytest.mark.slow  # the default model behind a real server


def test_chat(client):
    r = client.chat.completions.create(model="default", messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
        max_completion_tokens=SERVER_MAX_TOKENS, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.completion_tokens <= SERVER_MAX_TOKENS and r.usage.prompt_tokens > 5


def test_chat_max_tokens_null_fills_the_context(server, client):
    messages, room = server["long_chat"]
    assert 1 <= room <= 8
    r = client.chat.completions.create(model="default", messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"
