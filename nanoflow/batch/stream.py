"""Streaming admission for offline jobs: pull requests lazily from an iterable, keep the engine fed, yield each
result as it finishes.

Memory stays bounded by the look-ahead window (items pulled, and so tokenized, but not yet admitted) plus the
requests in the engine (`max_outstanding`); the engine's own waiting queue stays short so that the window's
order (shared-prefix groups, grouping.py) is the admission order.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator, Protocol

from tqdm.auto import tqdm

from nanoflow.batch.grouping import AdmissionWindow, prefix_key
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams

DEFAULT_LOOKAHEAD = 1024


@dataclass
class BatchItem:
    """One engine request of a job; `key` is the caller's (an input index, a custom_id ...)."""
    key: Hashable
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


class Engine(Protocol):
    """What the loop needs: LLMEngine and DataParallelEngine both have it."""
    config: object

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...


_ids = itertools.count()


def stream_outputs(engine: Engine, items: Iterable[BatchItem], *, lookahead: int = DEFAULT_LOOKAHEAD,
                   max_outstanding: int | None = None, grouping: bool | None = None,
                   on_reject: Callable[[Hashable, ValueError], None] | None = None,
                   bar: tqdm | None = None, count: bool = True) -> Iterator[tuple[Hashable, RequestOutput]]:
    """Yield (item.key, final output) as requests finish. A request the engine rejects raises ValueError, or
    goes to `on_reject` and the job goes on. `bar` shows generated tokens/s (and counts requests if `count`).
    Closing the generator aborts what is still running."""
    cfg = engine.config
    grouping = cfg.prefix_grouping if grouping is None else grouping
    max_outstanding = max_outstanding or 2 * cfg.max_num_seqs * cfg.data_parallel_size
    window: AdmissionWindow[BatchItem] = AdmissionWindow(grouping)
    source, exhausted = iter(items), False
    running: dict[str, Hashable] = {}
    t0, gen_tokens = time.perf_counter(), 0
    try:
        while True:
            while not exhausted and len(window) < lookahead:  # pulling is what reads/tokenizes the input
                item = next(source, None)
                if item is None:
                    exhausted = True
                else:
                    window.push(item, prefix_key(item.prompt_token_ids, cfg.block_size))
            _admit(engine, window, running, max_outstanding, on_reject)
            if not running:
                if exhausted and not window:
                    while engine.has_unfinished_requests():  # async: the last step in flight frees its KV
                        engine.step()
                    return
                continue
            for out in engine.step():
                if out.finished and out.request_id in running:
                    gen_tokens += sum(len(o.token_ids) for o in out.outputs)
                    if bar is not None:
                        bar.update(1 if count else 0)
                        bar.set_postfix_str(f"gen {gen_tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=False)
                    yield running.pop(out.request_id), out
    finally:  # interrupted or closed early: leave the engine clean
        for rid in running:
            engine.abort_request(rid)


def _admit(engine: Engine, window: AdmissionWindow[BatchItem], running: dict[str, Hashable], max_outstanding: int,
           on_reject: Callable[[Hashable, ValueError], None] | None) -> None:
    while window and len(running) < max_outstanding:
        item, leader = window.pop()
        rid = f"b{next(_ids)}"
        params = dataclasses.replace(item.params, output_kind="final_only")  # the engine's own copy
        try:
            engine.add_request(rid, item.prompt_token_ids, params, item.prompt)
        except ValueError as e:
            if on_reject is None:
                raise
            on_reject(item.key, e)
            continue
        running[rid] = item.key
        if leader:  # the rest of its group waits a step: then they hit the prefix it computes
            return
