"""FastAPI app factory, OpenAI-style error handling and the uvicorn runner behind `nanoflow serve`."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanoflow
from nanoflow.engine.engine import LLMEngine
from nanoflow.server.async_engine import AsyncEngine, EngineDead, QueueFull
from nanoflow.server.lifecycle import DEFAULT_MAX_BODY_BYTES, BodyLimit, GracefulServer, warm_up
from nanoflow.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from nanoflow.server.serving import OpenAIServing

log = logging.getLogger("nanoflow.server")
_PARAM_IN_MSG = re.compile(r"\(param: (\w+)\)")


def build_app(engine: LLMEngine, served_model_names: list[str] | None = None, max_waiting: int = 256,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An app serving `engine` (which it now owns: only its engine thread may touch it), warmed up first."""
    names = served_model_names or [_default_name(engine.config.model)]
    warm_up(engine)
    async_engine = AsyncEngine(engine, max_waiting=max_waiting)
    async_engine.metrics.num_blocks.set(engine.scheduler.block_manager.num_blocks)
    serving = OpenAIServing(async_engine, names)
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        async_engine.shutdown()

    app = FastAPI(title="nanoflow OpenAI-compatible server", version=nanoflow.__version__, lifespan=lifespan)
    app.state.async_engine, app.state.serving = async_engine, serving
    _install_error_handlers(app, async_engine)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    created = int(time.time())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await serving.chat(req, raw)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "nanoflow",
                "max_model_len": engine.max_model_len, "vocab_size": engine.model_config.vocab_size,
                "root": engine.config.model}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(n) for n in names]}

    @app.get("/v1/models/{model:path}")  # :path: names may hold slashes (org/model)
    async def model(model: str):
        serving._check_model(model)
        return card(model)

    @app.get("/health")
    async def health():
        if async_engine.dead or async_engine.draining:
            reason = async_engine.dead or "the server is shutting down"
            return JSONResponse(error_body(reason, "ServiceUnavailable", None, 503), 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": nanoflow.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(async_engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _install_error_handlers(app: FastAPI, async_engine: AsyncEngine) -> None:
    rejected = async_engine.metrics.rejected

    def answer(message: str, param: str | None, status: int, type: str) -> JSONResponse:
        rejected.labels(str(status)).inc()
        return JSONResponse(error_body(message, type, param, status), status_code=status)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return answer(e.message, e.param, e.status, e.type)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):  # 400, not FastAPI's 422 (like vLLM/SGLang)
        message, param = _describe(e.errors())
        return answer(message, param, 400, "BadRequestError")

    @app.exception_handler(QueueFull)
    async def queue_full(_, e: QueueFull):
        response = answer(str(e), None, 429, "RateLimitError")
        response.headers["Retry-After"] = "1"  # the queue drains as requests finish: a short wait is enough
        return response

    @app.exception_handler(EngineDead)
    async def engine_dead(_, e: EngineDead):
        return answer(f"the engine is not running: {e}", None, 503, "ServiceUnavailable")

    @app.exception_handler(ValueError)
    async def value_error(_, e: ValueError):  # the engine's own input checks
        return answer(str(e), None, 400, "BadRequestError")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return answer(str(e.detail), None, e.status_code, "NotFoundError" if e.status_code == 404 else "BadRequest")

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.exception("unhandled error")
        return answer(f"internal server error: {type(e).__name__}", None, 500, "InternalServerError")


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message and the offending field from pydantic's error list (one line per field)."""
    by_field: dict[str | None, list[str]] = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Union members add their type names to the location (e.g. prompt.list[int]); keep the field path.
        field = ".".join(x for x in loc if not _is_type_tag(x)) or None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        found = _PARAM_IN_MSG.search(msg)
        if found:
            field, msg = found.group(1), _PARAM_IN_MSG.sub("", msg).strip()
        if err.get("type") == "json_invalid":
            field, msg = None, f"invalid JSON body: {err.get('ctx', {}).get('error', msg)}"
        by_field.setdefault(field, []).append(msg)
    parts = []
    for field, msgs in list(by_field.items())[:5]:
        msg = msgs[0] if len(msgs) == 1 else f"matches none of the accepted types ({'; '.join(dict.fromkeys(msgs))})"
        parts.append(f"{field}: {msg}" if field else msg)
    param = next((f.split(".")[0] for f in by_field if f), None)
    return "; ".join(parts) or "invalid request", param


def _is_type_tag(x: str) -> bool:
    return x.startswith(("list[", "function-", "constrained-")) or x in ("str", "int", "float", "bool", "dict")


def _default_name(model: str) -> str:
    return model if model in ("default",) or model.startswith("dummy:") else os.path.basename(model.rstrip("/"))


# ---- running in-process ----
class ServerThread:
    """A real uvicorn server on a background thread (tests, benchmarks): `with ServerThread(app) as url:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 1.0) -> None:
        self.server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning"), app,
                                     shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
