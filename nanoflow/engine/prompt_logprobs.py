"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's echo + logprobs) from the prefill the engine runs anyway.

The hidden state at prompt position p predicts prompt token p + 1, so a prefill chunk of a request that wants
them sends those rows to the LM head too. Each target token is planned once (`Request.num_prompt_lp_planned`,
advanced when a step is prepared): chunked prefill splits the rows over steps, a recompute after preemption does
not repeat them, and async scheduling only moves when the engine reads them back. A cached prefix has no hidden
states, so such requests skip the prefix cache (BlockManager.max_reusable_blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROWS_PER_SLICE = 256  # bounds the float32 [rows, vocab] logits held at once


@dataclass
class PromptLogprobRows:
    """The rows of one step whose logits give prompt logprobs, and (after the step ran) the entries."""
    rows: list[int] = field(default_factory=list)  # rows of the step's hidden states
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts
    ks: list[int] = field(default_factory=list)  # top-k per row
    owners: list[tuple[object, int]] = field(default_factory=list)  # (Request, number of rows), in row order
    entries: list[list[dict]] | None = None  # per owner, set by compute() on the device side

    def add(self, req, start: int, num_tokens: int, first_row: int) -> None:
        """Plan the targets of one chunk (positions start .. start + num_tokens - 1 at rows first_row ..)."""
        lo = max(start + 1, req.num_prompt_lp_planned + 1)  # target token index; the first token has none
        hi = min(start + num_tokens, req.num_prompt_tokens - 1)
        if lo > hi:
            return
        for t in range(lo, hi + 1):
            self.rows.append(first_row + t - 1 - start)
            self.targets.append(req.prompt_token_ids[t])
            self.ks.append(req.params.prompt_logprobs)
        self.owners.append((req, hi - lo + 1))
        req.num_prompt_lp_planned = hi

    def __bool__(self) -> bool:
        return bool(self.rows)

    @torch.inference_mode()
    def compute(self, model, hidden: torch.Tensor) -> None:
        """LM head + log-softmax on the planned rows (float32), chosen token and top-k per row."""
        out = []
        for i in range(0, len(self.rows), ROWS_PER_SLICE):
            rows = torch.tensor(self.rows[i:i + ROWS_PER_SLICE], dtype=torch.long, device=hidden.device)
            logits = model.compute_logits(hidden[rows])
            if logits is None:  # a tensor-parallel worker: rank 0 holds the logits (every slice is gathered)
                continue
            lp = torch.log_softmax(logits.float(), dim=-1)
            targets = self.targets[i:i + ROWS_PER_SLICE]
            chosen = lp.gather(1, torch.tensor(targets, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
            ks = self.ks[i:i + ROWS_PER_SLICE]
            vals, ids = lp.topk(max(ks), dim=-1) if max(ks) else (lp[:, :0], lp[:, :0].long())
            vals, ids = vals.tolist(), ids.tolist()
            out += [{"token_id": t, "logprob": c, "top": list(zip(ids[j][:k], vals[j][:k]))}
                    for j, (t, c, k) in enumerate(zip(targets, chosen, ks))]
        self.entries, at = [], 0
        for _, n in self.owners:
            self.entries.append(out[at:at + n])
            at += n

    def deliver(self) -> None:
        """Engine side, after the step completed: append each request's entries (in prompt order)."""
        for (req, _), entries in zip(self.owners, self.entries or []):
            req.prompt_logprobs.extend(entries)
