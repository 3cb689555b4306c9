"""Token sampling on the logits of the rows that sample: penalties, temperature, top-k/top-p/min-p,
per-request seeded generators (a request's draws never depend on its batch-mates), logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.engine import logits_process
from nanoflow.engine.request import Request
from nanoflow.engine.structured_output import GrammarMatchers
from nanoflow.engine.transfer import host_to_device
from nanoflow.kernels import cpu_ext
from nanoflow.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs of one request, copied when the step is prepared: in async mode the step runs
    on a worker thread while the engine mutates the Request, so the sampler never reads a Request."""
    request_id: str
    params: SamplingParams
    history: list[int] | None = None  # prompt + known output ids (only when penalties are on)
    num_prompt: int = 0
    pending_row: int = -1  # input row whose token (sampled by the previous step) is not known yet; -1: none
    num_output: int = 0  # output tokens before the one sampled now (in-flight ones included): min_tokens

    @classmethod
    def of(cls, req: Request, pending_row: int = -1) -> "SampleRow":
        p = req.params
        hist = req.all_token_ids if p.needs_penalties else None
        return cls(req.request_id, p, hist, req.num_prompt_tokens, pending_row,
                   len(req.output_token_ids) + req.num_output_placeholders)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [rows] on the device: feeds the next step's input ids in async mode
    logprobs: list[dict | None]  # per row: {"logprob", "top": [(id, logprob), ...]} or None
    host_tokens: torch.Tensor | None = None  # pinned copy in flight (CUDA), ready once `ready` fires
    ready: object = None  # a CUDA event, or None
    _ids: list[int] | None = None
    grammar_done: list[bool] | None = None  # per row: its grammar terminated with this token (structured output)

    @property
    def token_ids(self) -> list[int]:
        if self._ids is None:
            if self.ready is not None:
                self.ready.synchronize()
            self._ids = (self.host_tokens if self.host_tokens is not None else self.tokens).tolist()
        return self._ids


class Sampler:
    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        # Generators live on the logits' device, so the noise is drawn there (on a GPU, a seed gives other
        # draws than on the CPU, but still ones that do not depend on the batch).
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}
        self._shared = torch.Generator(self.device).manual_seed(seed)
        self._grammars = GrammarMatchers()  # advanced here, on the device side, so async steps see their masks

    def generator(self, row: SampleRow) -> torch.Generator:
        if row.params.seed is None:
            return self._shared
        g = self._generators.get(row.request_id)
        if g is None:
            g = self._generators[row.request_id] = torch.Generator(self.device).manual_seed(row.params.seed)
        return g

    def drop_state(self, req: Request) -> None:
        self._generators.pop(req.request_id, None)
        self._grammars.release(req.request_id)

    @staticmethod
    def plain_greedy(rows: list[SampleRow]) -> bool:
        """Every row takes the first maximum of its raw logits: no logprobs, penalties, logit processing or
        grammar (the runner may then take the tokens from a fused LM head + argmax, never forming the logits)."""
        return all(_plain_greedy(r) and r.params._grammar is None for r in rows)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], input_ids: torch.Tensor) -> SampleResult:
        """`input_ids` (the step's resolved input tokens) supplies the newest token of a row whose history
        ends in a token the engine has not read back yet (async scheduling)."""
        constrained = [i for i, r in enumerate(rows) if r.params._grammar is not None]
        if all(_plain_greedy(r) for r in rows):
            if constrained:  # only the constrained rows leave the fast path
                return self._greedy_constrained(logits, rows, constrained)
            return SampleResult(_argmax(logits), [None] * len(rows))  # the throughput-job path
        logits = logits.float()
        if constrained:  # first: logprobs and sampling see only what the grammar allows
            self._grammars.apply(logits, rows, constrained)
        want_lp = [r.params.logprobs is not None for r in rows]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None  # vLLM: before any processing
        logits_process.apply(logits, rows)  # logit_bias, min_tokens ban
        greedy = [r.params.greedy for r in rows]
        tokens = logits.argmax(dim=-1)
        if not all(greedy) or any(r.params.needs_penalties for r in rows):
            self._apply_penalties(logits, rows, input_ids)
            tokens = logits.argmax(dim=-1)
            idx = [i for i, g in enumerate(greedy) if not g]
            if idx:
                at = _to(logits.device, idx)
                tokens[at] = self._sample_random(logits[at], [rows[i] for i in idx])
        lps = [None] * len(rows)
        if any(want_lp):  # logprobs are read on the worker (a device sync on a GPU; off the hot path)
            token_list = tokens.tolist()
            lps = [self._logprobs(raw_lp[i], token_list[i], rows[i].params.logprobs) if want_lp[i] else None
                   for i in range(len(rows))]
        # Advanced in this step (a host read of the tokens), so the next step's masks are ready.
        done = self._grammars.accept(rows, constrained, tokens.tolist()) if constrained else None
        return SampleResult(tokens, lps, grammar_done=done)

    def _greedy_constrained(self, logits: torch.Tensor, rows: list[SampleRow], idx: list[int]) -> SampleResult:
        """A greedy batch with grammar rows: bf16 argmax for all rows, then the masked float32 argmax of the
        constrained ones (a float copy of the whole batch would cost more than the masks)."""
        tokens = _argmax(logits)
        at = _to(logits.device, idx)
        sub = logits[at].float()
        self._grammars.apply(sub, [rows[i] for i in idx], list(range(len(idx))))
        tokens[at] = sub.argmax(dim=-1).to(tokens.dtype)
        done = self._grammars.accept(rows, idx, tokens.tolist())
        return SampleResult(tokens, [None] * len(rows), grammar_done=done)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow], input_ids: torch.Tensor) -> None:
        for i, r in enumerate(rows):
            p = r.params
            if not p.needs_penalties:
                continue
            row = logits[i]
            hist = _to(row.device, r.history)
            if r.pending_row >= 0:  # the token sampled by the previous step, still on the device
                hist = torch.cat([hist, input_ids[r.pending_row:r.pending_row + 1].to(row.device)])
            # Masks and counts by scatter, not torch.unique / bincount: on a GPU those read their output
            # size back to the host (a sync per request). Same values.
            if p.repetition_penalty != 1.0:  # HF/vLLM rule over prompt and output tokens
                seen = torch.zeros(row.shape, dtype=torch.bool, device=row.device).index_fill_(0, hist, True)
                rp = p.repetition_penalty
                row.copy_(torch.where(seen, torch.where(row > 0, row / rp, row * rp), row))
            out = hist[r.num_prompt:]
            if out.numel() and (p.presence_penalty or p.frequency_penalty):  # OpenAI rule, output only
                counts = torch.zeros_like(row).index_add_(0, out, torch.ones(out.shape, dtype=row.dtype,
                                                                             device=row.device))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _sample_random(self, logits: torch.Tensor, reqs: list[SampleRow]) -> torch.Tensor:
        temps = _to(logits.device, [r.params.temperature for r in reqs], torch.float32).unsqueeze(1)
        probs = torch.softmax(logits / temps, dim=-1)
        probs = _filter(probs, reqs)
        # Exponential race (Gumbel-max in probability space): one draw per row from its own generator.
        noise = torch.stack([torch.empty(probs.shape[1], device=self.device).exponential_(generator=self.generator(r))
                             for r in reqs])
        return (probs / noise.to(probs.device)).argmax(dim=-1)

    @staticmethod
    def _logprobs(lp: torch.Tensor, token: int, k: int) -> dict:
        top = []
        if k:
            vals, ids = lp.topk(k)
            top = list(zip(ids.tolist(), vals.tolist()))
        return {"token_id": token, "logprob": lp[token].item(), "top": top}


def _to(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device` (not torch.tensor(..., device=cuda): that one syncs)."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def _plain_greedy(row: SampleRow) -> bool:
    p = row.params
    return p.greedy and p.logprobs is None and not p.needs_penalties and not p.needs_logits_processing


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens straight from the raw (e.g. bf16) logits: the float32 copy and torch's argmax
    each cost as much as the LM head on a CPU. Same result and tie rule (first maximum)."""
    ext = cpu_ext.get() if logits.device.type == "cpu" else None
    return ext.argmax_rows(logits) if ext is not None else logits.argmax(dim=-1)


def _filter(probs: torch.Tensor, reqs: list[SampleRow]) -> torch.Tensor:
    """Zero out tokens removed by top-k, top-p and min-p (per row), then renormalize."""
    top_k = [r.params.top_k if r.params.top_k > 0 else probs.shape[1] for r in reqs]
    top_p = [r.params.top_p for r in reqs]
    min_p = [r.params.min_p for r in reqs]
    if all(k == probs.shape[1] for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    dev = probs.device
    rank = torch.arange(probs.shape[1], device=dev).unsqueeze(0)
    drop = rank >= _to(dev, top_k).unsqueeze(1)
    cum = sorted_p.cumsum(dim=-1)
    drop |= (cum - sorted_p) >= _to(dev, top_p, torch.float32).unsqueeze(1)  # keep the smallest set reaching top_p
    drop |= sorted_p < _to(dev, min_p, torch.float32).unsqueeze(1) * sorted_p[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)
