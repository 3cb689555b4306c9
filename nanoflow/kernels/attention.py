"""Paged attention in plain torch (the CPU path and the reference for GPU kernels). Decode attention goes to
the C++ kernel on the CPU and to the Triton paged kernel on CUDA (torch fallback for shapes it does not take).

KV cache per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]. With `kv_packed` (the CPU default with
the C++ kernels, ModelRunner decides) the same bytes hold each block head by head in 4-byte units of P values (bf16:
P = 2, float32: P = 1), K as [num_kv_heads, head_dim / P, block_size, P] and V as [num_kv_heads, block_size / P,
head_dim, P]: the C++ kernel's dot products read 16 (bf16) or 8 (float32) slots' units of dims (K) or dims of a unit
of slots (V) as one vector, and each head's page is one stream (csrc/decode_common.h).
The step's tokens are laid out decode first (one token per request), prefill chunks last.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoflow.kernels import cpu_ext

log = logging.getLogger(__name__)


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the step's token batch
    q_len: int
    ctx_len: int  # tokens in KV after this chunk (prefix + chunk)
    block_table: torch.Tensor  # [num_blocks_of_request] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat KV slot of every token
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [num_decode]
    decode_max_len: int = 0
    prefills: list[PrefillChunk] = field(default_factory=list)
    kv_packed: bool = False  # the K and V pages' layout (module docstring)
    # attend_prefill_rows' inputs, built by the first layer and reused by the others (a step's metadata is the
    # same for every layer; keyed by the chunks, which hold their block tables alive)
    rows_inputs: dict = field(default_factory=dict, repr=False, compare=False)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             kv_packed: bool = False) -> None:
    _, nb, bs, h, d = kv_cache.shape
    if kv_packed and (ext := cpu_ext.get()) is not None and all(x.stride()[1:] == (d, 1) for x in (k, v)):
        ext.write_kv_packed(kv_cache, k, v, slot_mapping)
        return
    if kv_packed:
        p = _packed_unit(kv_cache)
        blk, off = slot_mapping // bs, slot_mapping % bs
        kv_cache[0].view(nb, h, d // p, bs, p)[blk, :, :, off] = k.view(-1, h, d // p, p)
        kv_cache[1].view(nb, h, bs // p, d, p)[blk, :, off // p, :, off % p] = v
        return
    kv_cache[0].view(nb * bs, h, d).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(nb * bs, h, d).index_copy_(0, slot_mapping, v)


def _packed_unit(kv_cache: torch.Tensor) -> int:
    """P, values per 4-byte unit of a packed page: 2 for bf16, 1 for float32."""
    return 4 // kv_cache.element_size()


def pack_kv(kv_cache: torch.Tensor) -> torch.Tensor:
    """A cache [2, nb, bs, H, D] of rows laid out packed (module docstring), same shape."""
    _, nb, bs, h, d = kv_cache.shape
    p = _packed_unit(kv_cache)
    k = kv_cache[0].view(nb, bs, h, d // p, p).permute(0, 2, 3, 1, 4)  # [nb, H, D/P, bs, P]
    v = kv_cache[1].view(nb, bs // p, p, h, d).permute(0, 3, 1, 4, 2)  # [nb, H, bs/P, D, P]
    return torch.stack([k.reshape(nb, bs, h, d), v.reshape(nb, bs, h, d)])


def attend_decode(out, q, kv_cache, meta: AttentionMetadata, scale: float) -> None:
    """The decode rows of `out` (NanoFlow's memory-bound operation)."""
    nd = meta.num_decode
    if nd:
        out[:nd] = decode_attention(q[:nd], kv_cache, meta.decode_block_tables,
                                    meta.decode_context_lens, meta.decode_max_len, scale, meta.kv_packed)


# A prefill row read through the paged kernel re-reads its context once per query row; that stays in L2 and
# beats SDPA per chunk (one call per step instead of one per chunk and layer, no gather of a cached prefix)
# while the context is short. Past this, SDPA's flash kernel wins (measured equal near 1024 tokens).
PAGED_PREFILL_MAX_CONTEXT = 1024


def attend_prefill(out, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, paged: bool = False) -> None:
    """The prefill rows of `out` (compute-bound). `paged` (the CPU default with the C++ kernels): chunks whose
    context fits PAGED_PREFILL_MAX_CONTEXT go through the paged kernel, all in one call."""
    chunks = meta.prefills
    if paged and chunks and q.device.type == "cpu" and cpu_ext.get() is not None:
        short = [p for p in chunks if p.ctx_len <= PAGED_PREFILL_MAX_CONTEXT]
        if short:
            attend_prefill_rows(out, q, kv_cache, short, scale, meta.kv_packed, meta.rows_inputs)
            chunks = [p for p in chunks if p.ctx_len > PAGED_PREFILL_MAX_CONTEXT]
    for p in chunks:
        rows = slice(p.q_start, p.q_start + p.q_len)
        out[rows] = prefill_attention(q[rows], k[rows], v[rows], kv_cache, p, scale, meta.kv_packed)


def attend_prefill_rows(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, chunks: list[PrefillChunk],
                        scale: float, kv_packed: bool = False, cache: dict | None = None) -> None:
    """Each prefill row of `chunks` as one decode-style query over the cache up to its own position (the
    chunk's KV is already written), all in one call: a row's result depends on nothing but its context, so
    neither batch-mates nor chunking change it. `cache` (AttentionMetadata.rows_inputs): the step's row
    tables, built once for all layers."""
    if not chunks:
        return
    key = tuple((p.q_start, p.q_len, p.ctx_len, id(p.block_table)) for p in chunks)
    inputs = cache.get(key) if cache is not None else None
    if inputs is None:
        inputs = _rows_inputs(chunks)
        if cache is not None:
            cache[key] = inputs
    rows, tables, lens = inputs
    out[rows] = rows_attention(q[rows], kv_cache, tables, lens, scale, kv_packed)


def _rows_inputs(chunks: list[PrefillChunk]):
    """(rows of the step, a block table per row, a context length per row) of the chunks' query rows."""
    width = max(p.block_table.shape[0] for p in chunks)
    tables, lens = [], []
    for p in chunks:
        table = F.pad(p.block_table, (0, width - p.block_table.shape[0]))  # the kernel reads only len's pages
        tables.append(table[None].expand(p.q_len, -1))
        lens.append(torch.arange(p.ctx_len - p.q_len + 1, p.ctx_len + 1))
    first, last = chunks[0].q_start, chunks[-1].q_start + chunks[-1].q_len
    contiguous = all(a.q_start + a.q_len == b.q_start for a, b in zip(chunks, chunks[1:]))
    rows = slice(first, last) if contiguous else \
        torch.cat([torch.arange(p.q_start, p.q_start + p.q_len) for p in chunks])
    return rows, torch.cat(tables), torch.cat(lens)


def step_rows_inputs(meta: AttentionMetadata, num_tokens: int):
    """(block tables, context lengths) of every row of a step as one paged query - the decode rows, then the
    prefill rows (attend_prefill_rows' inputs) - or None when a prefill chunk's context is past
    PAGED_PREFILL_MAX_CONTEXT or the chunks do not follow the decode rows one after another."""
    nd, chunks = meta.num_decode, meta.prefills
    if not chunks:
        return meta.decode_block_tables, meta.decode_context_lens
    if any(p.ctx_len > PAGED_PREFILL_MAX_CONTEXT for p in chunks) or chunks[0].q_start != nd \
            or chunks[-1].q_start + chunks[-1].q_len != num_tokens:
        return None
    rows, tables, lens = _rows_inputs(chunks)
    if not isinstance(rows, slice):
        return None
    if nd:
        width = max(tables.shape[1], meta.decode_block_tables.shape[1])
        pad = lambda t: F.pad(t, (0, width - t.shape[1]))  # (the kernel reads only len's pages)
        tables = torch.cat([pad(meta.decode_block_tables.to(tables.dtype)), pad(tables)])
        lens = torch.cat([meta.decode_context_lens.to(lens.dtype), lens])
    return tables, lens


def rows_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, scale: float, kv_packed: bool = False) -> torch.Tensor:
    """q [n, Hq, D], one query per row over context_lens[i] cached tokens of block_tables[i]."""
    ext = cpu_ext.get() if q.device.type == "cpu" else None
    if ext is not None:
        return ext.paged_decode(q, kv_cache[0], kv_cache[1], block_tables, context_lens, scale, kv_packed)
    out = torch.empty_like(q)
    for i, length in enumerate(context_lens.tolist()):  # one fixed-shape SDPA per row (the reference path)
        k, v = gather_kv(kv_cache, block_tables[i:i + 1], length, kv_packed)
        out[i] = F.scaled_dot_product_attention(q[i:i + 1, :, None], k, v, scale=scale,
                                                enable_gqa=q.shape[1] != k.shape[1])[0, :, 0]
    return out


def slice_metadata(meta: AttentionMetadata, start: int, end: int) -> AttentionMetadata:
    """The metadata of token rows [start, end) of the step, rows renumbered from 0 (a nano-batch).

    Decode rows come first, so a range holds a run of decode requests and parts of prefill chunks. A
    partial chunk becomes a chunk of its own whose prefix includes the chunk's earlier tokens: their KV
    must already be in the cache (the nano-op dependency rule for attention)."""
    nd = max(0, min(end, meta.num_decode) - start)
    out = AttentionMetadata(meta.slot_mapping[start:end], nd, kv_packed=meta.kv_packed)
    if nd:
        rows = slice(start, start + nd)
        out.decode_block_tables = meta.decode_block_tables[rows]
        out.decode_context_lens = meta.decode_context_lens[rows]
        out.decode_max_len = meta.decode_max_len  # an upper bound is enough (the torch path's gather width)
    for p in meta.prefills:
        s, e = max(start, p.q_start), min(end, p.q_start + p.q_len)
        if s < e:
            out.prefills.append(PrefillChunk(s - start, e - s, p.ctx_len - (p.q_start + p.q_len - e), p.block_table))
    return out


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int,
              packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_cache [2, nb, bs, H, D] (rows or `packed`), block_tables [B, n] -> K, V as [B, H, length, D]."""
    b, n = block_tables.shape
    _, nb, bs, h, d = kv_cache.shape
    if packed:
        p = _packed_unit(kv_cache)
        k = kv_cache[0].view(nb, h, d // p, bs, p)[block_tables].permute(0, 2, 1, 4, 3, 5)  # [B, H, n, bs, D/P, P]
        v = kv_cache[1].view(nb, h, bs // p, d, p)[block_tables].permute(0, 2, 1, 3, 5, 4)  # [B, H, n, bs/P, P, D]
        return k.reshape(b, h, n * bs, d)[:, :, :length], v.reshape(b, h, n * bs, d)[:, :, :length]
    k, v = (kv_cache[i][block_tables].view(b, n * bs, h, d)[:, :length].transpose(1, 2) for i in (0, 1))
    return k, v


def decode_attention(q, kv_cache, block_tables, context_lens, max_len: int, scale: float, kv_packed: bool = False):
    """One query per request against its whole paged context."""
    ext = cpu_ext.get() if q.device.type == "cpu" else None
    if ext is not None:  # reads the pages in place: no gathered copy of the context
        return ext.paged_decode(q, kv_cache[0], kv_cache[1], block_tables, context_lens, scale, kv_packed)
    if q.is_cuda and _triton_decode_fits(q, kv_cache):  # the GPU's in-place paged kernel
        from nanoflow.kernels.triton_attention import paged_decode_attention
        try:
            return paged_decode_attention(q, kv_cache, block_tables, context_lens, scale)
        except Exception as e:  # e.g. it does not compile for this GPU: the torch path still serves
            global _triton_failed
            _triton_failed = True
            log.warning("Triton decode attention failed (%s: %s); using the torch path", type(e).__name__, e)
    return decode_attention_torch(q, kv_cache, block_tables, context_lens, max_len, scale, kv_packed)


_triton_failed = False


def _triton_decode_fits(q, kv_cache) -> bool:
    """Triton is importable, has not failed, and the shapes suit the kernel (power-of-two head_dim, block_size)."""
    from nanoflow.kernels.triton_gemm import available
    d, bs = q.shape[-1], kv_cache.shape[2]
    return available() and not _triton_failed and not (d & (d - 1) or bs & (bs - 1))


def decode_attention_torch(q, kv_cache, block_tables, context_lens, max_len: int, scale: float,
                           kv_packed: bool = False):
    """Reference path: gather the pages, then masked SDPA."""
    k, v = gather_kv(kv_cache, block_tables, max_len, kv_packed)
    mask = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(2)


def prefill_attention(q, k, v, kv_cache, p: PrefillChunk, scale: float, kv_packed: bool = False):
    """Causal attention of a prompt chunk over its cached prefix plus itself."""
    prefix = p.ctx_len - p.q_len
    if prefix == 0:  # first chunk: the KV is exactly this chunk, no gather needed
        keys, values, causal, mask = k.transpose(0, 1), v.transpose(0, 1), True, None
    else:
        bt = p.block_table[None]
        keys, values = (x[0] for x in gather_kv(kv_cache, bt, p.ctx_len, kv_packed))
        pos_q = torch.arange(prefix, p.ctx_len, device=q.device)
        mask = torch.arange(p.ctx_len, device=q.device)[None, :] <= pos_q[:, None]
        causal = False
    # 4-D inputs: torch's CPU flash kernel (GQA-aware) only takes those; 3-D ones fall back to the
    # math path, which is 5-7x slower at bf16.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, is_causal=causal, scale=scale,
        enable_gqa=q.shape[1] != keys.shape[0])
    return out[0].transpose(0, 1)
