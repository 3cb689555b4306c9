"""What a request may ask for: one rule each for context length / KV fit and for token ids in the vocabulary,
shared by the engine (ValueError) and the server (a 400 naming `param`). No model: the server side runs on a
stand-in engine, since validation reads only its sizes."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from nanoflow.engine import logits_process
from nanoflow.engine.request import Request
from nanoflow.engine.scheduler import RequestTooLong, Scheduler, SchedulerConfig, check_request_fits
from nanoflow.sampling_params import SamplingParams
from nanoflow.server.protocol import APIError, CompletionRequest
from nanoflow.server.serving import OpenAIServing

CTX, BLOCK_SIZE, NUM_BLOCKS, VOCAB = 100, 16, 4, 1000  # the pool holds 64 tokens, less than the context


def _serving() -> OpenAIServing:
    core = SimpleNamespace(tokenizer=None, max_model_len=CTX, model_config=SimpleNamespace(vocab_size=VOCAB),
                           scheduler=SimpleNamespace(config=SchedulerConfig(max_model_len=CTX, block_size=BLOCK_SIZE,
                                                                            num_blocks=NUM_BLOCKS)))
    return OpenAIServing(SimpleNamespace(engine=core), ["m"])


def _api_error(**body) -> APIError:
    with pytest.raises(APIError) as e:
        _serving().prepare_completion(CompletionRequest(**body))
    return e.value


# ---- context length / KV fit ----
@pytest.mark.parametrize("n_in,max_tokens,param,words", [
    (CTX, 1, "prompt", "your prompt has 100 tokens; please shorten it"),
    (90, 20, "max_tokens", "your request has 90 input tokens plus 20 'max_tokens' (110 in total)"),
    (60, 20, "max_tokens", "the request needs 80 tokens of KV cache but the pool holds only 64"),
])
def test_fit_rule_names_the_field(n_in, max_tokens, param, words):
    with pytest.raises(RequestTooLong, match=re.escape(words)) as e:
        check_request_fits(n_in, max_tokens, CTX, BLOCK_SIZE, NUM_BLOCKS)
    assert e.value.param == param and isinstance(e.value, ValueError)
    # The scheduler applies the same rule to a Request, the server maps it to its 400.
    with pytest.raises(RequestTooLong, match=re.escape(words)):
        Scheduler(SchedulerConfig(max_model_len=CTX, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)).check_fits(
            Request([1] * n_in, SamplingParams(max_tokens=max_tokens)))
    err = _api_error(prompt=[1] * n_in, max_tokens=max_tokens)
    assert err.param == param and words in err.message and err.status == 400


def test_fit_rule_accepts_what_fits():
    check_request_fits(CTX - 1, 1, CTX, BLOCK_SIZE, CTX)  # the last context slot, a pool as big as the context
    check_request_fits(48, 16, CTX, BLOCK_SIZE, NUM_BLOCKS)  # exactly the pool


def test_server_fills_the_context_when_max_tokens_is_absent():
    job = _serving().prepare_completion(CompletionRequest(prompt=[1] * 40))
    assert job.params[0].max_tokens == 16  # completions default, within the room left
    err = _api_error(prompt=[1] * CTX)
    assert err.param == "prompt" and "maximum context length is 100 tokens" in err.message


# ---- token ids in the vocabulary ----
@pytest.mark.parametrize("ids,params,field", [
    ([1, VOCAB], None, "prompt"),
    ([-1], None, "prompt"),
    ([1], SamplingParams(stop_token_ids=[VOCAB + 5]), "stop_token_ids"),
    ([1], SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
])
def test_vocab_rule_names_the_field(ids, params, field):
    with pytest.raises(ValueError, match=rf"^{field} token id -?\d+ is outside the vocabulary \[0, {VOCAB}\)$"):
        logits_process.check_vocab(VOCAB, ids, params)


def test_vocab_rule_accepts_the_edges():
    logits_process.check_vocab(VOCAB, [0, VOCAB - 1], SamplingParams(stop_token_ids=[VOCAB - 1],
                                                                      logit_bias={0: -1.0}))


@pytest.mark.parametrize("body,param", [
    ({"prompt": [1, VOCAB]}, "prompt"),
    ({"prompt": [1], "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": [1], "logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
])
def test_server_answers_vocab_errors_with_their_param(body, param):
    err = _api_error(**body)
    assert err.param == param and err.message == f"{param} token id {VOCAB} is outside the vocabulary [0, {VOCAB})"
