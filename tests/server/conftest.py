"""The OpenAI server tests share one server on the default model (float32, max_model_len 512): built once for
this package, freed after its last test."""
import openai
import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.server.app import ServerThread, build_app
from nanoflow.tokenizer import apply_chat_template


SERVER_PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Once upon a time,"]
SERVER_MAX_TOKENS = 8
SERVER_MAX_NUM_SEQS, SERVER_MAX_WAITING = 4, 4


@pytest.fixture(scope="package")
def server():
    """A real uvicorn server on a free loopback port (models "default" and "smollm2", max_model_len 512), with
    greedy references of SERVER_PROMPTS from LLM.generate on the same engine and a chat that leaves 5 tokens."""
    llm = LLM("default", dtype="float32", max_model_len=512, max_num_seqs=SERVER_MAX_NUM_SEQS)
    # The reference: LLM.generate on the same engine, one prompt at a time, before the server owns it.
    refs = [llm.generate([p], SamplingParams(temperature=0, max_tokens=SERVER_MAX_TOKENS), use_tqdm=False)[0]
            for p in SERVER_PROMPTS]
    # A chat whose templated prompt leaves exactly 5 tokens of context (for max_tokens=null).
    words = 400
    while len(apply_chat_template(llm.tokenizer, [{"role": "user", "content": "hi " * words}])) < 512 - 5:
        words += 1
    long_chat = [{"role": "user", "content": "hi " * (words - 1)}]
    room = 512 - len(apply_chat_template(llm.tokenizer, long_chat))
    app = build_app(llm.engine, ["default", "smollm2"], max_waiting=SERVER_MAX_WAITING)
    with ServerThread(app) as url:
        yield {"url": url, "refs": {p: r.outputs[0].text for p, r in zip(SERVER_PROMPTS, refs)},
               "prompt_ids": {p: r.prompt_token_ids for p, r in zip(SERVER_PROMPTS, refs)},
               "long_chat": (long_chat, room)}


@pytest.fixture(scope="package")
def client(server) -> openai.OpenAI:
    """The official openai client on `server`."""
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
