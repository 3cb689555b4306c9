"""What generation returns, shaped like vLLM's RequestOutput / CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, logprob)]}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_preemptions: int = 0
    # SamplingParams.prompt_logprobs: per prompt token, None for the first, then an entry shaped like
    # CompletionOutput.logprobs' ({"token_id", "logprob", "top"}); None when not asked for
    prompt_logprobs: list[dict | None] | None = None
