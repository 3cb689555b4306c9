"""NanoFlow's dense-batch scheduler: a fixed token budget per step, decode first, chunked prefill fills
the rest; admission on predicted peak KV use; preemption by recompute. Pure Python, no tensors."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from nanoflow.engine.block_manager import BlockManager, blocks_needed
from nanoflow.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    dense_batch: int = 256  # tokens per step
    max_num_seqs: int = 256
    max_model_len: int = 2048
    block_size: int = 16
    num_blocks: int = 4096
    admission_control: bool = True
    prefix_caching: bool = False  # reuse cached full KV blocks (block_manager.py)
    cache_salt: bytes = b""  # what else changes the KV (model, dtype): part of every block hash
    contiguous_kv_blocks: bool = True  # a request's blocks next to each other (block_manager.py)

    @classmethod
    def from_engine_config(cls, config, max_model_len: int, num_blocks: int, cache_salt: bytes) -> "SchedulerConfig":
        """The scheduler's part of an EngineConfig, with the values the engine derives (context length, pool
        size, KV salt)."""
        return cls(dense_batch=config.dense_batch, max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
                   block_size=config.block_size, num_blocks=num_blocks, admission_control=config.admission_control,
                   prefix_caching=config.prefix_caching, cache_salt=cache_salt,
                   contiguous_kv_blocks=config.contiguous_kv_blocks)


@dataclass
class ScheduledChunk:
    req: Request
    start: int  # first token position computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The step ends at the newest token, so a next token is sampled (valid until the step launches)."""
        return self.start + self.num_tokens == self.req.num_tokens + self.req.num_output_placeholders


@dataclass
class ScheduledBatch:
    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    kv_loads: list = field(default_factory=list)  # (block ids, staging) reloaded from a KV tier before the step

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class RequestTooLong(ValueError):
    """A request that could never run; `param` names the field at fault: "prompt" or "max_tokens"."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_request_fits(num_prompt_tokens: int, max_tokens: int, max_model_len: int, block_size: int,
                       num_blocks: int) -> None:
    """The prompt leaves room for one token, prompt + max_tokens fits the context, and that many tokens of KV
    fit the whole pool; else RequestTooLong. The wording is vLLM's: clients match it."""
    n, ctx = num_prompt_tokens, max_model_len
    if n >= ctx:
        raise RequestTooLong(f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                             f"{n} tokens; please shorten it.", "prompt")
    total = n + max_tokens
    if total > ctx:
        raise RequestTooLong(f"This model's maximum context length is {ctx} tokens. However, your request has "
                             f"{n} input tokens plus {max_tokens} 'max_tokens' ({total} in total).", "max_tokens")
    if blocks_needed(total, block_size) > num_blocks:
        raise RequestTooLong(f"the request needs {total} tokens of KV cache but the pool holds only "
                             f"{num_blocks * block_size}", "max_tokens")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_tiers=None,
                 kv_fence: Callable[[Request], None] | None = None) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.prefix_caching,
                                          config.cache_salt, config.contiguous_kv_blocks)
        self.kv_tiers = kv_tiers  # host/disk KV tiers (kv_tiers.KVTiers) or None
        self.num_prefix_hit_tokens = 0  # prompt tokens reused from device blocks
        self.num_tier_hit_tokens = 0  # prompt tokens reloaded from the host/disk tiers
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._avg_output_len: float | None = None  # learned from finished requests
        # Async scheduling: called before a running request's KV is freed by preemption, so that a step in
        # flight that still writes those blocks completes first (the engine waits for it).
        self.kv_fence = kv_fence

    def check_fits(self, req: Request) -> None:
        """Reject up front what could never run, instead of letting it wait forever."""
        c = self.config
        check_request_fits(req.num_prompt_tokens, req.params.max_tokens or 0, c.max_model_len, c.block_size,
                           c.num_blocks)

    def add(self, req: Request) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """End the request: it leaves the queues. Its KV stays until free_kv(): under async scheduling a step
        in flight may still write it, so the engine frees it once that step has completed."""
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if reason != "abort":
            n = len(req.output_token_ids)
            self._avg_output_len = n if self._avg_output_len is None else 0.9 * self._avg_output_len + 0.1 * n

    def free_kv(self, req: Request) -> None:
        """Offload (KV tiers) and free a finished request's blocks."""
        if self.kv_tiers is not None and req.finish_reason != "abort":
            self._offload(req)
        self.block_manager.free(req)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._between_steps()
        while True:
            budget = self._schedule_decodes(batch, self.config.dense_batch)
            budget = self._schedule_running_prefills(batch, budget)
            self._admit_waiting(batch, budget)
            if batch or not self.running or any(r.num_output_placeholders for r in self.running):
                break  # (a step in flight will change things: no need to preempt)
            # Every running request is a half-done prefill that cannot grow: free the newest.
            self._preempt(self.running[-1], batch)
        for chunk in batch.chunks:  # optimistic: KV for these tokens exists once the step runs
            chunk.req.num_computed_tokens += chunk.num_tokens
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.in_prefill or self._reached_limit(req):
                i += 1
                continue
            while not self.block_manager.grow(req, 1):
                if self._reclaim_offloaded(wait=True):
                    continue  # blocks pinned for a KV copy came back: no need to preempt
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.decodes.append(ScheduledChunk(req, req.num_computed_tokens, 1))
                budget -= 1
                i += 1
        return budget

    def _reached_limit(self, req: Request) -> bool:
        """A token in flight (async) already takes the request to max_tokens or the context length: a step
        more would compute a token that is thrown away. The engine finishes it when the token is read."""
        if not req.num_output_placeholders:
            return False
        total = req.num_tokens + req.num_output_placeholders
        max_tokens = req.params.max_tokens
        return (max_tokens is not None and total - req.num_prompt_tokens >= max_tokens) \
            or total >= self.config.max_model_len

    def _schedule_running_prefills(self, batch: ScheduledBatch, budget: int) -> int:
        for req in list(self.running):
            if budget <= 0:
                break
            if req.in_prefill and req.status == RequestStatus.RUNNING:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self.block_manager.grow(req, n):
                    break
                batch.prefills.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_output_placeholders:  # preempted while its token was in flight: prefill once it is known
                break
            hits = self.block_manager.match_prefix(req)
            if self.running and not self._fits_predicted_peak(req, hits):
                break
            n = self._allocate_prefix(req, hits, budget, batch)
            if n is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.prefills.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n

    def _predicted_peak_blocks(self, req: Request) -> int:
        max_out = req.params.max_tokens or (self.config.max_model_len - req.num_prompt_tokens)
        guess = max_out if self._avg_output_len is None else min(max_out, int(self._avg_output_len) + 1)
        out = max(len(req.output_token_ids) + 1, guess)
        return blocks_needed(req.num_prompt_tokens + out, self.config.block_size)

    def _fits_predicted_peak(self, req: Request, hits: list[int]) -> bool:
        if not self.config.admission_control:
            return True
        bm = self.block_manager
        used = sum(self._predicted_peak_blocks(r) for r in self.running)
        # A block shared by several running requests is counted once; so is a hit on a block in use.
        shared = max(0, sum(len(r.block_table) for r in self.running) - bm.num_used_blocks)
        new = self._predicted_peak_blocks(req) - sum(1 for b in hits if bm.ref_counts[b] > 0)
        return used - shared + new <= self.config.num_blocks

    # ---- prefix cache and KV tiers ----
    def _allocate_prefix(self, req: Request, hits: list[int], budget: int, batch: ScheduledBatch) -> int | None:
        """Take the cached prefix, reload the blocks a KV tier holds after it, allocate the rest. Returns the
        number of tokens to compute this step, or None if memory is short."""
        bm, bs = self.block_manager, self.config.block_size
        tier_hashes = req.block_hashes[len(hits):bm.max_reusable_blocks(req)] if self.kv_tiers else []
        num_load = self.kv_tiers.count_prefix(tier_hashes) if tier_hashes else 0
        start = (len(hits) + num_load) * bs
        if not bm.allocate_with_prefix(req, hits, num_load, min(req.num_tokens - start, budget)):
            return None
        if num_load:
            staging, loaded = self.kv_tiers.fetch(tier_hashes[:num_load])  # fewer: a block vanished or was corrupt
            if loaded < num_load:  # compute the rest instead; give back the blocks that are now surplus
                start = (len(hits) + loaded) * bs
                keep = blocks_needed(start + min(req.num_tokens - start, budget), bs)
                while len(req.block_table) > keep:
                    bm.release(req.block_table.pop())
            if loaded:
                batch.kv_loads.append((req.block_table[len(hits):len(hits) + loaded], staging))
            self.num_tier_hit_tokens += loaded * bs
        self.num_prefix_hit_tokens += len(hits) * bs
        req.num_computed_tokens = start
        return min(req.num_tokens - start, budget)

    def _between_steps(self) -> None:
        """Blocks computed by launched steps join the prefix cache (only now: a block is never hit before the
        step writing it was launched); blocks whose copy to the host tier finished are unpinned."""
        self._reclaim_offloaded(wait=False)
        if self.config.prefix_caching:
            for req in self.running:
                self.block_manager.cache_full_blocks(req)

    def _offload(self, req: Request, now: bool = False) -> None:
        """Copy a finished request's cached blocks to the host tier in the background, pinned meanwhile;
        now=True (preemption: the memory is needed at once) copies them before returning."""
        bm = self.block_manager
        bm.cache_full_blocks(req)
        todo = [(h, b) for b in req.block_table[:req.num_cached_blocks]
                if (h := bm.cached_hash(b)) is not None and self.kv_tiers.wants(h)]
        if now:
            if todo:
                self.kv_tiers.store_now(todo)
            return
        for _, b in todo:
            bm.add_ref(b)
        if todo:
            self.kv_tiers.offload(todo)

    def _reclaim_offloaded(self, wait: bool) -> bool:
        if self.kv_tiers is None:
            return False
        done = self.kv_tiers.completed(wait=wait)
        for b in done:
            self.block_manager.release(b)
        return bool(done)

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        """Free the request's KV and send it back to the front of the queue; it recomputes later."""
        self.running.remove(req)
        if self.kv_fence is not None:
            self.kv_fence(req)
        if self.kv_tiers is not None:  # swap out instead of recompute: copying a block beats recomputing it
            self._offload(req, now=True)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        batch.preempted.append(req)
