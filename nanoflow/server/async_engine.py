"""One engine thread serving every HTTP connection.

The engine is single-threaded: only the thread below touches it. Request handlers hand
commands (AddRequest, AbortRequest, EndAll, Wake) over a thread-safe queue; the thread applies them between
steps, runs `step()`, and feeds each request's asyncio queue through `loop.call_soon_threadsafe`. Admission is
bounded: when the waiting queue is full `reserve` raises `QueueFull` (answered 429) instead of queueing without
bound.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import AsyncIterator

from nanoflow.engine.engine import LLMEngine
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams
from nanoflow.server.metrics import EngineMetrics

log = logging.getLogger("nanoflow.server")


class QueueFull(Exception):
    pass


class EngineDead(Exception):
    pass


class ShuttingDown(EngineDead):
    """The server is draining (answered 503 like a dead engine)."""


@dataclass
class _Tracked:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    prompt_len: int
    arrival: float = field(default_factory=time.perf_counter)
    last: float | None = None  # time of the last delivered token (TTFT/ITL)
    num_tokens: int = 0


@dataclass(frozen=True)
class AddRequest:
    """Add a request to the engine; `reserved` is the waiting-queue room `reserve` claimed for it."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    tracked: _Tracked
    reserved: int


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class EndAll:
    """End every request in flight with ShuttingDown(message)."""
    message: str


@dataclass(frozen=True)
class Wake:
    """Nothing to apply: wakes the engine thread from its wait for commands (so it sees a stop)."""


EngineCommand = AddRequest | AbortRequest | EndAll | Wake


class RequestHandle:
    """The caller's end of one engine request: cumulative outputs in order; `abort()` unless finished."""

    def __init__(self, engine: "AsyncEngine", request_id: str, tracked: _Tracked) -> None:
        self.engine, self.request_id, self._tracked = engine, request_id, tracked
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Raises ValueError (bad input the engine rejected) or RuntimeError (engine error)."""
        while not self.finished:
            item = await self._tracked.out.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        """Free the request's KV at once (client gone); a no-op once finished."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, metrics: EngineMetrics | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics or EngineMetrics()
        self._commands: queue.SimpleQueue[EngineCommand] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._num_pending = 0  # adds handed over but not yet in the engine (event-loop side)
        self._pending_lock = threading.Lock()
        self._num_waiting = 0  # published by the engine thread after each step
        self._preemptions_seen = 0
        self._stop = threading.Event()
        self.dead: str | None = None
        self.draining = False  # shutdown began: no new requests
        self._thread = threading.Thread(target=self._loop, name="nanoflow-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side ----
    @property
    def num_waiting(self) -> int:
        return self._num_waiting + self._num_pending

    def reserve(self, num: int = 1) -> None:
        """Claim waiting-queue room for `num` engine requests, or raise QueueFull (-> 429)."""
        if self.dead:
            raise EngineDead(self.dead)
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        with self._pending_lock:
            if self.num_waiting >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            self._num_pending += num

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               prompt: str | None = None, reserved: int = 0) -> "RequestHandle":
        """Hand a request to the engine thread (applied between steps); `reserved` returns the room
        claimed by `reserve` once the engine holds it."""
        tracked = _Tracked(asyncio.get_running_loop(), asyncio.Queue(), len(prompt_token_ids))
        self._commands.put(AddRequest(request_id, prompt_token_ids, params, prompt, tracked, reserved))
        return RequestHandle(self, request_id, tracked)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        handle = self.submit(request_id, prompt_token_ids, params, prompt)
        try:
            async for out in handle.outputs():
                yield out
        finally:
            handle.abort()

    def abort(self, request_id: str) -> None:
        self._commands.put(AbortRequest(request_id))

    def drain(self) -> None:
        self.draining = True

    def end_all(self, message: str) -> None:
        """End every request in flight with ShuttingDown (its caller answers 503 / an SSE error event)."""
        self._commands.put(EndAll(message))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(Wake())
        self._thread.join(timeout=10)

    # ---- engine thread ----
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as e:  # a bug, not bad input: fail what is in flight, keep serving
                    log.error("engine loop error:\n%s", traceback.format_exc())
                    self._fail_all(RuntimeError(f"engine error: {e}"))
        except BaseException as e:  # the thread cannot go on: say so on /health and to every caller
            self.dead = f"engine thread stopped: {e!r}"
            self._fail_all(EngineDead(self.dead))
            raise

    def _iteration(self) -> None:
        busy = self.engine.has_unfinished_requests()
        self._apply_commands(block=not busy)
        if not self.engine.has_unfinished_requests():
            self._publish()
            return
        outputs = self.engine.step()
        now = time.perf_counter()
        for out in outputs:
            self._deliver(out, now)
        self._publish()

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: EngineCommand) -> None:
        match cmd:
            case AddRequest():
                self._add(cmd)
            case AbortRequest(request_id=rid):
                if self._tracked.pop(rid, None) is not None:
                    self.engine.abort_request(rid)
                    self.metrics.aborted.inc()
            case EndAll(message=message):
                self._fail_all(ShuttingDown(message))
            case Wake():
                pass

    def _add(self, cmd: AddRequest) -> None:
        with self._pending_lock:
            self._num_pending -= cmd.reserved
        tracked = cmd.tracked
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.prompt)
        except Exception as e:  # ValueError: bad input; anything else must not kill the thread
            tracked.loop.call_soon_threadsafe(tracked.out.put_nowait, e)
            return
        self._tracked[cmd.request_id] = tracked
        self.metrics.prompt_tokens.inc(len(cmd.prompt_token_ids))

    def _deliver(self, out: RequestOutput, now: float) -> None:
        t = self._tracked.get(out.request_id)
        if t is None:
            return
        n = sum(len(o.token_ids) for o in out.outputs)
        if n > t.num_tokens:
            self.metrics.generation_tokens.inc(n - t.num_tokens)
            if t.last is None:
                self.metrics.ttft.observe(now - t.arrival)
            else:
                self.metrics.itl.observe(now - t.last)
            t.last, t.num_tokens = now, n
        if out.finished:
            del self._tracked[out.request_id]
            self.metrics.e2e.observe(now - t.arrival)
            self.metrics.finished.inc()
        t.loop.call_soon_threadsafe(t.out.put_nowait, out)

    def _fail_all(self, err: Exception) -> None:
        for rid, t in list(self._tracked.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.error("abort after engine error failed:\n%s", traceback.format_exc())
            t.loop.call_soon_threadsafe(t.out.put_nowait, err)
        self._tracked.clear()

    def _publish(self) -> None:
        s = self.engine.scheduler
        self._num_waiting = len(s.waiting)
        self.metrics.running.set(len(s.running))
        self.metrics.waiting.set(len(s.waiting))
        self.metrics.kv_usage.set(s.block_manager.usage)
        self.metrics.num_free_blocks.set(s.block_manager.num_free_blocks)
        if s.num_preemptions > self._preemptions_seen:
            self.metrics.preemptions.inc(s.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = s.num_preemptions
