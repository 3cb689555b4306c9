"""One data-parallel replica: an LLMEngine in its own process, pinned to its own cores (or its own GPU), driven
by typed messages over two one-way pipes (commands in, results out).

A reader thread drains the command pipe into a local queue, so the parent never blocks sending while the
replica is busy sending results (two processes each blocked on a full pipe would deadlock)."""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from dataclasses import dataclass

from nanoflow.config import EngineConfig
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams


# ---- parent -> replica ----
@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Shutdown:
    pass


# ---- replica -> parent ----
@dataclass
class ReplicaInfo:
    """What the parent needs to validate and route without loading weights twice."""
    max_model_len: int
    block_size: int
    num_blocks: int
    max_num_seqs: int


@dataclass
class Ready:
    rank: int
    info: ReplicaInfo


@dataclass
class ReplicaSnapshot:
    """The replica's queue and KV pool after a step (the server's gauges)."""
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_preemptions: int


@dataclass
class StepDone:
    """Sent after every step (or after commands that left it idle): the step's outputs (finished ones only,
    unless a request asked for cumulative outputs: serve streams them), the replica's running totals and how
    many commands it had applied (the parent's step() waits for its own)."""
    rank: int
    outputs: list[RequestOutput]
    stats: object  # engine.StepStats
    applied: int
    snapshot: ReplicaSnapshot


@dataclass
class Rejected:
    request_id: str
    message: str


@dataclass
class Failed:
    rank: int
    error: str


def replica_config(config: EngineConfig, rank: int, cores: list[int]) -> EngineConfig:
    """The replica's own config: one engine, its share of the cores, its own GPU."""
    device = config.device
    if device.startswith("cuda"):
        device = f"cuda:{rank}"
    return dataclasses.replace(config, data_parallel_size=1, device=device,
                               num_threads=config.num_threads or len(cores))


def replica_main(rank: int, config: EngineConfig, cores: list[int], commands, results) -> None:
    """The replica process (multiprocessing spawn target)."""
    if hasattr(os, "sched_setaffinity") and cores:
        os.sched_setaffinity(0, cores)  # before torch starts its thread pool
    import torch
    from nanoflow.engine.engine import LLMEngine
    try:
        torch.set_num_threads(config.num_threads or len(cores))
        engine = LLMEngine(config)
    except BaseException as e:  # e.g. out of memory: the parent reports it and goes on without this replica
        results.send(Failed(rank, f"{type(e).__name__}: {e}"))
        return
    sc = engine.scheduler.config
    results.send(Ready(rank, ReplicaInfo(engine.max_model_len, sc.block_size, sc.num_blocks, sc.max_num_seqs)))
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read_commands, args=(commands, inbox), daemon=True).start()
    applied = 0
    while True:
        busy = engine.has_unfinished_requests()
        msgs = [] if busy else [inbox.get()]  # idle: wait for work
        while not inbox.empty():
            msgs.append(inbox.get_nowait())
        for msg in msgs:
            if isinstance(msg, Shutdown):
                getattr(engine, "shutdown", lambda: None)()  # (its tensor-parallel ranks, if any)
                return
            _apply(engine, msg, results)
        applied += len(msgs)
        if engine.has_unfinished_requests():
            outputs = engine.step()
            results.send(StepDone(rank, outputs, engine.stats, applied, _snapshot(engine)))
        elif msgs:
            results.send(StepDone(rank, [], engine.stats, applied, _snapshot(engine)))


def _snapshot(engine) -> ReplicaSnapshot:
    s = engine.scheduler
    return ReplicaSnapshot(len(s.waiting), len(s.running), s.block_manager.num_free_blocks, s.num_preemptions)


def _apply(engine, msg, results) -> None:
    if isinstance(msg, AddRequest):
        try:
            engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.prompt)
        except ValueError as e:
            results.send(Rejected(msg.request_id, str(e)))
    elif isinstance(msg, AbortRequest) and msg.request_id in engine.groups:
        engine.abort_request(msg.request_id)


def _read_commands(commands, inbox: queue.Queue) -> None:
    while True:
        try:
            inbox.put(commands.recv())
        except (EOFError, OSError):  # the parent is gone: stop
            inbox.put(Shutdown())
            return
