"""Batch-invariant mode (`--batch-invariant`, vLLM's VLLM_BATCH_INVARIANT): a token's logits, and so greedy
output, do not depend on its batch-mates, the executor's nano-batch split, the thread count, or how its
prompt was chunked. Every reduction runs in an order fixed by the row alone:

- GEMMs (every Linear and the LM head): fixed row tiles (`models.layers.tiled_linear`): oneDNN/MKL choose
  their blocking by M, so every call has the same M.
- Attention: every query row, prefill or decode, is one "decode" query of the paged C++ kernel over its own
  context (position + 1 tokens), read page by page in order. Its work items are a request or (request, kv
  head), and a head's sums are the same either way, so neither the batch nor the chunking changes them.
  Without the C++ kernels (or off the CPU) each row is one SDPA call over exactly its context (slow).
- RMSNorm (C++ or torch), RoPE, SiLU, argmax: per-row loops whose order does not depend on the row count
  (checked in tests/test_batch_invariant.py).

Off by default: GEMMs pay for padding and for 64-row calls, prefill attention reads the KV once per query
row instead of once per chunk (cost in docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoflow.kernels import cpu_ext
from nanoflow.kernels.attention import AttentionMetadata, _gather


def enable(model) -> None:
    """Switch a model (LlamaForCausalLM) to batch-invariant kernels. CPU only: the CUDA path (Triton decode,
    CUDA graphs) is not made invariant."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--batch-invariant is implemented for the CPU only")
    from nanoflow.models.layers import Linear
    model.batch_invariant = True
    for module in model.modules():
        if isinstance(module, Linear):
            module.batch_invariant = True


def attend_decode(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float) -> None:
    """The decode rows of `out`: each request's query over its context."""
    nd = meta.num_decode
    if nd:
        out[:nd] = rows_attention(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_context_lens, scale)


def attend_prefill(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float) -> None:
    """The prefill rows of `out`, each a decode-style query over the cache up to its own position (the
    chunk's KV is already written), all chunks in one call."""
    if not meta.prefills:
        return
    width = max(p.block_table.shape[0] for p in meta.prefills)
    tables, lens = [], []
    for p in meta.prefills:
        table = F.pad(p.block_table, (0, width - p.block_table.shape[0]))  # the kernel reads only len's pages
        tables.append(table[None].expand(p.q_len, -1))
        lens.append(torch.arange(p.ctx_len - p.q_len + 1, p.ctx_len + 1))
    first, last = meta.prefills[0].q_start, meta.prefills[-1].q_start + meta.prefills[-1].q_len
    rows = torch.cat([torch.arange(p.q_start, p.q_start + p.q_len) for p in meta.prefills])
    res = rows_attention(q[rows], kv_cache, torch.cat(tables), torch.cat(lens), scale)
    if rows.shape[0] == last - first:  # chunks are contiguous (always, as the runner lays them out)
        out[first:last] = res
    else:
        out[rows] = res


def rows_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hq, D], one query per row over context_lens[i] cached tokens of block_tables[i]."""
    ext = cpu_ext.get() if q.device.type == "cpu" else None
    if ext is not None:
        return ext.paged_decode(q, kv_cache[0], kv_cache[1], block_tables, context_lens, scale)
    out = torch.empty_like(q)
    for i, length in enumerate(context_lens.tolist()):  # one fixed-shape SDPA per row (the reference path)
        k = _gather(kv_cache[0], block_tables[i:i + 1], length)
        v = _gather(kv_cache[1], block_tables[i:i + 1], length)
        out[i] = F.scaled_dot_product_attention(q[i:i + 1, :, None], k, v, scale=scale,
                                                enable_gqa=q.shape[1] != k.shape[1])[0, :, 0]
    return out
