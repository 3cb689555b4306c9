"""The decoder layer as NanoFlow operations, and a per-step state they run on in place.

An `Operation` has a name, a resource kind (compute / memory / network / other) and the step buffers it reads
and writes; the dependencies of nano-operations (an operation on a token range) follow from those
(`nanoflow/flow/plan.py`). `run_op` applies one operation to token rows [start, end) of a `StepState` with the
layer's own modules. This is the only forward: `LlamaForCausalLM.forward` runs these operations in order on the
whole step (what the sequential executor does), nano-batch executors run them on token ranges.

Under tensor parallelism (`tp_size > 1`) the row-parallel o_proj and down produce partial sums: each is followed
by an all-reduce of kind `network` over the same rows, so a plan can overlap one nano-batch's all-reduce with
another's GEMMs.

Buffers (all [T, ...] rows of the step, decode tokens first, prefill last):
  hidden    layer input; normalised in place by attn_norm / ffn_norm; o_proj and down write it
  residual  the residual stream (fused add + RMSNorm)
  qkv       fused projection output; rope_append rotates q/k in place and writes K/V to kv_cache
  attn_out.decode / attn_out.prefill   two names for disjoint row sets of one [T, q_size] buffer, so decode
            and prefill attention of the same rows do not depend on each other
  act       silu(gate) * up
  kv_cache  this layer's paged cache (prefill attention of a partial chunk reads the KV of the chunk's
            earlier tokens, written by rope_append of earlier ranges)

Design note: a range covering the whole step stores results by rebinding the buffer (no copy), so one
nano-batch costs what the plain forward costs; partial ranges write rows of preallocated buffers (GEMMs
through `mm(..., out=rows)`, no extra copy); an all-reduce sums rows in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.kernels import batch_invariant
from nanoflow.kernels.attention import AttentionMetadata, attend_decode, attend_prefill, slice_metadata
from nanoflow.models.layers import packed_linear, tiled_linear

KINDS = ("compute", "memory", "network", "other")


@dataclass(frozen=True)
class Operation:
    name: str
    kind: str  # "compute" | "memory" | "network" | "other"
    reads: tuple[str, ...]
    writes: tuple[str, ...]


_ATTN = ("attn_out.decode", "attn_out.prefill")
LAYER_OPERATIONS = (
    Operation("attn_norm", "other", ("hidden", "residual"), ("hidden", "residual")),
    Operation("qkv", "compute", ("hidden",), ("qkv",)),
    Operation("rope_append", "other", ("qkv",), ("qkv", "kv_cache")),
    Operation("decode_attn", "memory", ("qkv", "kv_cache"), ("attn_out.decode",)),
    Operation("prefill_attn", "compute", ("qkv", "kv_cache"), ("attn_out.prefill",)),
    Operation("o_proj", "compute", _ATTN, ("hidden",)),
    Operation("ffn_norm", "other", ("hidden", "residual"), ("hidden", "residual")),
    Operation("gate_up", "compute", ("hidden",), ("act",)),  # includes silu(gate) * up
    Operation("down", "compute", ("act",), ("hidden",)),
)
# Tensor parallelism: the partial sums of the row-parallel GEMM before them, summed over the ranks.
ALL_REDUCES = {"o_proj": Operation("attn_all_reduce", "network", ("hidden",), ("hidden",)),
               "down": Operation("mlp_all_reduce", "network", ("hidden",), ("hidden",))}


def layer_operations(tp_size: int = 1) -> list[Operation]:
    """The operations of one decoder layer, in order; with `tp_size > 1` an all-reduce after o_proj and down."""
    ops = []
    for op in LAYER_OPERATIONS:
        ops.append(op)
        if tp_size > 1 and op.name in ALL_REDUCES:
            ops.append(ALL_REDUCES[op.name])
    return ops


class StepState:
    """One step's buffers for T tokens, built once per step. `split=True` preallocates every buffer so
    nano-operations on partial ranges (possibly on several threads) write rows in place."""

    def __init__(self, model, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches, split: bool = False) -> None:
        self.model, self.meta, self.kv_caches = model, meta, kv_caches
        self.hidden = model.embed(input_ids)
        self.num_tokens = t = self.hidden.shape[0]
        self.rope = model.rope.prepare(positions, self.hidden.dtype)
        self.residual = self.qkv = self.act = None
        cfg, new = model.cfg, (lambda n: self.hidden.new_empty(t, n))
        self.attn_out = new(cfg.q_size)  # decode and prefill attention each fill their rows
        if split:
            self.residual, self.qkv, self.act = new(cfg.hidden_size), new(cfg.q_size + 2 * cfg.kv_size), \
                new(cfg.intermediate_size)
        self._slices: dict[tuple[int, int], tuple] = {}

    def rows(self, start: int, end: int):
        """(metadata, rope inputs) of a token range, computed once per step (dict writes are atomic)."""
        key = (start, end)
        if key not in self._slices:
            self._slices[key] = (slice_metadata(self.meta, start, end), self.rope.rows(start, end))
        return self._slices[key]

    def full(self, start: int, end: int) -> bool:
        return start == 0 and end == self.num_tokens


def _store(state: StepState, name: str, start: int, end: int, value: torch.Tensor) -> None:
    if state.full(start, end):
        setattr(state, name, value)
    else:
        getattr(state, name)[start:end].copy_(value)


def _linear_into(state: StepState, name: str, start: int, end: int, linear, x: torch.Tensor) -> None:
    """y = linear(x) into rows of a buffer: rebinding on the full range, GEMM straight into the rows otherwise."""
    if state.full(start, end):
        setattr(state, name, linear(x))
    elif linear.batch_invariant:
        tiled_linear(x, linear.weight, linear.bias, linear.packed, out=getattr(state, name)[start:end])
    elif linear.packed is not None and linear.packed.kind == "panels":  # straight into the rows
        packed_linear(x, linear.packed, linear.bias, out=getattr(state, name)[start:end])
    elif linear.bias is None:
        torch.mm(x, linear.weight.t(), out=getattr(state, name)[start:end])
    else:
        torch.addmm(linear.bias, x, linear.weight.t(), out=getattr(state, name)[start:end])


def _norm(state: StepState, start: int, end: int, fn) -> None:
    """attn_norm / ffn_norm: fn(x, residual) -> (normed, residual), in place where the kernel allows it."""
    x, res = state.hidden[start:end], None if state.residual is None else state.residual[start:end]
    y, r = fn(x, res)
    if state.full(start, end):
        state.hidden, state.residual = y, r
        return
    if r.data_ptr() != state.residual[start:end].data_ptr():  # first: on layer 0, r is x itself
        state.residual[start:end].copy_(r)
    if y.data_ptr() != x.data_ptr():
        x.copy_(y)


def _attn_norm(layer, li, state, a, b):
    if li == 0:  # the first layer's residual is the embedding itself
        _norm(state, a, b, lambda x, _: layer.attn_norm(x, None))
    else:
        _norm(state, a, b, layer.attn_norm)


def _rope_append(layer, li, state, a, b):
    meta, rope = state.rows(a, b)
    layer.self_attn.rope_append(state.qkv[a:b], rope, meta.slot_mapping, state.kv_caches[li], meta.kv_packed)


def _attention(decode: bool):
    def run(layer, li, state, a, b):
        attn, (meta, _) = layer.self_attn, state.rows(a, b)
        q, k, v = attn.split(state.qkv[a:b])
        out = state.attn_out[a:b].view(b - a, -1, attn.cfg.head_dim)
        if state.model.batch_invariant:  # every query row over its own context, one fixed reduction order
            if decode:
                batch_invariant.attend_decode(out, q, state.kv_caches[li], meta, attn.scale)
            else:
                batch_invariant.attend_prefill(out, q, state.kv_caches[li], meta, attn.scale)
        elif decode:
            attend_decode(out, q, state.kv_caches[li], meta, attn.scale)
        else:
            attend_prefill(out, q, k, v, state.kv_caches[li], meta, attn.scale, state.model.paged_prefill)
    return run


OP_FUNCTIONS = {
    "attn_norm": _attn_norm,
    "qkv": lambda layer, li, s, a, b: _linear_into(s, "qkv", a, b, layer.self_attn.qkv_proj, s.hidden[a:b]),
    "rope_append": _rope_append,
    "decode_attn": _attention(decode=True),
    "prefill_attn": _attention(decode=False),
    "o_proj": lambda layer, li, s, a, b: _linear_into(s, "hidden", a, b, layer.self_attn.o_proj, s.attn_out[a:b]),
    "ffn_norm": lambda layer, li, s, a, b: _norm(s, a, b, layer.post_attention_layernorm),
    "gate_up": lambda layer, li, s, a, b: _store(s, "act", a, b, layer.mlp.gate_up(s.hidden[a:b])),
    "down": lambda layer, li, s, a, b: _linear_into(s, "hidden", a, b, layer.mlp.down_proj, s.act[a:b]),
}
NETWORK_OPS = {op.name for op in ALL_REDUCES.values()}


def run_op(model, layer_idx: int, op_name: str, state: StepState, start: int, end: int) -> None:
    """Apply one operation of layer `layer_idx` to token rows [start, end) of the step, in place."""
    if start >= end:
        return
    if op_name in NETWORK_OPS:
        model.tp.all_reduce_(state.hidden[start:end])
    else:
        OP_FUNCTIONS[op_name](model.layers[layer_idx], layer_idx, state, start, end)


def final_hidden(model, state: StepState) -> torch.Tensor:
    """The model's final norm over the last layer's output: the hidden states the runner computes logits from."""
    x, _ = model.norm(state.hidden, state.residual)
    return x
