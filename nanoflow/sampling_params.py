"""Per-request generation settings, shaped like vLLM's SamplingParams."""
from __future__ import annotations

from dataclasses import dataclass, field

from nanoflow.engine.structured_output import StructuredOutputsParams


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: chosen token plus top-k
    # vLLM's prompt_logprobs: None off; k: each prompt token's logprob plus the top-k (the first token's is None).
    # A request asking for them skips the prefix cache (a cached prefix has no logits to read).
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's RequestOutputKind: "cumulative" (an output every step, e.g. for streaming) or "final_only" (only the
    # finished request: what LLM.generate asks for, so a step's cost does not grow with the outputs' length)
    output_kind: str = "cumulative"
    # vLLM's structured outputs (JSON schema / json_object / regex / choice / EBNF grammar), via xgrammar
    structured_outputs: StructuredOutputsParams | None = None
    _stop: list[str] = field(default_factory=list, init=False, repr=False)
    _grammar: object = field(default=None, init=False, repr=False)  # compiled by the engine (xgrammar)
    # EOS ids, set by the engine (vLLM's _all_stop_token_ids): banned with stop_token_ids until min_tokens
    _eos_ids: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_logits_processing(self) -> bool:
        """logit_bias or a min_tokens ban change the logits before sampling (logits_process.py)."""
        return bool(self.logit_bias) or self.min_tokens > 0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self) -> None:
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1 (off) or non-negative"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be positive"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "must be in [0, 20]"),
            (all(-100.0 <= v <= 100.0 for v in (self.logit_bias or {}).values()), "logit_bias",
             "values must be in [-100, 100]"),
            (all(isinstance(s, str) and s for s in self._stop), "stop", "must be non-empty strings"),
            (self.output_kind in ("cumulative", "final_only"), "output_kind", "must be cumulative or final_only"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}")
