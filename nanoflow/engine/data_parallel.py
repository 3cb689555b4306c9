"""Data parallelism: N engine replicas in their own processes behind LLMEngine's interface (add_request, step,
abort_request, has_unfinished_requests, stats), so LLM, run-batch and bench use them unchanged.

Routing (dp_router.py): a request goes to the replica with the least outstanding work, unless the replica
that holds its prefix is not much busier once the prefix it will not recompute is discounted: requests sharing
a prefix land where it is cached. A replica that dies is reported and its unfinished requests
are re-run on the others; results of one replica arrive in order on its own pipe and a request is re-run only
after its replica's pipe has closed, so none is lost or answered twice."""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from multiprocessing.connection import wait

from nanoflow.config import EngineConfig
from nanoflow.engine import dp_worker as w
from nanoflow.engine.dp_router import PrefixAffinityRouter
from nanoflow.engine import logits_process
from nanoflow.engine.dp_view import SchedulerView
from nanoflow.engine.request import Request
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.outputs import CompletionOutput, RequestOutput
from nanoflow.sampling_params import SamplingParams

log = logging.getLogger("nanoflow.data_parallel")


def make_engine(config: EngineConfig):
    """LLMEngine, or DataParallelEngine when config.data_parallel_size > 1 (`plan="auto"` resolved here, once,
    before any engine or replica is built)."""
    if config.plan == "auto":
        from nanoflow.autosearch.search import resolve_auto_plan
        config = resolve_auto_plan(config)
    if config.data_parallel_size > 1:
        return DataParallelEngine(config)
    from nanoflow.engine.engine import LLMEngine
    return LLMEngine(config)


def split_cores(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """Contiguous, disjoint core sets, one per replica (shared round-robin if there are fewer cores than n)."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) < n:
        return [[cores[i % len(cores)]] for i in range(n)]
    per = len(cores) // n
    return [cores[i * per:(i + 1) * per] for i in range(n)]


@dataclass
class Replica:
    rank: int
    process: mp.process.BaseProcess
    commands: object  # Connection, parent -> replica
    results: object  # Connection, replica -> parent
    alive: bool = True
    load: int = 0  # outstanding tokens
    stats: object = None
    snapshot: object = None  # dp_worker.ReplicaSnapshot: its queue and pool at its latest step
    sent: int = 0  # commands sent
    acked: int = 0  # commands the replica had applied at its latest step


@dataclass
class _Outstanding:
    msg: w.AddRequest
    full_tokens: int  # (prompt + max_tokens) x n
    tokens: int = 0  # what its replica computes for it (the prefix it holds discounted): its share of the load
    replica: int = -1
    streamed: bool = False  # partial outputs went out (serve): a re-run would repeat them


class DataParallelEngine:
    def __init__(self, config: EngineConfig) -> None:
        from nanoflow.engine.stats import StepStats
        self.config = config
        self.replicas: list[Replica] = []
        from nanoflow.models.loader import load_config, resolve_model
        from nanoflow.tokenizer import load_tokenizer
        src = resolve_model(self.config.model)
        from nanoflow.models.loader import parse_dtype
        self.model_config, self.tokenizer = load_config(src), load_tokenizer(src)
        self.dtype = parse_dtype(config.dtype)
        self._empty_stats = StepStats
        self._stats_base = StepStats()  # `engine.stats = StepStats()` (benchmarks) counts from then on
        self._outstanding: dict[str, _Outstanding] = {}
        self._finished: list[RequestOutput] = []
        self._start_replicas()

    # ---- lifecycle ----
    def _start_replicas(self) -> None:
        ctx = mp.get_context("spawn")
        cores = split_cores(self.config.data_parallel_size)
        for rank, mine in enumerate(cores):
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            res_recv, res_send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=w.replica_main, name=f"nanoflow-dp{rank}", daemon=True,
                            args=(rank, w.replica_config(self.config, rank, mine), mine, cmd_recv, res_send))
            p.start()
            cmd_recv.close(), res_send.close()  # only the child holds these: its death closes the pipe
            self.replicas.append(Replica(rank, p, cmd_send, res_recv))
        infos = [self._wait_ready(r) for r in self.replicas]
        info = next((i for i in infos if i is not None), None)
        if info is None:
            raise RuntimeError("no data-parallel replica started")
        self.max_model_len = info.max_model_len
        sc = SchedulerConfig(max_model_len=info.max_model_len, block_size=info.block_size,
                             num_blocks=info.num_blocks, max_num_seqs=info.max_num_seqs)
        self.scheduler = SchedulerView(sc, self.replicas)  # read-only, for OpenAIServing and the server metrics
        self._router = PrefixAffinityRouter(info.block_size)
        self._checker = Scheduler(sc)  # the replicas' own fit check, run here so a bad request fails at once

    def _wait_ready(self, r: Replica) -> w.ReplicaInfo | None:
        try:
            msg = r.results.recv()
        except (EOFError, OSError):
            msg = w.Failed(r.rank, f"exit code {r.process.exitcode}")
        if isinstance(msg, w.Ready):
            return msg.info
        log.error("data-parallel replica %d failed to start: %s", r.rank, msg.error)
        r.alive = False
        return None

    def shutdown(self) -> None:
        for r in self.replicas:
            if r.alive:
                try:
                    r.commands.send(w.Shutdown())
                except OSError:
                    pass
        for r in self.replicas:
            r.process.join(timeout=10)
            if r.process.is_alive():
                r.process.terminate()
            r.alive = False

    # ---- requests in and out ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self._outstanding:
            raise ValueError(f"duplicate request id {request_id!r}")
        self._validate(prompt_token_ids, params)
        tokens = (len(prompt_token_ids) + params.max_tokens) * params.n
        o = _Outstanding(w.AddRequest(request_id, list(prompt_token_ids), params, prompt), tokens)
        self._outstanding[request_id] = o
        self._send(o)

    def abort_request(self, request_id: str) -> None:
        o = self._outstanding.pop(request_id, None)
        if o is not None and self.replicas[o.replica].alive:
            self.replicas[o.replica].load -= o.tokens
            self._try_send(self.replicas[o.replica], w.AbortRequest(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._outstanding or self._finished)

    def step(self) -> list[RequestOutput]:
        """Like LLMEngine.step: returns once every replica sent requests has stepped with them (else after the
        next step of any, at most a second); the requests finished meanwhile. So a group's leader has been
        computed before its followers are sent (stream.py)."""
        while True:
            live = {r.results: r for r in self.replicas if r.alive}
            if not live:
                raise RuntimeError("every data-parallel replica has died")
            behind = any(r.acked < r.sent for r in live.values())
            for conn in wait(list(live), timeout=1.0):
                r = live[conn]
                try:
                    while r.alive and conn.poll():
                        self._receive(r, conn.recv())
                except (EOFError, OSError):
                    self._died(r)
            if not behind or all(r.acked >= r.sent for r in self.replicas if r.alive):
                break
        out, self._finished = self._finished, []
        return out

    @property
    def stats(self):
        """The replicas' step statistics summed (their latest totals, since the last reset)."""
        total = self._empty_stats()
        for f in dataclasses.fields(total):
            base = getattr(self._stats_base, f.name)
            setattr(total, f.name, sum(getattr(r.stats, f.name) for r in self.replicas if r.stats) - base)
        return total

    @stats.setter
    def stats(self, value) -> None:
        """Assigning fresh StepStats (as bench offline does) resets the sums to zero."""
        self._stats_base = self._empty_stats()
        self._stats_base = self.stats

    # ---- internals ----
    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        logits_process.check_vocab(self.model_config.vocab_size, ids)
        if params.max_tokens is None:  # what LLMEngine.add_request does, here so the load estimate knows it
            params.max_tokens = max(1, self.max_model_len - len(ids))
        self._checker.check_fits(Request(list(ids), params))

    def _send(self, o: _Outstanding) -> None:
        while True:
            r, o.tokens = self._router.pick(self.replicas, o.msg.prompt_token_ids, o.full_tokens, o.msg.params.n)
            if self._try_send(r, o.msg):
                o.replica = r.rank
                r.load += o.tokens
                return

    def _try_send(self, r: Replica, msg) -> bool:
        try:
            r.commands.send(msg)
            r.sent += 1
            return True
        except OSError:  # broken pipe: the replica is gone
            self._died(r)
            return False

    def _receive(self, r: Replica, msg) -> None:
        if isinstance(msg, w.StepDone):
            r.stats, r.acked, r.snapshot = msg.stats, msg.applied, msg.snapshot
            for out in msg.outputs:
                o = self._outstanding.get(out.request_id)
                if o is None or o.replica != r.rank:  # aborted meanwhile
                    continue
                if out.finished:
                    del self._outstanding[out.request_id]
                    r.load -= o.tokens
                else:
                    o.streamed = True
                self._finished.append(out)
        elif isinstance(msg, w.Rejected) and msg.request_id in self._outstanding:
            o = self._outstanding.pop(msg.request_id)
            r.load -= o.tokens
            log.error("replica %d rejected request %s: %s", r.rank, msg.request_id, msg.message)
            self._finished.append(_aborted(o.msg))

    def _died(self, r: Replica) -> None:
        """Report the replica and re-run its unfinished requests on the others."""
        if not r.alive:
            return
        r.alive, r.load = False, 0
        r.process.join(timeout=5)
        todo = [o for o in self._outstanding.values() if o.replica == r.rank]
        log.warning("data-parallel replica %d (pid %s) died (exit code %s); re-running its %d unfinished "
                    "requests on the others", r.rank, r.process.pid, r.process.exitcode, len(todo))
        for o in todo:
            if o.streamed:  # its first tokens are already out: end it rather than send them twice
                del self._outstanding[o.msg.request_id]
                self._finished.append(_aborted(o.msg))
            else:
                self._send(o)


def _aborted(msg: w.AddRequest) -> RequestOutput:
    return RequestOutput(msg.request_id, msg.prompt, msg.prompt_token_ids, [CompletionOutput(0, "", [], "abort")],
                         finished=True)
