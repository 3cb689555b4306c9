"""The whole step in one CUDA graph: capture per step shape (`GraphKey`), then copy inputs into
static buffers and replay. Multi-stream capture works because `CudaUnits.run` forks from and joins back into
the capturing stream (PyTorch's "usage with multiple streams" rules); one launch then replaces the Python
launch loop over every nano-op of every layer.

NOT RUN ON A GPU in this project (no device was available); the keying and cache policy are unit-tested.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

from nanoflow.flow.executor import ExecutorWrapper
from nanoflow.kernels.attention import AttentionMetadata, PrefillChunk

log = logging.getLogger(__name__)


def plan_fingerprint(plan) -> str:
    """A short id of a plan's content (graphs captured under one plan are not valid under another)."""
    return hashlib.sha1(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GraphKey:
    """What a captured step depends on: the plan, the (padded) token count and the decode/prefill layout.

    Decode attention reads context lengths from a tensor (the Triton kernel), so decode lengths are not part
    of the key; prefill chunks unroll into per-chunk kernels, so their shapes are."""
    plan: str
    num_tokens: int
    num_decode: int
    prefill: tuple[tuple[int, int], ...]  # (q_len, ctx_len) per chunk
    decode_width: int  # block-table width (static buffer shape)


def graph_key(plan_id: str, num_tokens: int, num_decode: int, prefills, decode_width: int) -> GraphKey:
    """Key of a step's graph. The decode block-table width is padded to a multiple of 8 blocks (the static
    table is zero-filled beyond a request's pages), so growing contexts reuse one graph for 8 blocks."""
    return GraphKey(plan_id, num_tokens, num_decode, tuple((p.q_len, p.ctx_len) for p in prefills),
                    -(-decode_width // 8) * 8)


class GraphCache:
    """LRU of captured CUDA graphs (each with its static buffers); capture happens on a key's second sight,
    so one-off shapes (a rare prefill layout) run eagerly instead of paying a capture."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.graphs: OrderedDict[Hashable, object] = OrderedDict()
        self.seen: set[Hashable] = set()

    def get(self, key: Hashable):
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        return None

    def should_capture(self, key: Hashable) -> bool:
        if key in self.seen:
            return True
        self.seen.add(key)
        return False

    def put(self, key: Hashable, graph) -> None:
        self.graphs[key] = graph
        while len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata  # static tensors inside
    out: torch.Tensor

    def load(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        self.ids.copy_(ids, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.meta.slot_mapping.copy_(meta.slot_mapping, non_blocking=True)
        if meta.num_decode:
            w = meta.decode_block_tables.shape[1]
            self.meta.decode_block_tables.zero_()
            self.meta.decode_block_tables[:, :w].copy_(meta.decode_block_tables, non_blocking=True)
            self.meta.decode_context_lens.copy_(meta.decode_context_lens, non_blocking=True)
        for mine, theirs in zip(self.meta.prefills, meta.prefills):
            mine.block_table.copy_(theirs.block_table, non_blocking=True)


def _static_meta(meta: AttentionMetadata, key: GraphKey, block_size: int, device) -> AttentionMetadata:
    """Device copies of the metadata with the key's static shapes (decode tables padded to key width)."""
    out = AttentionMetadata(meta.slot_mapping.to(device).clone(), meta.num_decode)
    if meta.num_decode:
        out.decode_block_tables = torch.zeros(meta.num_decode, key.decode_width, dtype=torch.long, device=device)
        out.decode_context_lens = meta.decode_context_lens.to(device).clone()
        out.decode_max_len = key.decode_width * block_size  # upper bound: the torch path gathers this width
    out.prefills = [PrefillChunk(p.q_start, p.q_len, p.ctx_len, p.block_table.to(device).clone())
                    for p in meta.prefills]
    return out


class GraphedStep(ExecutorWrapper):
    """Wraps an executor (`executor(input_ids, positions, meta, kv_caches) -> hidden`) with CUDA-graph replay."""

    def __init__(self, executor, plan_id: str | None = None, capacity: int = 16) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a GPU: torch.cuda.is_available() is False")
        super().__init__(executor)
        self.disabled = False
        self.plan_id = plan_id or plan_fingerprint(executor.plan)
        self.cache = GraphCache(capacity)
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one memory pool

    def key(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> GraphKey:
        width = 0 if meta.decode_block_tables is None else meta.decode_block_tables.shape[1]
        return graph_key(self.plan_id, input_ids.shape[0], meta.num_decode, meta.prefills, width)

    def __call__(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        if self.executor.trace is not None:  # tracing times each nano-op: eager (a replay records nothing)
            return self.executor(input_ids, positions, meta, kv_caches)
        key = self.key(input_ids, meta)
        entry = None if self.disabled else self.cache.get(key)
        if entry is None:
            if self.disabled or not self.cache.should_capture(key):  # first sight: eager (warms up kernels)
                return self.executor(input_ids, positions, meta, kv_caches)
            try:
                entry = self._capture(key, input_ids, positions, meta, kv_caches)
            except Exception as e:  # an op that cannot be captured: say so once, run eagerly from now on
                log.warning("CUDA graph capture failed (%s: %s); running steps without graphs", type(e).__name__, e)
                self.disabled = True
                return self.executor(input_ids, positions, meta, kv_caches)
            self.cache.put(key, entry)
        entry.load(input_ids, positions, meta)
        entry.graph.replay()
        return entry.out

    def _capture(self, key, input_ids, positions, meta, kv_caches) -> _Captured:
        dev = kv_caches[0].device
        ids, pos = input_ids.to(dev).clone(), positions.to(dev).clone()
        smeta = _static_meta(meta, key, kv_caches[0].shape[2], dev)
        # Warm up on the static buffers first (PyTorch's capture rule): the padded decode table has another
        # stride than the eager run's, so Triton may specialise (compile, load) a new kernel, which must
        # not happen inside the capture. Idempotent: the same KV goes to the same slots.
        self.executor(ids, pos, smeta, kv_caches)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(dev)
        # thread_local: the KV tiers' offload thread may copy on its own stream while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.executor(ids, pos, smeta, kv_caches)
        entry = _Captured(graph, ids, pos, smeta, out)
        return entry
