"""CUDA execution units: one stream per unit, cross-stream events, SM partitions (CUDA graphs: cuda_graphs.py).

How a unit's share becomes SMs (best first; `NANOFLOW_SM_PARTITION=driver|torch|soft|none` forces one):
  driver  green contexts through `cuda.bindings` (cuDevSmResourceSplitByCount -> cuGreenCtxCreate ->
          cuGreenCtxStreamCreate -> torch.cuda.get_stream_from_external): disjoint partitions, real SM counts.
  torch   `torch.cuda.green_contexts.GreenContext.create(num_sms).Stream()` (torch >= 2.11): separate
          create() calls may land on the same SMs and the granted count cannot be read (docs/architecture.md,
          "CUDA units").
  soft    plain streams; GEMMs run as the SM-limited persistent Triton kernel with `num_sms` programs and decode
          attention with a bounded grid (`kernels/triton_*.py`): the block scheduler may still share SMs.
  none    plain streams, every kernel on the whole device.
Hopper rounds green-context SM counts up to multiples of 8 (minimum 8). Nothing here runs at import: the
module imports on a CPU-only machine, and `CudaUnits` raises a clear error there.

NOT RUN ON A GPU: everything below the pure-Python helpers (partition arithmetic) was written
against the documented APIs and has never executed on a CUDA device in this project.
"""
from __future__ import annotations

import logging
import time

import torch

from nanoflow import env

log = logging.getLogger(__name__)
MECHANISMS = ("driver", "torch", "soft", "none")
STEP_BUFFERS = ("hidden", "residual", "qkv", "act", "attn_out")  # flow.ops.StepState tensors ops may rebind


# ---------------------------------------------------------------- pure arithmetic (unit-tested on CPU)
def arch_constraints(major: int, minor: int = 0) -> tuple[int, int]:
    """(minimum SMs, granularity) of a green-context SM split (CUDA driver docs, cuDevSmResourceSplitByCount)."""
    if major >= 9:
        return 8, 8
    if major == 8:
        return 4, 2
    if major == 7:
        return 2, 2
    return 1, 1


def sm_count_for_share(share: float, total_sms: int, min_count: int = 8, granularity: int = 8) -> int:
    """SMs for a share of the device: nearest multiple of the granularity, at least `min_count`, at most the
    largest multiple that fits (132 SMs on an H100 -> 128)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    top = max(min_count, total_sms // granularity * granularity)
    n = int(share * total_sms / granularity + 0.5) * granularity
    return min(top, max(min_count, n))


def partition_sms(shares: dict[str, float], total_sms: int, min_count: int = 8,
                  granularity: int = 8) -> dict[str, int] | None:
    """Disjoint SM counts per unit, or None when no partition is wanted (one unit, or shares adding up to
    more than the device: those units never run at the same time and each gets the whole device).

    The unit with the largest share takes the remainder, as the driver's split returns it (132 = 24 + 108)."""
    if len(shares) < 2 or sum(shares.values()) > 1 + 1e-9:
        return None
    big = max(shares, key=lambda u: (shares[u], u))
    counts = {u: sm_count_for_share(s, total_sms, min_count, granularity) for u, s in shares.items() if u != big}
    while sum(counts.values()) > total_sms - min_count:  # leave the big unit at least one group
        u = max(counts, key=lambda k: counts[k])
        if counts[u] <= min_count:
            raise ValueError(f"{len(shares)} units do not fit in {total_sms} SMs at {min_count} SMs each")
        counts[u] -= granularity
    counts[big] = total_sms - sum(counts.values())
    return counts


# ---------------------------------------------------------------- device side (needs CUDA)
def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"CUDA is not available (torch {torch.__version__}, built for CUDA: {torch.version.cuda})"
    return None


def _check(result):
    """cuda.bindings calls return (CUresult, values...); raise on an error."""
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else rest


def driver_green_streams(counts: dict[str, int], device: torch.device) -> tuple[dict, dict[str, int]]:
    """Disjoint green contexts via cuda.bindings; returns (unit -> torch stream, unit -> granted SMs)."""
    from cuda.bindings import driver  # optional: preinstalled on the GPU machines, absent on CPU
    dev = _check(driver.cuDeviceGet(device.index or 0))
    res = _check(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    big = max(counts, key=lambda u: counts[u])
    streams, granted, ctxs = {}, {}, []
    for unit in [u for u in counts if u != big] + [big]:
        if unit == big:
            group = res  # the remainder of all previous splits
        else:
            groups, _n, rest = _check(driver.cuDevSmResourceSplitByCount(1, res, 0, counts[unit]))
            group = groups[0]
            # A split's remainder cannot be split again directly: make a context of it and re-query it.
            rest_ctx = _green_ctx(driver, dev, rest)
            ctxs.append(rest_ctx)
            res = _check(driver.cuGreenCtxGetDevResource(rest_ctx, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        ctx = _green_ctx(driver, dev, group)
        ctxs.append(ctx)
        raw = _check(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        streams[unit] = torch.cuda.get_stream_from_external(int(raw), device)
        granted[unit] = int(group.sm.smCount)
    _KEEP_ALIVE.extend(ctxs)  # contexts live as long as the process (streams refer to them)
    return streams, granted


_KEEP_ALIVE: list = []


def _green_ctx(driver, dev, resource):
    desc = _check(driver.cuDevResourceGenerateDesc([resource], 1))
    return _check(driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))


def torch_green_streams(counts: dict[str, int], device: torch.device) -> tuple[dict, dict[str, int]]:
    from torch.cuda.green_contexts import SUPPORTED, GreenContext
    if not SUPPORTED or not hasattr(GreenContext, "Stream"):
        raise RuntimeError(f"torch {torch.__version__} has no GreenContext.Stream() (needs >= 2.11, CUDA build)")
    streams = {}
    for unit, n in counts.items():
        try:
            g = GreenContext.create(num_sms=n, device_id=device.index or 0)
        except TypeError:  # torch 2.10/2.11 take positional arguments
            g = GreenContext.create(n, device.index or 0)
        _KEEP_ALIVE.append(g)
        streams[unit] = g.Stream()
    log.warning("torch green contexts: partitions of separate create() calls may overlap; counts are requests")
    return streams, dict(counts)


def issue_sequence(program) -> list[tuple[int, int]]:
    """(unit, position) of every task in one order that respects each unit's order and every dependency:
    a single CPU thread launches all kernels asynchronously, so it must issue a task after those it waits
    for (their events must be recorded first). Round-robin over units keeps their queues fed evenly."""
    n = [len(ts) for ts in program.tasks]
    heads, out, u = [0] * len(n), [], 0
    while len(out) < sum(n):
        for k in range(len(n)):
            v = (u + k) % len(n)
            if heads[v] < n[v] and all(heads[du] > dp for du, dp in program.tasks[v][heads[v]].deps):
                out.append((v, heads[v]))
                heads[v] += 1
                u = (v + 1) % len(n)
                break
        else:
            raise RuntimeError("program deadlocks: no unit can issue its next task (validate the plan)")
    return out


class CudaUnits:
    """The GPU backend of `flow.executor.ExecutionUnits` (cpu_units.CpuUnits is the CPU one): one stream per
    unit, partitioned by SM share (see the module docstring)."""

    def __init__(self, units, device: str | torch.device = "cuda", mechanism: str | None = None) -> None:
        reason = cuda_unavailable_reason()
        if reason:
            raise RuntimeError(f"CUDA execution units need a GPU: {reason}. Run on the CPU executor instead.")
        self.names = [u.name for u in units]
        shares = {u.name: u.share for u in units}
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.device)
        self.total_sms = props.multi_processor_count
        self.min_sms, self.granularity = arch_constraints(props.major, props.minor)
        counts = partition_sms(shares, self.total_sms, self.min_sms, self.granularity)
        wanted = mechanism or env.sm_partition() or "auto"
        if wanted not in MECHANISMS + ("auto",):
            raise ValueError(f"NANOFLOW_SM_PARTITION={wanted!r}: choose auto or one of {', '.join(MECHANISMS)}")
        self.mechanism, self.streams, self.sm_counts = self._make_streams(shares, counts, wanted)
        log.info("CUDA units: %s partition, SMs %s of %d", self.mechanism, self.sm_counts, self.total_sms)

    def _make_streams(self, shares, counts, wanted: str):
        plain = (lambda: {u: torch.cuda.Stream(self.device) for u in shares})
        if counts is None or wanted == "none":
            return "none", plain(), {u: self.total_sms for u in shares}
        tried = []
        for mech, make in (("driver", driver_green_streams), ("torch", torch_green_streams)):
            if wanted not in ("auto", mech):
                continue
            try:
                streams, granted = make(counts, self.device)
                return mech, streams, granted
            except Exception as e:  # missing package, old driver, sandbox: say why and fall back
                tried.append(f"{mech}: {type(e).__name__}: {e}")
        if tried:
            log.warning("green contexts unavailable (%s); falling back to SM-limited Triton kernels",
                        "; ".join(tried))
        return "soft", plain(), dict(counts)

    def sm_budget(self, unit: str) -> int | None:
        """Programs an SM-limited kernel of this unit may launch (soft mode only; None: no limit needed)."""
        return self.sm_counts[unit] if self.mechanism == "soft" else None

    def run_op(self, model, task, state, start: int, end: int) -> None:
        """A task's op on rows [start, end) on this unit: SM-limited kernels in soft mode."""
        from nanoflow.flow.cuda_soft import run_op_limited
        before = [getattr(state, n) for n in STEP_BUFFERS]
        run_op_limited(model, task.layer, task.op, state, start, end, self.sm_budget(self.names[task.unit]))
        # An op on the whole step rebinds a buffer instead of writing its rows. The old tensor may have been
        # allocated on another unit's stream and be read there still: without record_stream, that stream's
        # next allocation may reuse its memory while those reads are in flight.
        for old, name in zip(before, STEP_BUFFERS):
            if old is not None and old is not getattr(state, name):
                for s in self.streams.values():
                    old.record_stream(s)

    def run(self, program, fn, trace: list | None = None, num_tokens: int = 0) -> None:
        """Launch every unit's tasks on its stream; cross-unit dependencies become CUDA events. Forks from
        and joins back into the current stream, so a whole step can be captured in a CUDA graph."""
        current = torch.cuda.current_stream(self.device)
        fork = torch.cuda.Event(enable_timing=trace is not None)
        fork.record(current)
        streams = [self.streams[n] for n in self.names]
        for s in streams:
            s.wait_event(fork)
        done: dict[tuple[int, int], torch.cuda.Event] = {}
        timing = []
        for u, p in issue_sequence(program):
            task, stream = program.tasks[u][p], streams[u]
            for dep in task.deps:
                stream.wait_event(done[dep])
            begin = None
            if trace is not None:
                begin = torch.cuda.Event(enable_timing=True)
                begin.record(stream)
            with torch.cuda.stream(stream):
                fn(task)
            ev = torch.cuda.Event(enable_timing=trace is not None)
            ev.record(stream)
            done[(u, p)] = ev
            timing.append((u, task, begin, ev))
        for s in streams:
            current.wait_stream(s)
        if trace is not None:  # GPU times relative to the fork, on the host clock of the launch
            t_host = time.perf_counter()
            fork.synchronize()
            for u, task, begin, ev in timing:
                ev.synchronize()
                trace.append((self.names[u], task, t_host + fork.elapsed_time(begin) / 1e3,
                              t_host + fork.elapsed_time(ev) / 1e3))

    def close(self) -> None:
        for s in self.streams.values():
            s.synchronize()
