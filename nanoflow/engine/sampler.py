"""Token sampling on the logits of the rows that sample: penalties, temperature, top-k/top-p/min-p,
per-request seeded generators (a request's draws never depend on its batch-mates), logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.engine.request import Request
from nanoflow.kernels import cpu_ext


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict | None]  # per row: {"logprob", "top": [(id, logprob), ...]} or None


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._shared = torch.Generator().manual_seed(seed)

    def generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self._shared
        g = self._generators.get(req.request_id)
        if g is None:
            g = self._generators[req.request_id] = torch.Generator().manual_seed(req.params.seed)
        return g

    def release(self, req: Request) -> None:
        self._generators.pop(req.request_id, None)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        if all(r.params.greedy and r.params.logprobs is None and not r.params.needs_penalties for r in reqs):
            return SampleResult(_argmax(logits).tolist(), [None] * len(reqs))  # the throughput-job path
        logits = logits.float()
        want_lp = [r.params.logprobs is not None for r in reqs]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        greedy = [r.params.greedy for r in reqs]
        tokens = logits.argmax(dim=-1)
        if not all(greedy) or any(r.params.needs_penalties for r in reqs):
            self._apply_penalties(logits, reqs)
            tokens = logits.argmax(dim=-1)
            rows = [i for i, g in enumerate(greedy) if not g]
            if rows:
                tokens[rows] = self._sample_rows(logits[rows], [reqs[i] for i in rows])
        token_list = tokens.tolist()
        lps = [self._logprobs(raw_lp[i], token_list[i], reqs[i].params.logprobs) if want_lp[i] else None
               for i in range(len(reqs))]
        return SampleResult(token_list, lps)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
        for i, r in enumerate(reqs):
            p = r.params
            if not p.needs_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:  # HF/vLLM rule over prompt and output tokens
                seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if r.output_token_ids and (p.presence_penalty or p.frequency_penalty):  # OpenAI rule, output only
                counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=row.numel()).float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in reqs]).unsqueeze(1)
        probs = torch.softmax(logits / temps, dim=-1)
        probs = _filter(probs, reqs)
        # Exponential race (Gumbel-max in probability space): one draw per row from its own generator.
        noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=self.generator(r)) for r in reqs])
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(lp: torch.Tensor, token: int, k: int) -> dict:
        top = []
        if k:
            vals, ids = lp.topk(k)
            top = list(zip(ids.tolist(), vals.tolist()))
        return {"token_id": token, "logprob": lp[token].item(), "top": top}


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens straight from the raw (e.g. bf16) logits: the float32 copy and torch's argmax
    each cost as much as the LM head on a CPU. Same result and tie rule (first maximum)."""
    ext = cpu_ext.get() if logits.device.type == "cpu" else None
    return ext.argmax_rows(logits) if ext is not None else logits.argmax(dim=-1)


def _filter(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Zero out tokens removed by top-k, top-p and min-p (per row), then renormalize."""
    top_k = [r.params.top_k if r.params.top_k > 0 else probs.shape[1] for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    min_p = [r.params.min_p for r in reqs]
    if all(k == probs.shape[1] for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1]).unsqueeze(0)
    drop = rank >= torch.tensor(top_k).unsqueeze(1)
    cum = sorted_p.cumsum(dim=-1)
    drop |= (cum - sorted_p) >= torch.tensor(top_p).unsqueeze(1)  # keep the smallest set reaching top_p
    drop |= sorted_p < torch.tensor(min_p).unsqueeze(1) * sorted_p[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)
