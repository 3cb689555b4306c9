"""Asynchronous CPU scheduling (NanoFlow §4.2.1): while the device runs step i, the CPU schedules and prepares
step i+1 and launches it before step i's tokens are read back; step i's tokens are read one step late.

The device side is one worker thread that runs the steps strictly in the order they were launched. On the
CPU, torch ops (and our C++ kernels) release the GIL, so the forward pass overlaps the Python scheduler; on a
GPU the thread enqueues onto the runner's stream and the tokens come back through pinned memory and an
event. The worker reads only its StepInputs snapshot, never a Request the engine thread mutates.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
from dataclasses import dataclass, field

import torch

from nanoflow.engine.runner import ModelRunner, StepInputs
from nanoflow.engine.sampler import SampleResult
from nanoflow.engine.scheduler import ScheduledBatch


@dataclass
class DeviceTiming:
    """When a step's device work ran: wall clock on the CPU, CUDA events on a GPU."""
    start: float
    end: float
    start_event: object = None
    end_event: object = None


@dataclass
class InFlightStep:
    """A launched step whose tokens the engine has not read back yet."""
    batch: ScheduledBatch
    inputs: StepInputs
    future: Future | None = None  # async: the worker's answer
    done: tuple[SampleResult | None, DeviceTiming] | None = None  # sync: computed inline
    free_kv_after: list = field(default_factory=list)  # finished while this step ran: free their KV after it
    _req_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._req_ids = {id(c.req) for c in self.batch.chunks}

    def holds(self, req) -> bool:
        """This step computes (and writes KV for) `req`."""
        return id(req) in self._req_ids

    def settle(self) -> None:
        """Block until the device work is over, done or failed, without raising (it writes no more KV)."""
        if self.done is None:
            wait_futures([self.future])

    def wait(self) -> tuple[SampleResult | None, DeviceTiming]:
        """Block until the device work is done; the answer stays here to be read back later."""
        if self.done is None:
            self.done = self.future.result()
        return self.done


def run_timed(runner: ModelRunner, inp: StepInputs) -> tuple[SampleResult | None, DeviceTiming]:
    events = None
    if runner.stream is not None:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record(runner.stream)
    start = time.perf_counter()
    result = runner.run(inp)
    end = time.perf_counter()
    if events is not None:
        events[1].record(runner.stream)
        return result, DeviceTiming(start, end, *events)
    return result, DeviceTiming(start, end)


class DeviceWorker:
    """One dedicated thread: each step's forward + sampling, in launch order."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoflow-device")

    def launch(self, batch: ScheduledBatch, inp: StepInputs) -> InFlightStep:
        return InFlightStep(batch, inp, future=self._pool.submit(run_timed, self.runner, inp))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class DeviceClock:
    """Device busy time and the idle gaps between consecutive steps (a gap: from the end of one step's device
    work to the start of the next one's). Idle time while the engine has no work at all is not counted."""

    def __init__(self) -> None:
        self._last: DeviceTiming | None = None

    def account(self, stats, t: DeviceTiming) -> None:
        if t.start_event is not None:  # GPU: what the device did, not when the thread launched it
            t.end_event.synchronize()
            stats.device_busy_s += t.start_event.elapsed_time(t.end_event) / 1e3
            if self._last is not None:
                stats.device_idle_s += max(0.0, self._last.end_event.elapsed_time(t.start_event) / 1e3)
        else:
            stats.device_busy_s += t.end - t.start
            if self._last is not None:
                stats.device_idle_s += max(0.0, t.start - self._last.end)
        self._last = t

    def reset(self) -> None:
        self._last = None
