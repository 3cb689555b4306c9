"""Paged decode attention in Triton with a bounded number of programs.

NanoFlow gives decode attention (memory-bound) a small SM share while a GEMM runs beside it. Here that share
is the grid: at most `num_programs` programs, each walking (request, kv-head) work items with stride
`num_programs`. One work item reads the request's KV pages in place (cache layout
[2, num_blocks, block_size, num_kv_heads, head_dim], as in `kernels/attention.py`) with an online softmax,
for all query heads of its GQA group at once, so each KV page is read once.

Tested against `decode_attention_torch` under `TRITON_INTERPRET=1` on small shapes.
"""
from __future__ import annotations

import torch

from nanoflow.kernels.triton_gemm import _IMPORT_ERROR, interpreting, tl, triton

if triton is not None:
    @triton.jit
    def _paged_decode_kernel(
            q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, lens_ptr, scale,
            num_items, num_programs, num_kv_heads, group,
            stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
            BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid = tl.program_id(axis=0)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_s = tl.arange(0, BLOCK_SIZE)
        h_mask = offs_h < group
        for item in tl.range(pid, num_items, num_programs):
            req = item // num_kv_heads
            kvh = item % num_kv_heads
            heads = kvh * group + offs_h
            q = tl.load(q_ptr + req * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=h_mask[:, None], other=0.0).to(tl.float32)
            ctx = tl.load(lens_ptr + req)
            m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_H, HEAD_DIM), dtype=tl.float32)
            for page in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
                block = tl.load(tables_ptr + req * stride_tb + page)
                pos = page * BLOCK_SIZE + offs_s
                s_mask = pos < ctx
                base = block * stride_kb + offs_s[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
                k = tl.load(k_ptr + base, mask=s_mask[:, None], other=0.0).to(tl.float32)
                v = tl.load(v_ptr + base, mask=s_mask[:, None], other=0.0).to(tl.float32)
                # [H, 1, D] * [1, S, D] summed over D: a GEMV per head, no tensor-core shape limits
                s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
                s = tl.where(s_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
                m_i = m_new
            out = acc / l_i[:, None]
            tl.store(o_ptr + req * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, num_programs: int | None = None,
                           out: torch.Tensor | None = None, num_warps: int = 4) -> torch.Tensor:
    """q [B, Hq, D]; kv_cache [2, nb, bs, Hkv, D]; block_tables [B, n]; context_lens [B] (all >= 1)."""
    if triton is None:
        raise RuntimeError(f"Triton is not available ({_IMPORT_ERROR}); use decode_attention_torch")
    b, hq, d = q.shape
    _, _, bs, hkv, d2 = kv_cache.shape
    if d != d2 or hq % hkv:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} does not fit cache {tuple(kv_cache.shape)}")
    if d & (d - 1) or bs & (bs - 1):
        raise ValueError(f"head_dim ({d}) and block_size ({bs}) must be powers of two")
    q = q.contiguous()  # before empty_like: the kernel assumes unit stride over head_dim in q and out
    if out is None:
        out = torch.empty_like(q)
    k, v = kv_cache[0], kv_cache[1]
    group = hq // hkv
    items = b * hkv
    if num_programs is None:
        num_programs = items
    grid = (max(1, min(num_programs, items)),)
    kwargs = {} if interpreting() else {"num_warps": num_warps}
    _paged_decode_kernel[grid](
        q, k, v, out, block_tables, context_lens, scale,
        items, grid[0], hkv, group,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_H=max(_next_pow2(group), 2), BLOCK_SIZE=bs, HEAD_DIM=d, **kwargs)
    return out
