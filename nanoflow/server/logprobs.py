"""Engine logprobs ({"token_id", "logprob", "top": [(id, logprob)]}) in OpenAI's two shapes."""
from __future__ import annotations

import functools


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token = functools.lru_cache(maxsize=65536)(self._token)

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def completion(self, entries: list[dict], offset: int = 0) -> dict:
        """/v1/completions: parallel lists; top_logprobs maps token text -> logprob (chosen token included)."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            tok = self.token(e["token_id"])
            tokens.append(tok)
            lps.append(_finite(e["logprob"]))
            top = {self.token(i): _finite(lp) for i, lp in e["top"]}
            top.setdefault(tok, _finite(e["logprob"]))
            tops.append(top)
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def echo(self, prompt_ids: list[int], prompt_lps: list[dict | None], entries: list[dict]) -> dict:
        """echo + logprobs: the prompt's tokens first (the first one's logprob and top are null, as in vLLM),
        then the output's; offsets run over the tokens' texts from 0."""
        first = self.token(prompt_ids[0])
        rest = self.completion([*prompt_lps[1:], *entries], len(first))
        return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}

    def chat(self, entries: list[dict]) -> list[dict]:
        """/v1/chat/completions: logprobs.content = [{token, logprob, bytes, top_logprobs}]."""
        return [{**self._entry(e["token_id"], e["logprob"]),
                 "top_logprobs": [self._entry(i, lp) for i, lp in e["top"]]} for e in entries]

    def _entry(self, token_id: int, logprob: float) -> dict:
        tok = self.token(token_id)
        return {"token": tok, "logprob": _finite(logprob), "bytes": list(tok.encode("utf-8"))}


def _finite(lp: float) -> float:
    """JSON has no -inf; OpenAI uses -9999.0 for "impossible"."""
    return lp if lp > -9999.0 else -9999.0
