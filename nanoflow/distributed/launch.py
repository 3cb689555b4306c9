"""Process layout of tensor parallelism: rank 0 lives in the engine process (it also schedules, detokenizes and
samples); ranks 1..N-1 are worker processes this module starts (spawn), each pinned to its own block of cores
on a CPU (one GPU each on CUDA). Under `torchrun` (RANK/WORLD_SIZE in the environment) nothing is started:
the process with RANK 0 runs the engine, the others serve steps. Across machines (`nnodes > 1`) each node runs
its block of ranks; node 0 holds rank 0.

A step: rank 0 posts the step's inputs (StepInputs without the engine's Request objects) to the store, every rank runs
the same forward with its shard (all-reduces inside), the LM head's logits are gathered on rank 0, which
samples and broadcasts the tokens (the next step's inputs may read them: async scheduling). Shutdown: rank 0
posts None. A worker that dies makes rank 0's next collective fail at once; one that hangs makes it fail
after `distributed_timeout_s`; either way the step raises an error naming the rank, never hangs.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import socket
from dataclasses import dataclass, field, replace

import torch

from nanoflow import env
from nanoflow.distributed.comm import TPGroup
from nanoflow.distributed.shard import TPShard, even_ranges


def rank_cores(rank: int, per_node: int) -> list[int]:
    """The cores of a rank's block on its node (rank 0 of each node gets the first block)."""
    cores = sorted(os.sched_getaffinity(0))
    a, b = even_ranges(len(cores), per_node)[rank % per_node] if len(cores) >= per_node else (0, len(cores))
    return cores[a:b]


def pin_process(cores: list[int]) -> tuple[set[int], int]:
    """Pin the calling thread (and the OpenMP team it starts) to `cores`; returns what to restore."""
    from nanoflow.flow.cpu_units import limit_this_thread
    before = (os.sched_getaffinity(0), torch.get_num_threads())
    limit_this_thread(cores)
    torch.set_num_threads(len(cores))
    return before


@dataclass
class TPWorkers:
    """Rank 0's handle on the worker processes of its node."""
    procs: dict[int, mp.process.BaseProcess] = field(default_factory=dict)
    errors: object = None  # a multiprocessing queue: (rank, message) from workers that failed to start
    restore: tuple | None = None  # rank 0's affinity and thread count before pinning

    def failure(self, err: BaseException) -> RuntimeError:
        """The step's error, naming the worker that died (a collective fails with a transport message)."""
        dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in self.procs.items()
                if not p.is_alive()]
        what = "; ".join(dead) if dead else "no worker exited: a rank hung or the transport failed"
        return RuntimeError(f"tensor-parallel step failed ({what}): {type(err).__name__}: {err}")

    def shutdown(self, group: TPGroup | None, timeout_s: float = 10.0) -> None:
        if group is not None and all(p.is_alive() for p in self.procs.values()):
            try:
                group.post_step(None)  # the workers' loop ends
            except Exception:  # noqa: BLE001 - a dead peer: they are terminated below
                pass
        for p in self.procs.values():
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join(timeout_s)
        if group is not None:
            group.close()
        if self.restore is not None:
            os.sched_setaffinity(0, self.restore[0])
            torch.set_num_threads(self.restore[1])
            self.restore = None


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensor_parallel(config, model_config, num_blocks: int) -> tuple[TPWorkers, TPGroup | None]:
    """Start this node's worker ranks and join the group. Returns (workers, rank 0's group); on a node other
    than 0 it serves steps until rank 0 shuts down and returns (workers, None)."""
    world, per_node = config.tensor_parallel_size, config.tensor_parallel_size // config.nnodes
    device = torch.device(config.device)
    import torch.distributed as dist
    if dist.is_initialized():  # torch.distributed has one default group per process
        raise ValueError("one tensor-parallel engine per process: shut the other one down first "
                         "(LLMEngine.shutdown())")
    ctx = mp.get_context("spawn")
    workers = TPWorkers(errors=ctx.Queue())
    external = env.torchrun_rank()  # started by torchrun (env:// rendezvous)
    if external is not None:  # torchrun started every rank: this process is one of them
        if external != 0:
            worker_main(config, model_config, num_blocks, external, "env://", workers.errors, own_process=False)
            return workers, None
        init, ranks = "env://", [0]
    else:
        port = config.master_port or (free_port() if config.nnodes == 1 else 29500)
        init, first = f"tcp://{config.master_addr}:{port}", config.node_rank * per_node
        ranks = list(range(first, first + per_node))
    for rank in ranks:
        if rank == 0:
            continue
        workers.procs[rank] = ctx.Process(target=worker_main, name=f"nanoflow-tp{rank}", daemon=True,
                                          args=(config, model_config, num_blocks, rank, init, workers.errors))
        workers.procs[rank].start()
    if 0 not in ranks:  # this node only serves steps
        for p in workers.procs.values():
            p.join()
        return workers, None
    if device.type == "cpu":
        workers.restore = pin_process(rank_cores(0, per_node))
    try:
        group = TPGroup.connect(TPShard.of(model_config, 0, world), _rank_device(device, 0, per_node), init,
                                config.distributed_timeout_s)
    except Exception as e:  # (the engine joins the barrier after building its own shard)
        workers.shutdown(None)
        raise RuntimeError(f"tensor-parallel ranks did not all join: {_first_error(workers, e)}") from e
    return workers, group


def _first_error(workers: TPWorkers, err: BaseException) -> str:
    try:
        rank, msg = workers.errors.get(timeout=1.0)
        return f"rank {rank}: {msg}"
    except Exception:  # noqa: BLE001 - no worker reported: the rendezvous itself failed
        return f"{type(err).__name__}: {err}"


def _rank_device(device: torch.device, rank: int, per_node: int) -> torch.device:
    return torch.device("cuda", rank % per_node) if device.type == "cuda" else device


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the engine process dies, even without a goodbye."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_main(config, model_config, num_blocks: int, rank: int, init: str, errors,
                own_process: bool = True) -> None:
    """A worker rank: join the group, build this rank's shard and runner, serve steps until told to stop."""
    if own_process:
        _die_with_parent()
    world, per_node = config.tensor_parallel_size, config.tensor_parallel_size // config.nnodes
    device = _rank_device(torch.device(config.device), rank, per_node)
    if device.type == "cpu":
        pin_process(rank_cores(rank, per_node))
    else:
        torch.cuda.set_device(device)
    try:
        group = TPGroup.connect(TPShard.of(model_config, rank, world), device, init, config.distributed_timeout_s)
        from nanoflow.engine.runner import ModelRunner
        runner = ModelRunner(replace(config, device=str(device)), model_config, num_blocks, group)
    except BaseException as e:
        errors.put((rank, f"{type(e).__name__}: {e}"))
        raise
    group.barrier()  # every rank built its shard
    with torch.inference_mode():
        while (inp := group.next_step()) is not None:
            runner.run(inp)
    group.close()
