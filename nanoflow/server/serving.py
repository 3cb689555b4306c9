"""OpenAI request -> engine requests -> OpenAI response (plain JSON or SSE stream).

Model-dependent validation happens here, before anything reaches the engine, so bad input is answered 400
with the offending `param` and never touches engine state.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from nanoflow.engine import logits_process
from nanoflow.engine.scheduler import RequestTooLong, check_request_fits
from nanoflow.outputs import CompletionOutput, RequestOutput
from nanoflow.sampling_params import SamplingParams
from nanoflow.server.async_engine import AsyncEngine, EngineDead, RequestHandle
from nanoflow.server.logprobs import LogprobFormatter
from nanoflow.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, envelope,
                                      error_body, finish_reason, new_id, usage)
from nanoflow.server.streaming import StreamState
from nanoflow.tokenizer import apply_chat_template

COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM: completions default 16, chat fills the context


@dataclass
class Job:
    """One OpenAI request, prepared: a prompt (text, ids) per engine request and shared params."""
    kind: str  # "completion" | "chat"
    rid: str
    model: str
    prompts: list[tuple[str | None, list[int]]]
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    echo: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats

    @property
    def n(self) -> int:
        return self.params[0].n


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str]) -> None:
        self.engine = engine
        self.names = served_model_names
        core = engine.engine
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.vocab_size = core.model_config.vocab_size
        sc = core.scheduler.config
        self.block_size, self.num_blocks = sc.block_size, sc.num_blocks
        self.fmt = LogprobFormatter(self.tokenizer)

    # ---- entry points ----
    async def completions(self, req: CompletionRequest, raw: Request):
        return await self._run(self.prepare_completion(req), raw)

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        return await self._run(self.prepare_chat(req), raw)

    # ---- preparation and validation (also run-batch's: nanoflow/batch/run_batch.py) ----
    def prepare_completion(self, req: CompletionRequest) -> Job:
        """Validate against the model and encode; raises APIError."""
        self._check_model(req.model)
        prompts = [self._encode(p) for p in req.prompts]
        params = [self._params(req, ids, "prompt", req.logprobs, COMPLETION_DEFAULT_MAX_TOKENS)
                  for _, ids in prompts]
        return Job("completion", new_id("cmpl"), req.model or self.names[0], prompts, params, req.stream,
                   req.include_usage, req.echo, req.continuous_usage)

    def prepare_chat(self, req: ChatCompletionRequest) -> Job:
        self._check_model(req.model)
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer or chat template; use /v1/completions with token ids",
                           "messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
        try:
            ids = apply_chat_template(self.tokenizer, msgs)
        except Exception as e:  # jinja errors (e.g. roles the template refuses) are the caller's input
            raise APIError(f"the chat template rejected the messages: {e}", "messages") from None
        params = [self._params(req, ids, "messages", req.num_logprobs, None)]
        return Job("chat", new_id("chatcmpl"), req.model or self.names[0], [(None, ids)], params, req.stream,
                   req.include_usage, continuous_usage=req.continuous_usage)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            raise APIError(f"The model `{model}` does not exist. Available: {', '.join(self.names)}", "model",
                           404, "NotFoundError")

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as token ids", "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            if not ids:
                raise APIError("prompt must not be empty (it encodes to no tokens)", "prompt")
            return prompt, ids
        try:
            logits_process.check_vocab(self.vocab_size, prompt)
        except ValueError as e:
            raise APIError(str(e), "prompt") from None
        return None, list(prompt)

    def _params(self, req, ids: list[int], prompt_param: str, logprobs: int | None,
                default_max: int | None) -> SamplingParams:
        n_in, ctx = len(ids), self.max_model_len
        max_tokens = req.max_tokens
        if max_tokens is None:  # not given: fill what is left (clamped, like vLLM)
            max_tokens = ctx - n_in if default_max is None else min(default_max, ctx - n_in)
        try:
            check_request_fits(n_in, max_tokens, ctx, self.block_size, self.num_blocks)
        except RequestTooLong as e:
            raise APIError(str(e), prompt_param if e.param == "prompt" else e.param) from None
        try:
            params = SamplingParams(
                n=req.n, temperature=_or(req.temperature, 1.0), top_p=_or(req.top_p, 1.0),
                top_k=_or(req.top_k, -1), min_p=_or(req.min_p, 0.0),
                repetition_penalty=_or(req.repetition_penalty, 1.0),
                presence_penalty=_or(req.presence_penalty, 0.0), frequency_penalty=_or(req.frequency_penalty, 0.0),
                seed=req.seed, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens),
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=_logit_bias(req.logit_bias),
                prompt_logprobs=logprobs if getattr(req, "echo", False) else None,
                structured_outputs=req.structured_spec())
            logits_process.check_vocab(self.vocab_size, params=params)
        except ValueError as e:
            raise APIError(str(e), str(e).split(" ", 1)[0]) from None
        return params

    # ---- running ----
    async def _run(self, job: Job, raw: Request):
        self.engine.reserve(len(job.prompts) * job.n)  # QueueFull -> 429 before anything is queued
        handles = [self.engine.submit(f"{job.rid}-{i}", ids, p, text, reserved=p.n)
                   for i, ((text, ids), p) in enumerate(zip(job.prompts, job.params))]
        if job.stream:
            return _AbortingStream(self._stream(job, handles), handles)
        try:
            finals = await _until_disconnect(raw, self._collect(handles))
        finally:
            for h in handles:
                h.abort()
        if finals is None:  # the client left; its requests were aborted above
            return JSONResponse(error_body("client disconnected", "ClientClosedRequest", None, 499), 499)
        return JSONResponse(self.full_response(job, finals))

    async def _collect(self, handles: list[RequestHandle]) -> list[RequestOutput]:
        last: list[RequestOutput | None] = [None] * len(handles)
        async for i, out in _merge(handles):
            last[i] = out
        return last

    def full_response(self, job: Job, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, (out, (text, ids)) in enumerate(zip(finals, job.prompts)):
            for o in out.outputs:
                choices.append(self._choice(job, i * job.n + o.index, o, text, ids, out.prompt_logprobs))
        kind = "text_completion" if job.kind == "completion" else "chat.completion"
        return envelope(kind, job.rid, job.model, choices, usage=self._usage(job, finals))

    def _choice(self, job: Job, index: int, o: CompletionOutput, text: str | None, ids: list[int],
                prompt_lps: list | None = None) -> dict:
        if job.kind == "chat":
            lp = None if o.logprobs is None else {"content": self.fmt.chat(o.logprobs)}
            return {"index": index, "message": {"role": "assistant", "content": o.text}, "logprobs": lp,
                    "finish_reason": finish_reason(o), "stop_reason": o.stop_reason}
        prefix = self._prompt_text(text, ids) if job.echo else ""
        if job.echo and prompt_lps is not None:  # echo + logprobs: the prompt's tokens first (vLLM)
            lp = self.fmt.echo(ids, prompt_lps, o.logprobs or [])
        else:
            lp = None if o.logprobs is None else self.fmt.completion(o.logprobs, len(prefix))
        return {"index": index, "text": prefix + o.text, "logprobs": lp, "finish_reason": finish_reason(o),
                "stop_reason": o.stop_reason}

    def _prompt_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _usage(self, job: Job, finals: list[RequestOutput]) -> dict:
        out = sum(len(o.token_ids) for r in finals if r is not None for o in r.outputs)
        return usage(sum(len(ids) for _, ids in job.prompts), out)

    async def _stream(self, job: Job, handles: list[RequestHandle]) -> AsyncIterator[str]:
        state = StreamState(self, job)
        try:
            for chunk in state.start():
                yield _sse(chunk)
            async for i, out in _merge(handles):
                for chunk in state.update(i, out):
                    yield _sse(chunk)
            if job.include_usage:
                yield _sse(state.usage_chunk())
        except Exception as e:  # rejected (400), shutting down / dead (503) or failed (500): an error chunk, DONE
            code, kind = (400, "BadRequestError") if isinstance(e, ValueError) else \
                (503, "ServiceUnavailable") if isinstance(e, EngineDead) else (500, "InternalServerError")
            yield _sse(error_body(str(e), kind, None, code))
        finally:  # also on disconnect (the response task is cancelled): free the KV at once
            for h in handles:
                h.abort()
        yield "data: [DONE]\n\n"


class _AbortingStream(StreamingResponse):
    """SSE response that aborts its engine requests however it ends, even if the client left before the
    body generator ever ran (then the generator's own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[str], handles: list[RequestHandle]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self._handles:
                h.abort()


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise ValueError("logit_bias keys must be token ids (integers as strings)") from None


def _or(value, default):
    return default if value is None else value


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merge(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they come, tagged with their position."""
    if len(handles) == 1:
        async for out in handles[0].outputs():
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for out in h.outputs():
                q.put_nowait((i, out))
        except Exception as e:
            q.put_nowait((i, e))
        q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnect(raw: Request, coro):
    """Run `coro`, or return None as soon as the client disconnects (vLLM's `with_cancellation`)."""
    async def listen() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass
    work, gone = asyncio.ensure_future(coro), asyncio.ensure_future(listen())
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    return work.result() if work in done else None
