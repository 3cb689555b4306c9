"""A request as the scheduler sees it: token ids, progress and KV blocks. No tensors."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from nanoflow.sampling_params import SamplingParams

_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: str(next(_ids)))
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of full blocks of known tokens
    num_cached_blocks: int = 0  # leading blocks of block_table already registered in the prefix cache
    num_preemptions: int = 0
    # Tokens sampled by launched steps that the engine has not read back yet (async scheduling: at most one).
    num_output_placeholders: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict] = field(default_factory=list)
    text: str = ""
    stop_reason: str | int | None = None
    prompt_logprobs: list[dict] = field(default_factory=list)  # for prompt tokens 1.. (prompt_logprobs.py)
    num_prompt_lp_planned: int = 0  # prompt tokens whose logprob a prepared step computes

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + (self.params.max_tokens or 0)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the newest are still missing from the KV cache."""
        return self.num_computed_tokens < self.num_tokens + self.num_output_placeholders - 1

    def token_at(self, i: int) -> int:
        p = self.num_prompt_tokens
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
