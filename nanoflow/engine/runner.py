"""Model runner: owns weights and the paged KV cache, turns a ScheduledBatch into tensors and runs it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.engine.kv_tiers import scatter_blocks
from nanoflow.engine.sampler import SampleResult, Sampler
from nanoflow.engine.scheduler import ScheduledBatch
from nanoflow.flow.executor import make_executor
from nanoflow.kernels.attention import AttentionMetadata, PrefillChunk
from nanoflow.models.config import ModelConfig
from nanoflow.profiling import region


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor
    sample_reqs: list


def kv_cache_blocks(cfg: ModelConfig, dtype: torch.dtype, block_size: int, memory_gb: float) -> int:
    per_block = cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
    return max(1, int(memory_gb * (1 << 30)) // per_block)


class ModelRunner:
    def __init__(self, model, cfg: ModelConfig, dtype: torch.dtype, num_blocks: int, block_size: int,
                 seed: int = 0, executor: str = "sequential", plan: str | None = None, dense_batch: int = 256) -> None:
        self.model, self.cfg, self.dtype, self.block_size = model, cfg, dtype, block_size
        # How each step's layers run (nanoflow/flow): called like the model, returns the final hidden states.
        self.executor = make_executor(executor, plan, model, next(model.parameters()).device, dense_batch)
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.sampler = Sampler(seed)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        ids, pos, slots, sample_rows, sample_reqs = [], [], [], [], []
        bs = self.block_size
        for c in batch.chunks:
            table = c.req.block_table
            for p in range(c.start, c.start + c.num_tokens):
                ids.append(c.req.token_at(p))
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if c.samples:
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(c.req)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long))
        self._decode_meta(batch, meta)
        row = len(batch.decodes)
        for c in batch.prefills:
            ctx = c.start + c.num_tokens
            table = torch.tensor(c.req.block_table[: -(-ctx // bs)], dtype=torch.long)
            meta.prefills.append(PrefillChunk(row, c.num_tokens, ctx, table))
            row += c.num_tokens
        return StepInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), meta,
                          torch.tensor(sample_rows, dtype=torch.long), sample_reqs)

    def _decode_meta(self, batch: ScheduledBatch, meta: AttentionMetadata) -> None:
        if not batch.decodes:
            return
        lens = [c.start + 1 for c in batch.decodes]
        max_len = max(lens)
        width = -(-max_len // self.block_size)
        tables = [c.req.block_table[:width] + [0] * (width - min(width, len(c.req.block_table)))
                  for c in batch.decodes]
        meta.num_decode = len(batch.decodes)
        meta.decode_block_tables = torch.tensor(tables, dtype=torch.long)
        meta.decode_context_lens = torch.tensor(lens, dtype=torch.long)
        meta.decode_max_len = max_len

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list, SampleResult | None]:
        """Run one step; returns the requests that sampled and what they sampled."""
        for block_ids, staging in batch.kv_loads:  # KV reloaded from the host/disk tier, before it is read
            scatter_blocks(self.kv_caches, block_ids, staging)
        with region("nanoflow::prepare inputs"):
            inp = self.prepare(batch)
        hidden = self.executor(inp.input_ids, inp.positions, inp.meta, self.kv_caches)
        if not inp.sample_reqs:
            return [], None
        logits = self.model.compute_logits(hidden[inp.sample_rows])
        with region("nanoflow::sampling"):
            return inp.sample_reqs, self.sampler(logits, inp.sample_reqs)
