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

from nanoflow.kernels.attention import AttentionMetadata, attend_prefill_rows, rows_attention


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
        out[:nd] = rows_attention(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
                                  meta.kv_packed)


def attend_prefill(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float) -> None:
    """The prefill rows of `out`, each a decode-style query over the cache up to its own position, whatever
    the context length (the default path sends long contexts to SDPA)."""
    attend_prefill_rows(out, q, kv_cache, meta.prefills, scale, meta.kv_packed, meta.rows_inputs)
