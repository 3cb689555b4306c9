"""The server's whole request path in seconds: a tiny random Llama saved as an HF directory with the default
model's tokenizer (so chat templates and detokenization are real), behind a real server. Only shapes and
protocol are checked here; the default-model files of this package check the text."""
from __future__ import annotations

import os

import httpx
import openai
import pytest

from nanoflow import LLM
from nanoflow.server.app import ServerThread, build_app
from tests.helpers import save_tiny_hf_model


@pytest.fixture(scope="module")
def url(tmp_path_factory, default_gguf):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(default_gguf), gguf_file=os.path.basename(default_gguf))
    path = save_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf"), tok)
    llm = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=2)
    with ServerThread(build_app(llm.engine, ["default"])) as u:
        yield u


def test_completion_chat_stream_errors_and_metrics(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.completions.create(model="default", prompt="Hello", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0.8, seed=1,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 3
    bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": -1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert "nanoflow:num_requests_running" in httpx.get(url + "/metrics", timeout=30).text
