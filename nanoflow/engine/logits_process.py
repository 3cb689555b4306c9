"""Logit changes before sampling that vLLM applies as built-in logits processors: OpenAI's `logit_bias` and the
`min_tokens` ban (EOS and stop_token_ids cannot be sampled before min_tokens tokens)."""
from __future__ import annotations

from typing import Sequence

import torch

from nanoflow.sampling_params import SamplingParams


def check_vocab(vocab_size: int, prompt_token_ids: Sequence[int] = (), params: SamplingParams | None = None) -> None:
    """Every token id a request names (its prompt, stop_token_ids, logit_bias keys) must exist; the ValueError
    begins with the field's name (the server's 400 `param`)."""
    named = [("prompt", prompt_token_ids)]
    if params is not None:
        named += [("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or ()))]
    for name, ids in named:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def banned_ids(params: SamplingParams, num_output: int) -> list[int]:
    """What may not be sampled as output token number `num_output` (0-based)."""
    if num_output >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(params._eos_ids))


def apply(logits: torch.Tensor, rows: list) -> None:
    """In place on the float logits of the sampling rows (SampleRow: params, num_output)."""
    for i, r in enumerate(rows):
        p = r.params
        if not p.needs_logits_processing:
            continue
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype,
                                                      device=logits.device))
        ban = banned_ids(p, r.num_output)
        if ban:
            logits[i, torch.tensor(ban, dtype=torch.long, device=logits.device)] = float("-inf")
