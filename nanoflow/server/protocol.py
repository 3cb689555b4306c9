"""OpenAI request/response shapes (completions + chat) with validation, and the OpenAI error body.

Pydantic runs in strict mode (no "5" -> 5, no true -> 1, no NaN/inf) so wrong types are rejected, not guessed.
Ranges follow vLLM and SGLang (their OpenAI request classes and SamplingParams checks). Cross-field and
model-dependent checks (context length, vocabulary) live in serving.py because they need the engine's numbers.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanoflow.engine.structured_output import StructuredOutputsParams

INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20  # like vLLM's --max-logprobs default
MAX_N = 64

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class APIError(Exception):
    """An error answered with an OpenAI body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# vLLM / OpenAI request fields this server does not implement, with the values that ask for nothing (the
# defaults): any other value is refused with a 400 naming the field rather than silently ignored. A field a
# request model declares is never refused here.
DECLINED_FIELDS: dict[str, tuple] = {
    "use_beam_search": (False,), "length_penalty": (1.0,), "early_stopping": (False,), "best_of": (1,),
    "return_token_ids": (False,), "return_tokens_as_token_ids": (False,), "prompt_logprobs": (),
    "allowed_token_ids": (), "bad_words": ([],), "truncate_prompt_tokens": (), "logits_processors": (),
    "priority": (0,), "spaces_between_special_tokens": (True,), "kv_transfer_params": (), "vllm_xargs": (),
    "mm_processor_kwargs": (), "tool_choice": ("none",), "parallel_tool_calls": (), "functions": (),
    "function_call": ("none",), "echo": (False,), "continue_final_message": (False,),
    "add_generation_prompt": (True,), "chat_template": (), "chat_template_kwargs": ({},), "documents": (),
    "audio": (), "modalities": (["text"],), "prediction": (), "suffix": ("",),
    "guided_decoding_backend": (), "guided_whitespace_pattern": (),
}


class _Strict(BaseModel):
    # Unknown fields are accepted and ignored, like vLLM (clients send extras such as `user: null`), except the
    # DECLINED_FIELDS set to something that asks for behaviour.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = True  # vLLM: True when the object is sent
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    """Fields both endpoints share (OpenAI standard + vLLM's sampling extras)."""
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=1024)
    # Structured output (xgrammar): OpenAI's response_format, vLLM's structured_outputs and its older guided_*.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # OpenAI fields we do not implement: accepted only when unset, so nothing is silently ignored.
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_declined(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, harmless in DECLINED_FIELDS.items():
                if name in data and name not in cls.model_fields and data[name] not in (None, *harmless):
                    raise ValueError(f"{name} is not supported by this server (param: {name})")
        return data

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`. (param: stream_options)")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be at most 16 non-empty strings (param: stop)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens (param: min_tokens)")
        if self.tools:
            raise ValueError("tools is not supported by this server (param: tools)")
        return self

    def structured_spec(self) -> StructuredOutputsParams | None:
        """The structured-output spec, validated (ValueError naming the field: a 400)."""
        extra = {k: getattr(self, k) for k in ("structured_outputs", "guided_json", "guided_regex",
                                               "guided_choice", "guided_grammar")}
        return StructuredOutputsParams.from_openai(self.response_format, extra)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM: only together with include_usage)."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingFields):
    prompt: (Annotated[str, Field(max_length=1_000_000)] | list[str] | list[TokenId] | list[list[TokenId]])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @model_validator(mode="after")
    def _check_prompt(self):
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise ValueError("prompt must not be empty (param: prompt)")
        if len(p) * self.n > MAX_N:
            raise ValueError(f"{len(p)} prompts x n={self.n} exceeds {MAX_N} choices per request (param: n)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server (param: suffix)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true (param: top_logprobs)")
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses (plain dicts are enough for the wire; helpers keep the shapes in one place) ----
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(o) -> str | None:
    """OpenAI knows stop and length; an aborted choice (seen only if the client is still there) reads as stop."""
    return None if o.finish_reason is None else ("stop" if o.finish_reason == "abort" else o.finish_reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: Literal["text_completion", "chat.completion", "chat.completion.chunk"], rid: str,
             model: str, choices: list[dict], created: int | None = None, **extra) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model,
            "choices": choices, **extra}
