"""CPU execution units: one worker thread per unit, pinned to its own partition of the cores.

What works in torch 2.13 (CPU wheel, GNU OpenMP), measured: `torch.set_num_threads` is process-global (called
in a worker it changes the main thread's count too), so it cannot size one unit. What is per thread:
- `os.sched_setaffinity(threading.get_native_id(), cores)` pins the calling thread; the OpenMP pool threads a
  thread creates later inherit the mask;
- libgomp's `omp_set_num_threads` (through ctypes) sets the calling thread's own team size, which ATen's
  parallel_for, oneDNN (bf16 GEMMs) and MKL's GNU-OpenMP layer (float32 GEMMs) read through
  `omp_get_max_threads()`. (`mkl_set_num_threads_local`, exported by libtorch_cpu, segfaults when called.)
So each worker pins itself, then sets its team size to its core count, after torch's lazy per-thread init.
Dependencies between units: one condition variable and a completed-task counter per unit (a unit runs its
tasks in order, so "task p of unit u is done" is "progress[u] > p").
"""
from __future__ import annotations

import contextvars
import ctypes
import os
import threading
import time

import torch

from nanoflow.flow.ops import run_op

_libs: dict[str, ctypes.CDLL | None] = {}


def _lib(name: str):
    if name not in _libs:
        try:
            _libs[name] = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", name))
        except OSError:
            _libs[name] = None
    return _libs[name]


def limit_this_thread(cores: list[int], team: int | None = None) -> None:
    """Pin the calling thread to `cores` and size its OpenMP team to `team` (default len(cores))."""
    os.sched_setaffinity(threading.get_native_id(), cores)
    torch.get_num_threads()  # torch's lazy per-thread init first, so it does not undo the calls below
    gomp = _lib("libgomp.so.1")
    if gomp is not None and hasattr(gomp, "omp_set_num_threads"):
        gomp.omp_set_num_threads(team or len(cores))


def partition_cores(shares: list[float], cores: list[int]) -> list[list[int]]:
    """Contiguous core blocks proportional to the shares, at least one core each (they overlap only when
    there are more units than cores)."""
    n, total = len(cores), sum(shares)
    counts = [max(1, round(s / total * n)) for s in shares]
    while sum(counts) > n and max(counts) > 1:
        counts[counts.index(max(counts))] -= 1
    out, at = [], 0
    for c in counts:
        out.append([cores[(at + k) % n] for k in range(c)])
        at += c
    return out


class CpuUnits:
    """The CPU backend of `flow.executor.ExecutionUnits` (CudaUnits in cuda_units.py is the GPU one)."""

    def __init__(self, units, device=None) -> None:
        self.names = [u.name for u in units]
        self.cores = partition_cores([u.share for u in units], sorted(os.sched_getaffinity(0)))
        self._cv = threading.Condition()
        self._progress = [0] * len(units)
        self._job = None
        self._generation = 0
        self._finished = 0
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    def run_op(self, model, task, state, start: int, end: int) -> None:
        """A task's math on token rows [start, end): the plain op, on the calling worker's cores."""
        run_op(model, task.layer, task.op, state, start, end)

    def _start(self) -> None:
        for u in range(len(self.names)):
            t = threading.Thread(target=self._worker, args=(u,), name=f"nanoflow-unit-{self.names[u]}", daemon=True)
            t.start()
            self._threads.append(t)

    def run(self, program, fn, trace: list | None = None, num_tokens: int = 0) -> None:
        """Run every unit's task list concurrently; returns when all are done (re-raises a worker's error)."""
        if not self._threads:
            self._start()
        with self._cv:
            self._progress = [0] * len(self.names)
            # The caller's context variables (e.g. its engine's C++-kernel switch) hold in the unit threads too.
            self._job, self._finished, self._error = (program, fn, trace, contextvars.copy_context()), 0, None
            self._generation += 1
            self._cv.notify_all()
            while self._finished < len(self.names):
                self._cv.wait()
            self._job = None
            if self._error is not None:
                raise self._error

    def _worker(self, u: int) -> None:
        limit_this_thread(self.cores[u])
        seen = 0
        with torch.inference_mode():  # thread-local: the step's tensors are inference tensors
            while True:
                with self._cv:
                    while self._generation == seen and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                    seen, (program, fn, trace, ctx) = self._generation, self._job
                try:
                    ctx.copy().run(self._run_tasks, u, program.tasks[u], fn, trace)
                except BaseException as e:  # noqa: BLE001 - handed to the caller of run()
                    with self._cv:
                        self._error = self._error or e
                with self._cv:
                    self._finished += 1
                    self._cv.notify_all()

    def _run_tasks(self, u: int, tasks, fn, trace) -> None:
        cv, progress = self._cv, self._progress
        for task in tasks:
            if task.deps:
                with cv:
                    while self._error is None and any(progress[du] <= dp for du, dp in task.deps):
                        cv.wait()
                    if self._error is not None:
                        return
            t0 = time.perf_counter()
            fn(task)
            if trace is not None:
                trace.append((self.names[u], task, t0, time.perf_counter()))
            with cv:
                progress[u] += 1
                cv.notify_all()

    def close(self) -> None:
        """Let the worker threads exit (they are daemons and idle between steps, so this is optional)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._threads = []
