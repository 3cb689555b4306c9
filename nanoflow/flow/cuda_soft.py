"""Soft SM partitions: when green contexts are unavailable, a unit's GEMMs run as the SM-limited persistent
Triton GEMM (`kernels/triton_gemm.py`) and its decode attention as the bounded-grid paged kernel
(`kernels/triton_attention.py`), so each launches at most the unit's SM count of programs. The block scheduler
may still place them on any SM: a soft partition, as in the original NanoFlow artifact (fixed CTA counts).

Tested on the CPU under TRITON_INTERPRET=1 against `flow.ops.run_op`; not run on a GPU in this project.
"""
from __future__ import annotations

import torch

_GEMMS = {"qkv": ("self_attn", "qkv_proj", "hidden", "qkv"), "o_proj": ("self_attn", "o_proj", "attn_out", "hidden"),
          "down": ("mlp", "down_proj", "act", "hidden")}


def run_op_limited(model, layer_idx: int, op: str, state, start: int, end: int, num_sms: int | None) -> None:
    """`flow.ops.run_op` with GEMMs and decode attention on at most `num_sms` programs (soft SM partition);
    other ops, or `num_sms=None`, run the normal path."""
    from nanoflow.flow.ops import run_op
    from nanoflow.kernels.triton_attention import paged_decode_attention
    from nanoflow.kernels.triton_gemm import persistent_linear
    from nanoflow.models.layers import silu_and_mul
    if num_sms is None or start >= end or op not in (*_GEMMS, "gate_up", "decode_attn"):
        return run_op(model, layer_idx, op, state, start, end)
    layer = model.layers[layer_idx]
    if op == "decode_attn":
        attn, (meta, _) = layer.self_attn, state.rows(start, end)
        if meta.num_decode:
            q, _, _ = attn.split(state.qkv[start:end])
            out = state.attn_out[start:start + meta.num_decode].view(meta.num_decode, -1, attn.cfg.head_dim)
            paged_decode_attention(q[:meta.num_decode], state.kv_caches[layer_idx], meta.decode_block_tables,
                                   meta.decode_context_lens, attn.scale, num_programs=num_sms, out=out)
        return
    if op == "gate_up":
        y = silu_and_mul(persistent_linear(state.hidden[start:end], layer.mlp.gate_up_proj.weight, num_sms))
        return _put(state, "act", start, end, y)
    parent, name, src, dst = _GEMMS[op]
    lin = getattr(getattr(layer, parent), name)
    x = getattr(state, src)[start:end]
    if state.full(start, end):
        y = persistent_linear(x, lin.weight, num_sms)
    else:
        y = persistent_linear(x, lin.weight, num_sms, out=getattr(state, dst)[start:end])
    if lin.bias is not None:
        y += lin.bias
    _put(state, dst, start, end, y)


def _put(state, name: str, start: int, end: int, value: torch.Tensor) -> None:
    if state.full(start, end):
        setattr(state, name, value)
    elif value.data_ptr() != getattr(state, name)[start:end].data_ptr():
        getattr(state, name)[start:end].copy_(value)
