"""Timing helpers for the profiler and tune: ops on a share of the device, alone or two at once.

CPU: a share is a set of cores; the work runs in a thread pinned to them (`cpu_units.limit_this_thread`).
GPU: a share is an SM count; the work runs on a green-context stream of that size (`cuda_units`), timed
with CUDA events. The GPU path has NOT been run in this project (no device was available).
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch

from nanoflow.flow.cpu_units import limit_this_thread


def cpu_shares(num_cores: int) -> list[float]:
    return [k / num_cores for k in range(1, num_cores + 1)]


def cores_for(share: float, cores: list[int]) -> list[int]:
    return cores[:max(1, round(share * len(cores)))]


def on_cores(cores: list[int], fn: Callable[[], object]):
    """Run fn in a fresh thread pinned to `cores` (its OpenMP team sized to them); return its result."""
    box: dict = {}

    def work():
        try:
            limit_this_thread(cores)
            with torch.inference_mode():
                box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["e"] = e
    t = threading.Thread(target=work, name="nanoflow-profile")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("r")


def time_fn(fn: Callable[[], None], min_time: float = 0.02, min_reps: int = 3, max_reps: int = 40,
            sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of fn after one warm-up call."""
    fn()
    sync()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - t_start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def corun_cpu(fa: Callable[[], None], cores_a: list[int], fb: Callable[[], None], cores_b: list[int],
              window: float = 0.3) -> tuple[float, float]:
    """Run fa and fb repeatedly at the same time on their cores for `window` seconds: (calls/s of a, of b)."""
    barrier, stop = threading.Barrier(3), threading.Event()
    rates = [0.0, 0.0]
    errors: list[BaseException] = []

    def worker(i, fn, cores):
        try:
            limit_this_thread(cores)
            with torch.inference_mode():
                fn()  # warm-up (also the OpenMP team's start)
                barrier.wait()
                n, t0 = 0, time.perf_counter()
                while not stop.is_set():
                    fn()
                    n += 1
                rates[i] = n / (time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=worker, args=a) for a in ((0, fa, cores_a), (1, fb, cores_b))]
    for t in threads:
        t.start()
    try:
        barrier.wait()
        time.sleep(window)
    except threading.BrokenBarrierError:
        pass
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rates[0], rates[1]


# ---------------------------------------------------------------- GPU (not run in this project)
def gpu_share_ladder(total_sms: int, step: int = 8) -> list[int]:
    """SM counts 8, 16, ... up to the largest multiple of 8 (the paper's 8-128 thread blocks in steps of 8)."""
    return list(range(step, total_sms // step * step + 1, step))


def gpu_streams(counts: dict[str, int], device: torch.device) -> dict:
    """Green-context streams of the given SM counts (soft: plain streams, with a warning, if unavailable)."""
    from nanoflow.flow.cuda_units import CudaUnits
    from nanoflow.flow.plan import Unit
    total = torch.cuda.get_device_properties(device).multi_processor_count
    units = [Unit(name, ["compute", "memory", "other"], n / total) for name, n in counts.items()]
    return CudaUnits(units, device).streams


def corun_gpu(fa, fb, streams: tuple, reps: int = 20) -> tuple[float, float]:
    """fa repeated on streams[0] and fb on streams[1], launched together: (calls/s of a, of b)."""
    sa, sb = streams
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    torch.cuda.synchronize()
    for s, fn, (e0, e1) in ((sa, fa, ev[:2]), (sb, fb, ev[2:])):
        with torch.cuda.stream(s):
            e0.record(s)
            for _ in range(reps):
                fn()
            e1.record(s)
    torch.cuda.synchronize()
    return reps / (ev[0].elapsed_time(ev[1]) / 1e3), reps / (ev[2].elapsed_time(ev[3]) / 1e3)
