"""Server-sent-event chunks from cumulative engine outputs: one delta per choice, stop strings held back."""
from __future__ import annotations

import time

from nanoflow.outputs import RequestOutput
from nanoflow.server.protocol import envelope, finish_reason, usage


class StreamState:
    def __init__(self, serving, job) -> None:
        self.s, self.job = serving, job
        self.created = int(time.time())
        self.kind = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
        n = len(job.prompts) * job.n
        self.sent_text = [0] * n  # characters of each choice's text already sent
        self.sent_tokens = [0] * n
        self.done = [False] * n
        self.text_offset = [0] * n
        self.echoed = [False] * n  # echo + logprobs: the prompt went out with the first delta
        # A stop string may be half-generated: hold back that many characters until it is decided.
        self.holdback = max((len(s) - 1 for p in job.params for s in p.stop_strings), default=0)

    def _chunk(self, choices: list[dict], **extra) -> dict:
        return envelope(self.kind, self.job.rid, self.job.model, choices, self.created, **extra)

    def start(self) -> list[dict]:
        """Chat: the assistant role first. Completions with echo: the prompt text first."""
        out = []
        for p, (text, ids) in enumerate(self.job.prompts):
            for j in range(self.job.n):
                idx = p * self.job.n + j
                if self.job.kind == "chat":
                    out.append(self._usage(p, idx, self._chunk([{
                        "index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}])))
                elif self.job.echo and self.job.params[p].prompt_logprobs is None:  # else: with the first delta
                    prefix = self.s._prompt_text(text, ids)
                    self.text_offset[idx] = len(prefix)
                    out.append(self._chunk([{"index": idx, "text": prefix, "logprobs": None,
                                             "finish_reason": None}]))
        return out

    def update(self, p: int, out: RequestOutput) -> list[dict]:
        chunks = []
        for o in out.outputs:
            idx = p * self.job.n + o.index
            if self.done[idx]:
                continue
            finished = o.finish_reason is not None
            end = len(o.text) if finished else max(self.sent_text[idx], len(o.text) - self.holdback)
            delta = o.text[self.sent_text[idx]:end]
            new_lp = (o.logprobs or [])[self.sent_tokens[idx]:]
            if not (delta or len(o.token_ids) > self.sent_tokens[idx] or finished):
                continue  # one chunk per step with new tokens, even if their text is still held back
            self.sent_text[idx], self.sent_tokens[idx] = end, len(o.token_ids)
            self.done[idx] = finished
            choice = self._choice(idx, delta, new_lp if o.logprobs is not None else None, o)
            if self.job.echo and out.prompt_logprobs is not None and not self.echoed[idx]:
                self._echo_into(choice, p, idx, out.prompt_logprobs, new_lp)
            chunks.append(self._usage(p, idx, self._chunk([choice])))
        return chunks

    def _echo_into(self, choice: dict, p: int, idx: int, prompt_lps: list, new_lp: list) -> None:
        """echo + logprobs: the prompt's text and logprobs lead the first delta (vLLM)."""
        text, ids = self.job.prompts[p]
        choice["text"] = self.s._prompt_text(text, ids) + choice["text"]
        lp = choice["logprobs"] = self.s.fmt.echo(ids, prompt_lps, new_lp)
        self.text_offset[idx] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        self.echoed[idx] = True

    def _usage(self, p: int, idx: int, chunk: dict) -> dict:
        """stream_options.continuous_usage_stats: this choice's usage so far on each of its chunks (vLLM)."""
        if self.job.continuous_usage:
            chunk["usage"] = usage(len(self.job.prompts[p][1]), self.sent_tokens[idx])
        return chunk

    def _choice(self, idx: int, delta: str, lps: list | None, o) -> dict:
        finish = finish_reason(o)
        extra = {"finish_reason": finish, "stop_reason": o.stop_reason if finish else None}
        if self.job.kind == "chat":
            lp = None if lps is None else {"content": self.s.fmt.chat(lps)}
            return {"index": idx, "delta": {"content": delta}, "logprobs": lp, **extra}
        lp = None
        if lps is not None:
            lp = self.s.fmt.completion(lps, self.text_offset[idx])
            self.text_offset[idx] += sum(len(t) for t in lp["tokens"])
        return {"index": idx, "text": delta, "logprobs": lp, **extra}

    def usage_chunk(self) -> dict:
        prompt = sum(len(ids) for _, ids in self.job.prompts)
        return self._chunk([], usage=usage(prompt, sum(self.sent_tokens)))
