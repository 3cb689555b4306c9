"""Model runner: owns weights and the paged KV cache, turns a ScheduledBatch into tensors and runs it."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from nanoflow.engine.kv_tiers import scatter_blocks
from nanoflow.engine.prompt_logprobs import PromptLogprobRows
from nanoflow.engine.sampler import SampleResult, SampleRow, Sampler
from nanoflow.engine.scheduler import ScheduledBatch
from nanoflow.engine.transfer import host_to_device
from nanoflow.flow.executor import make_executor
from nanoflow.kernels import cpu_ext, host_memory
from nanoflow.kernels.attention import AttentionMetadata, PrefillChunk
from nanoflow.models.config import ModelConfig
from nanoflow.profiling import region


@dataclass
class StepInputs:
    """Everything the device work of one step reads, built on the scheduling thread. A snapshot: in async mode
    the step runs on a worker thread while the engine goes on mutating the Requests."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the step's hidden states that go to the LM head and sample
    sample_reqs: list  # for the engine only; the device side reads `sampling_rows`
    sampling_rows: list[SampleRow] = field(default_factory=list)
    step_id: int = 0
    # Rows whose input token was sampled by the previous step and is not known on the CPU yet (async):
    # the worker copies them from that step's sampled-token tensor (indices `fill_src`) without a round trip.
    fill_rows: torch.Tensor | None = None
    fill_src: torch.Tensor | None = None
    kv_loads: list = field(default_factory=list)  # (block ids, staging) reloaded from a KV tier before the step
    prompt_lp: PromptLogprobRows | None = None  # prompt rows that also go to the LM head (prompt logprobs)


def kv_cache_blocks(cfg: ModelConfig, dtype: torch.dtype, block_size: int, memory_gb: float,
                    tp_size: int = 1) -> int:
    """Blocks of a `memory_gb` KV pool on each device (under TP: the rank holding the most KV heads)."""
    if tp_size > 1:
        from nanoflow.distributed.shard import TPShard
        cfg = TPShard.of(cfg, 0, tp_size).local_config(cfg)  # rank 0 has the most KV heads (uneven splits)
    per_block = cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * block_size
    return max(1, int(memory_gb * (1 << 30)) // per_block)


def build_model_for(config, model_config: ModelConfig, tp_group=None):
    """The model as an engine with `config` runs it (this rank's shard under TP, joined to `tp_group`), on its
    device: C++ kernels loaded and GEMM weights prepacked where they apply."""
    from nanoflow.models.layers import gemm_panels_supported, packed_gemm_supported
    from nanoflow.models.loader import build_model, parse_dtype, resolve_model
    dtype = parse_dtype(config.dtype)
    shard = tp_group.shard if tp_group is not None else None
    model = build_model(resolve_model(config.model), model_config, dtype, seed=config.seed, device=config.device,
                        shard=shard)
    model.tp = tp_group
    if torch.device(config.device).type == "cpu" and config.cpp_kernels:
        cpu_ext.get()  # build/load the C++ kernels now, not inside the first step (TP: before the ranks' barrier)
        model.paged_prefill = config.paged_prefill
    on_cpu = torch.device(config.device).type == "cpu"
    panels = on_cpu and config.cpp_kernels and config.cpp_gemm and gemm_panels_supported(dtype)
    if config.packed_gemm and (panels or packed_gemm_supported(dtype, config.device)) and _room_for_packed(model):
        # (batch-invariant mode keeps gate/up unfused: its GEMMs go through Linear in fixed row tiles)
        model.prepack_linears(config.dense_batch, "panels" if panels else "onednn", not config.batch_invariant)
    if config.batch_invariant:
        from nanoflow.kernels import batch_invariant
        batch_invariant.enable(model)
    return model


def _room_for_packed(model) -> bool:
    """The packed weights are a second copy: only when it leaves half the machine's memory free (an 8B model
    in bf16 on a 24 GB machine keeps F.linear)."""
    import logging
    import psutil
    extra = sum(p.numel() * p.element_size() for p in model.parameters())
    if extra < psutil.virtual_memory().available / 2:
        return True
    logging.getLogger(__name__).warning("not packing GEMM weights for oneDNN: a second copy (%.1f GB) would not "
                                        "leave half the free memory", extra / 2**30)
    return False


class ModelRunner:
    def __init__(self, config, model_config: ModelConfig, num_blocks: int, tp_group=None) -> None:
        """The model for an EngineConfig (build_model_for: this rank's shard under TP), its KV pool of
        `num_blocks` blocks, its sampler and its executor."""
        from nanoflow.models.loader import parse_dtype
        self.model = build_model_for(config, model_config, tp_group)
        self.cfg, self.dtype, self.block_size = self.model.cfg, parse_dtype(config.dtype), config.block_size
        self.device = next(self.model.parameters()).device
        self.tp = tp_group  # tensor parallelism: rank 0 sends each step to the workers and samples
        self.cpp_kernels = config.cpp_kernels  # this engine's C++ CPU kernel switch (every step runs under it)
        self.fused_greedy_head = config.fused_greedy_head  # plain greedy steps: LM head + argmax in one kernel
        # How each step's layers run (nanoflow/flow): called like the model, returns the final hidden states.
        self.executor = make_executor(config.executor, config.plan, self.model, self.device, config.dense_batch,
                                      config.cpp_kernels and config.cpp_layer_stack)
        shape = (2, num_blocks, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        self.kv_caches = [host_memory.zeros(shape, self.dtype) if self.device.type == "cpu"
                          else torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.cfg.num_layers)]
        self.kv_packed = self._packs_kv(config)
        self.sampler = Sampler(config.seed, self.device)
        self._step_id = 0
        self._prev_rows: dict[str, int] = {}  # request id -> its row in the last prepared step's samples
        self._prev_tokens: torch.Tensor | None = None  # last run step's sampled tokens (device side)
        self._ran_step = 0
        self.stream = None  # CUDA: steps run on their own stream, in launch order
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            # The weights and the zeroed KV pool were written on the default stream: order the steps after them.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _packs_kv(self, config) -> bool:
        """K and V pages in the packed layout (attention.py): a CPU, bf16 (a build with AVX512-BF16) or float32
        (AVX2), the C++ kernels on and taking this head_dim / block size / GQA ratio, and not switched off."""
        if not (config.packed_kv_cache and config.cpp_kernels and self.device.type == "cpu"
                and self.dtype in (torch.bfloat16, torch.float32)):
            return False
        with cpu_ext.switched(True):
            ext = cpu_ext.get()
        c = self.cfg
        return ext is not None and ext.packed_kv_supported(c.head_dim, self.block_size, c.num_heads // c.num_kv_heads,
                                                           self.dtype.itemsize)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Host side of a step (scheduling thread): token ids, positions, slots, block tables, sampling rows."""
        ids, pos, slots, fill_rows, fill_src = [], [], [], [], []
        sample_indices, sample_reqs, sampling_rows = [], [], []
        prompt_lp = PromptLogprobRows()
        bs = self.block_size
        for c in batch.chunks:
            req, table = c.req, c.req.block_table
            known = req.num_tokens
            for p in range(c.start, c.start + c.num_tokens):
                if p >= known:  # sampled by the step in flight: comes from its token tensor on the device
                    assert p == known and c.num_tokens == 1, "only a decode row may wait for an in-flight token"
                    fill_rows.append(len(ids))
                    fill_src.append(self._prev_rows[req.request_id])
                ids.append(req.token_at(p) if p < known else 0)
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if req.params.prompt_logprobs is not None:
                prompt_lp.add(req, c.start, c.num_tokens, len(ids) - c.num_tokens)
            if c.samples:
                row = len(ids) - 1
                sample_indices.append(row)
                sample_reqs.append(req)
                sampling_rows.append(SampleRow.of(req, row if fill_rows and fill_rows[-1] == row else -1))
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long), kv_packed=self.kv_packed)
        self._decode_meta(batch, meta)
        row = len(batch.decodes)
        for c in batch.prefills:
            ctx = c.start + c.num_tokens
            table = torch.tensor(c.req.block_table[: -(-ctx // bs)], dtype=torch.long)
            meta.prefills.append(PrefillChunk(row, c.num_tokens, ctx, table))
            row += c.num_tokens
        self._step_id += 1
        self._prev_rows = {r.request_id: i for i, r in enumerate(sample_reqs)}
        fill = (torch.tensor(fill_rows, dtype=torch.long), torch.tensor(fill_src, dtype=torch.long)) if fill_rows \
            else (None, None)
        return StepInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), meta,
                          torch.tensor(sample_indices, dtype=torch.long), sample_reqs, sampling_rows, self._step_id,
                          *fill, kv_loads=list(batch.kv_loads), prompt_lp=prompt_lp or None)

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

    @torch.inference_mode()  # thread-local: set here too, since the async worker thread calls run() directly
    def run(self, inp: StepInputs) -> SampleResult | None:
        """Device side of a step: forward + sampling. Steps run strictly in the order they were prepared (one
        worker thread / one CUDA stream), so a step may read tokens and KV that the previous one writes."""
        # Fill rows index the previous step's tokens: that step must be the one that ran just before.
        assert inp.fill_rows is None or inp.step_id == self._ran_step + 1, "steps ran out of order"
        self._ran_step = inp.step_id
        if self.tp is not None and self.tp.rank == 0:
            self.tp.post_step(_for_workers(inp))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext(), \
                cpu_ext.switched(self.cpp_kernels):
            if self.device.type != "cpu":
                _to_device(inp, self.device)
            for blocks, staging in inp.kv_loads:  # in step order, before the step reads those pages
                scatter_blocks(self.kv_caches, blocks, staging)
            if inp.fill_rows is not None:
                inp.input_ids[inp.fill_rows] = self._prev_tokens[inp.fill_src]
            hidden = self.executor(inp.input_ids, inp.positions, inp.meta, self.kv_caches)
            if inp.prompt_lp is not None:
                inp.prompt_lp.compute(self.model, hidden)
            if not len(inp.sample_indices):
                self._prev_tokens = None
                return None
            if self.fused_greedy_head and Sampler.plain_greedy(inp.sampling_rows):
                tokens = self.model.greedy_tokens(hidden[inp.sample_indices])  # None: no panel-packed head
                if tokens is not None:
                    self._prev_tokens = tokens
                    return SampleResult(tokens, [None] * len(inp.sampling_rows))
            logits = self.model.compute_logits(hidden[inp.sample_indices])
            if logits is None:  # a tensor-parallel worker: rank 0 samples, the tokens come from there
                self._prev_tokens = self.tp.broadcast_tokens(None, len(inp.sample_indices))
                return None
            with region("nanoflow::sampling"):
                result = self.sampler(logits, inp.sampling_rows, inp.input_ids)
            self._prev_tokens = result.tokens
            if self.tp is not None:
                self.tp.broadcast_tokens(result.tokens, len(inp.sample_indices))
            if self.stream is not None:  # tokens go up through pinned memory; the engine waits on the event
                result.host_tokens = torch.empty(result.tokens.shape, dtype=result.tokens.dtype, pin_memory=True)
                result.host_tokens.copy_(result.tokens, non_blocking=True)
                result.ready = torch.cuda.Event()
                result.ready.record(self.stream)
            return result


def _for_workers(inp: StepInputs) -> StepInputs:
    """What tensor-parallel workers need of a step: the tensors, without the engine's Requests (rank 0 samples)."""
    lp = dataclasses.replace(inp.prompt_lp, owners=[]) if inp.prompt_lp is not None else None
    return dataclasses.replace(inp, sample_reqs=[], sampling_rows=[], prompt_lp=lp)


def _to_device(inp: StepInputs, device: torch.device) -> None:
    """Host-built step tensors to the device (non-blocking: ordered on the step's stream)."""
    def mv(t):
        return None if t is None else host_to_device(t, device)
    inp.input_ids, inp.positions = mv(inp.input_ids), mv(inp.positions)
    inp.sample_indices = mv(inp.sample_indices)
    inp.fill_rows, inp.fill_src = mv(inp.fill_rows), mv(inp.fill_src)
    m = inp.meta
    m.slot_mapping, m.decode_block_tables = mv(m.slot_mapping), mv(m.decode_block_tables)
    m.decode_context_lens = mv(m.decode_context_lens)
    for p in m.prefills:
        p.block_table = mv(p.block_table)
