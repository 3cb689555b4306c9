"""Network operations in the profile (tensor parallelism): the all-reduce of `rows` hidden rows, timed in a real
group of `world` ranks on this machine (gloo on a CPU), solo per token count and beside a GEMM (the co-runs that
become the R -> P table of kind `network`).

The profiling process is rank 0, on rank 0's cores as in the engine; ranks 1.. are peer processes on their own
cores that run the same fixed schedule of all-reduces (sizes and counts agreed up front), so rank 0 can time
each size by the wall time of `reps` calls.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import time

import torch
import torch.distributed as dist

REPS = 12  # all-reduces per solo timing
CORUN_REPS = 24  # all-reduces per co-run


def _schedule(grid: list[int], num_shares: int, num_coruns: int, corun_rows: int) -> list[tuple[int, int]]:
    """(rows, count) in the order every rank issues them: a warm-up, the solo grid per share, the co-runs."""
    return [(grid[0], 2)] + [(r, REPS + 1) for _ in range(num_shares) for r in grid] + \
        [(corun_rows, CORUN_REPS) for _ in range(num_coruns)]


def _peer(rank: int, world: int, init: str, cores: list[int], hidden: int, dtype, schedule) -> None:
    from nanoflow.distributed.launch import pin_process
    pin_process(cores)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for rows, count in schedule:
        x = torch.zeros(rows, hidden, dtype=dtype)
        for _ in range(count):
            dist.all_reduce(x)
    dist.destroy_process_group()


class NetworkProfiler:
    """Rank 0's side; use as a context manager (starts and joins the peers)."""

    def __init__(self, world: int, hidden: int, dtype: torch.dtype, grid: list[int], num_shares: int,
                 num_coruns: int, corun_rows: int) -> None:
        from nanoflow.distributed.launch import free_port, rank_cores
        self.hidden, self.dtype = hidden, dtype
        self.schedule = _schedule(grid, num_shares, num_coruns, corun_rows)
        init = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.peers = [ctx.Process(target=_peer, daemon=True, args=(r, world, init, rank_cores(r, world), hidden,
                                                                  dtype, self.schedule)) for r in range(1, world)]
        for p in self.peers:
            p.start()
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=world)
        self._next = 0
        self._all_reduce(*self.schedule[0])  # warm-up: connections made

    def _all_reduce(self, rows: int, count: int) -> float:
        """`count` all-reduces of `rows` rows (the next schedule entry); seconds per call after the first."""
        assert self.schedule[self._next] == (rows, count), "ranks left the agreed schedule"
        self._next += 1
        x = torch.zeros(rows, self.hidden, dtype=self.dtype)
        dist.all_reduce(x)
        t0 = time.perf_counter()
        for _ in range(count - 1):
            dist.all_reduce(x)
        return (time.perf_counter() - t0) / max(1, count - 1)

    def solo(self, grid: list[int]) -> dict[str, float]:
        """Seconds per all-reduce of each row count (one share's sweep)."""
        return {str(r): self._all_reduce(r, REPS + 1) for r in grid}

    def corun(self, gemm, rows: int, cores_b: list[int]) -> tuple[float, float]:
        """The GEMM looping on the calling thread while CORUN_REPS all-reduces of `rows` run on a thread pinned
        to cores_b: (GEMM calls/s, all-reduces/s)."""
        from nanoflow.flow.cpu_units import limit_this_thread
        done, box, n = threading.Event(), {}, 0

        def comm():
            limit_this_thread(cores_b)
            box["per"] = self._all_reduce(rows, CORUN_REPS)
            done.set()
        t = threading.Thread(target=comm)
        t0 = time.perf_counter()
        t.start()
        while not done.is_set():
            gemm()
            n += 1
        t.join()
        return n / (time.perf_counter() - t0), 1.0 / box["per"]

    def __enter__(self) -> "NetworkProfiler":
        return self

    def __exit__(self, *exc) -> None:
        dist.destroy_process_group()
        for p in self.peers:
            p.join(30)
            if p.is_alive():
                p.kill()


def profile_network_ops(model, call, solo: dict, shares: list[float], grid: list[int], cores: list[int],
                        share_key) -> list:
    """Fill `solo` for the model's network operations (per share and row count) and return the co-runs of
    gate_up beside an all-reduce (CoRun of kind network) on rank 0's `cores`."""
    from nanoflow.autosearch import measure
    from nanoflow.autosearch.interference import CoRun
    ops = [o.name for o in model.operations() if o.kind == "network"]
    rows = min(grid, key=lambda r: abs(r - grid[-1] // 2))
    configs = [(cores[:k], cores[k:]) for k in range(1, len(cores))] + [(cores, cores), (cores, cores[:1])]
    dtype = next(model.parameters()).dtype
    with NetworkProfiler(model.tp_size, model.cfg.hidden_size, dtype, grid, len(shares), len(configs),
                         rows) as net:
        for share in shares:
            times = measure.on_cores(measure.cores_for(share, cores), lambda: net.solo(grid))
            for op in ops:
                solo.setdefault(op, {})[share_key(share)] = dict(times)
        full = share_key(1.0)
        solo_gemm, solo_net = 1.0 / solo["gate_up"][full][str(rows)], 1.0 / solo[ops[0]][full][str(rows)]
        gemm, out = call("gate_up", rows), []
        for ca, cb in configs:
            ra, rb = measure.on_cores(ca, lambda: net.corun(gemm, rows, cb))
            out.append(CoRun("gate_up", ops[0], "network", f"cores {ca}+{cb}", round(ra / solo_gemm, 4),
                             round(rb / solo_net, 4)))
    return out
