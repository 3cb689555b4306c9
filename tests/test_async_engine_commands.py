"""The server's engine thread applies typed commands in order (AddRequest, AbortRequest, EndAll, Wake). A
stand-in engine records what it was asked: no model, no HTTP."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from nanoflow.sampling_params import SamplingParams
from nanoflow.server.async_engine import AsyncEngine, ShuttingDown


class RecordingEngine:
    """What AsyncEngine calls on an LLMEngine; requests never finish on their own."""

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.scheduler = SimpleNamespace(waiting=[], running=[], num_preemptions=0,
                                         block_manager=SimpleNamespace(usage=0.0, num_free_blocks=1))

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def add_request(self, request_id, prompt_token_ids, params, prompt=None) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.live.add(request_id)
        self.added.append(request_id)

    def abort_request(self, request_id: str) -> None:
        self.live.discard(request_id)
        self.aborted.append(request_id)

    def step(self) -> list:
        time.sleep(0.001)  # pacing only: the loop steps while requests live
        return []


async def _drain(handle) -> None:
    async for _ in handle.outputs():
        pass


def test_commands_are_applied_in_order():
    engine = RecordingEngine()
    async_engine = AsyncEngine(engine)  # type: ignore[arg-type]

    async def scenario() -> None:
        async_engine.reserve(1)
        kept = async_engine.submit("kept", [1, 2], SamplingParams(), reserved=1)
        with pytest.raises(ValueError, match="empty"):  # the engine's refusal reaches the caller
            await _drain(async_engine.submit("empty", [], SamplingParams()))
        kept.abort()
        last = async_engine.submit("last", [3], SamplingParams())
        async_engine.end_all("going down")
        with pytest.raises(ShuttingDown, match="going down"):
            await _drain(last)

    try:
        asyncio.run(scenario())
    finally:
        async_engine.shutdown()  # Wake: the thread sees the stop although nothing is in flight
    assert not async_engine._thread.is_alive() and async_engine.dead is None
    assert engine.added == ["kept", "last"] and engine.aborted == ["kept", "last"]
    assert async_engine.num_waiting == 0  # the reserved room came back with the add
