"""Executors: run one step's layers as nano-operations under a plan (`--executor sequential|nanobatch|overlap`).

- `sequential`: one range per op, ops in order, on the calling thread (the baseline; the same layer methods as
  the plain forward).
- `nanobatch`: the plan's splits, still one unit: its nano-ops merged into one dependency-respecting sequence
  (the paper's nano-batching-without-overlap ablation).
- `overlap`: the plan's units run concurrently on an `ExecutionUnits` backend: `cpu_units.CpuUnits` (worker
  threads pinned to core partitions) or, on a GPU, `cuda_units.CudaUnits` (one stream per unit, cross-stream
  events). A backend receives a compiled `Program`: per unit, the tasks of every layer in issue order, each
  with the (unit, position) pairs it must wait for; it calls `fn(task)` to do the math.

The backend interface is the `ExecutionUnits` protocol below, built as `Backend(units: list[plan.Unit], device)`.

An executor is called like the model: `executor(input_ids, positions, meta, kv_caches) -> final hidden`.
Setting `executor.trace = []` records (unit name, task, start s, end s) per nano-op of the following calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from nanoflow import env
from nanoflow.flow.ops import StepState, final_hidden, run_op
from nanoflow.flow.plan import Plan, dependencies, issue_order, nanobatch_plan, overlap_plan, parse_nano, \
    plan_operations, sequential_plan, validate

EXECUTORS = ("sequential", "nanobatch", "overlap")


@dataclass(frozen=True)
class NanoTask:
    layer: int
    op: str
    index: int  # nano-op index within the op
    start: int  # token rows in the dense batch (clipped to the step's tokens at run time)
    end: int
    last: bool  # the op's last range: stretches to the step's end if it has more tokens than dense_batch
    unit: int
    deps: tuple[tuple[int, int], ...]  # (unit, position in that unit's task list) that must be done first

    def rows(self, num_tokens: int) -> tuple[int, int]:
        return min(self.start, num_tokens), (num_tokens if self.last else min(self.end, num_tokens))

    @property
    def label(self) -> str:
        return f"{self.op}#{self.index}"


@dataclass
class Program:
    units: list[str]  # unit names
    tasks: list[list[NanoTask]]  # per unit, layer after layer, in issue order


class ExecutionUnits(Protocol):
    """What the overlap executor needs of a backend (`cpu_units.CpuUnits`, `cuda_units.CudaUnits`)."""

    def run(self, program: Program, fn: Callable[[NanoTask], None], trace: list | None = None,
            num_tokens: int = 0) -> None:
        """Run each unit's tasks in order, a task only after its `deps`, calling `fn(task)` for the math;
        append (unit name, task, start s, end s) to `trace` when it is a list; return when the step is done."""

    def run_op(self, model, task: NanoTask, state: StepState, start: int, end: int) -> None:
        """The task's op on token rows [start, end) of `state`, as this backend runs it (CUDA soft partitions:
        SM-limited kernels; otherwise `ops.run_op`)."""

    def close(self) -> None:
        """Release what the backend holds (threads, streams); it is not used afterwards."""


def compile_program(plan: Plan, num_layers: int, ops=None) -> Program:
    """Per-unit task lists for all layers, with dependencies as (unit, position) pairs (max per unit;
    dependencies on the own unit are implied by its order)."""
    ops = plan_operations(plan) if ops is None else ops
    deps, where = dependencies(plan, ops), plan.unit_of()
    per_layer = [len(plan.order.get(u.name, [])) for u in plan.units]
    tasks: list[list[NanoTask]] = [[] for _ in plan.units]
    for layer in range(num_layers):
        for u, unit in enumerate(plan.units):
            for s in plan.order.get(unit.name, []):
                op, i = parse_nano(s)
                wait: dict[int, int] = {}
                for (dop, di), off in deps[(op, i)]:
                    if layer + off < 0:
                        continue
                    du, dp = where[(dop, di)]
                    wait[du] = max(wait.get(du, -1), (layer + off) * per_layer[du] + dp)
                if not plan.cross_layer and layer > 0:  # barrier: all of layer-1 on every unit
                    for du, n in enumerate(per_layer):
                        if n:
                            wait[du] = max(wait.get(du, -1), layer * n - 1)
                wait.pop(u, None)
                a, b = plan.ranges(op)[i]
                tasks[u].append(NanoTask(layer, op, i, a, b, b == plan.dense_batch, u, tuple(sorted(wait.items()))))
    return Program([u.name for u in plan.units], tasks)


class Executor:
    kind = "base"

    def __init__(self, plan: Plan, model) -> None:
        validate(plan, model.operations())
        self.plan, self.model = plan, model
        self.trace: list | None = None  # set to [] to record nano-op timings of the following steps
        self.trace_steps: list[tuple[int, int, int]] = []  # per traced step: (tokens, decode tokens, events)

    @torch.inference_mode()
    def __call__(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        state = StepState(self.model, input_ids, positions, meta, kv_caches, split=self.kind != "sequential")
        trace = self.trace  # whole steps only: tracing switched on mid-step starts with the next one
        record = [] if trace is not None else None
        self.run(state, record)
        if trace is not None:
            trace.extend(record)
            self.trace_steps.append((state.num_tokens, meta.num_decode, len(record)))
        return final_hidden(self.model, state)

    def run(self, state: StepState, trace: list | None = None) -> None:
        """All layers of the step; appends (unit, task, start s, end s) per nano-op to `trace` if given."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class ExecutorWrapper:
    """Base of the wrappers that change how some steps run (CUDA graphs: `cuda_graphs.GraphedStep`; the CPU
    layer stack: `cpp_stack.CppLayerStack`): called like the executor; attribute reads (plan, close, ...) and
    the trace settings go through to the wrapped one."""

    def __init__(self, executor) -> None:
        self.executor = executor

    def __getattr__(self, name):
        return getattr(self.executor, name)

    @property
    def trace(self):
        return self.executor.trace

    @trace.setter
    def trace(self, value) -> None:
        self.executor.trace = value

    @property
    def trace_steps(self):  # a plain attribute here would shadow the list the executor appends to
        return self.executor.trace_steps

    @trace_steps.setter
    def trace_steps(self, value) -> None:
        self.executor.trace_steps = value


class SingleUnitExecutor(Executor):
    """sequential and nanobatch: one issuer (the calling thread) runs one layer's nano-ops in a fixed order."""

    def __init__(self, plan: Plan, model, kind: str) -> None:
        super().__init__(plan, model)
        self.kind = kind
        self.program = compile_program(plan, 1)
        by_id = {(t.op, t.index): t for ts in self.program.tasks for t in ts}
        self.sequence = [by_id[n] for n in issue_order(plan)]

    def run(self, state: StepState, trace: list | None = None) -> None:
        t, model = state.num_tokens, self.model
        for layer in range(len(model.layers)):
            for task in self.sequence:
                a, b = task.rows(t)
                t0 = time.perf_counter() if trace is not None else 0.0
                run_op(model, layer, task.op, state, a, b)
                if trace is not None and a < b:
                    trace.append(("main", NanoTask(layer, task.op, task.index, a, b, task.last, 0, ()),
                                  t0, time.perf_counter()))


class OverlapExecutor(Executor):
    kind = "overlap"

    def __init__(self, plan: Plan, model, device: torch.device) -> None:
        super().__init__(plan, model)
        self.program = compile_program(plan, len(model.layers))
        self.units: ExecutionUnits
        if device.type == "cuda":
            from nanoflow.flow.cuda_units import CudaUnits
            self.units = CudaUnits(plan.units, device)
        else:
            from nanoflow.flow.cpu_units import CpuUnits
            self.units = CpuUnits(plan.units, device)

    def run(self, state: StepState, trace: list | None = None) -> None:
        t, model, units = state.num_tokens, self.model, self.units

        def fn(task: NanoTask) -> None:
            units.run_op(model, task, state, *task.rows(t))
        self.units.run(self.program, fn, trace, t)

    def close(self) -> None:
        self.units.close()


def resolve_plan(plan, kind: str, model, dense_batch: int, device) -> Plan:
    """A Plan from None (the default for the executor), a Plan or a JSON path ("auto" becomes a path before
    an engine is built)."""
    tp = model.tp_size
    if kind == "sequential":
        return sequential_plan(dense_batch, tp)
    if isinstance(plan, Plan):
        return plan
    if plan:
        return Plan.load(plan)
    return nanobatch_plan(dense_batch, tp_size=tp) if kind == "nanobatch" else overlap_plan(dense_batch, tp_size=tp)


def make_executor(kind: str, plan, model, device=None, dense_batch: int = 256, cpp_layer_stack: bool = False):
    """`kind` in EXECUTORS; `plan` a Plan, a JSON path or None (the executor's default plan).
    nanobatch with an overlap plan runs that plan's splits and issue order on one unit. `cpp_layer_stack`
    (CPU, sequential): steps of decode rows and short prefills in one C++ call where the model fits it
    (flow/cpp_stack.py)."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    p = resolve_plan(plan, kind, model, dense_batch, device)
    ex = OverlapExecutor(p, model, device) if kind == "overlap" else SingleUnitExecutor(p, model, kind)
    # Not under tensor parallelism: capturing NCCL collectives in a graph needs more care than we can test here.
    if device.type == "cuda" and model.tp_size == 1 and env.cuda_graphs():
        from nanoflow.flow.cuda_graphs import GraphedStep  # the whole step as one CUDA graph per step shape
        return GraphedStep(ex)
    if device.type == "cpu" and kind == "sequential" and cpp_layer_stack:
        from nanoflow.flow.cpp_stack import CppLayerStack
        return CppLayerStack(ex)
    return ex
