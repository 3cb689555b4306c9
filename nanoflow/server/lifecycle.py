"""Startup and shutdown that keep their promises.

- warm_up: one tiny request through a whole step before the server listens, so the C++ kernels are built and
  loaded and /health's first 200 means the engine answers at once.
- GracefulServer: on SIGTERM/SIGINT uvicorn stops accepting; requests in flight may finish for
  `shutdown_timeout` seconds, then the rest end with an OpenAI error (503 body, or an SSE error event and
  [DONE]) instead of uvicorn cancelling them mid-body.
- BodyLimit: a request body over `max_bytes` gets 413 with an OpenAI error body, before anything parses it.
"""
from __future__ import annotations

import asyncio
import logging

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from nanoflow.sampling_params import SamplingParams
from nanoflow.server.protocol import error_body

log = logging.getLogger("nanoflow.server")
DEFAULT_MAX_BODY_BYTES = 16 << 20  # 64 prompts of 1M characters do not fit; any sane request does
_ERROR_MARGIN_S = 5.0  # after the deadline: time for the error bodies to go out before uvicorn cancels


def warm_up(engine) -> None:
    """Run one two-token greedy request to completion (prefill + decode paths)."""
    if engine.has_unfinished_requests():  # someone else's requests: their outputs would be lost here
        return
    token = engine.model_config.bos_token_id or 0
    engine.add_request("__nanoflow_warmup__", [token], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose shutdown drains `app`'s engine (see the module doc)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        if shutdown_timeout < 0:
            raise ValueError("--shutdown-timeout must be non-negative")
        config.timeout_graceful_shutdown = int(shutdown_timeout + _ERROR_MARGIN_S + 1)
        super().__init__(config)
        self.async_engine, self.shutdown_timeout = app.state.async_engine, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        self.async_engine.drain()  # a request on a kept-alive connection now gets 503
        log.info("shutting down: in-flight requests have %.0f s to finish", self.shutdown_timeout)
        deadline = asyncio.get_running_loop().call_later(
            self.shutdown_timeout, self.async_engine.end_all,
            f"the server is shutting down (the {self.shutdown_timeout:g} s grace period ended)")
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (declared by Content-Length or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        messages, size = [], 0
        while True:  # read the body up front (FastAPI would anyway), counting
            msg = await receive()
            messages.append(msg)
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()  # then disconnects, as usual
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        body = error_body(f"the request body exceeds {self.max_bytes} bytes (--max-request-body-bytes)",
                          "RequestEntityTooLarge", None, 413)
        await JSONResponse(body, 413, headers={"connection": "close"})(scope, receive, send)
