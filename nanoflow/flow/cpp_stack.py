"""CPU steps in one C++ call: the kernels the Python forward (`flow/ops.py`) calls for a step, called in the same
order on the same tensors from C++ (`kernels/csrc/layer_stack.cpp`), the CPU's counterpart of replaying a CUDA
graph (`flow/cuda_graphs.py`). At 64 decode rows the Python forward spent 6 ms of a 95 ms step between its ~270
kernel calls, at 256 prefill rows ~18 ms of ~430 (const:128/128 x 256: mixed steps 441-471 against 491-499 ms);
the C++ loop spends microseconds and releases the GIL once.

A step takes it when every row reads the cache through the paged attention kernel - decode rows, and prefill
chunks of contexts up to PAGED_PREFILL_MAX_CONTEXT with paged prefill on, each row a query over its own context
(attention.step_rows_inputs) - and every operation of the Python forward would be one of those C++ kernels: a
CPU model on one device with panel-packed GEMMs (gate/up GLU-packed: bf16 on AVX512-BF16, float32 on AVX2-only
CPUs), not batch-invariant, the sequential executor, no nano-op trace being recorded. KV pages packed (written
by the attention kernel in all-decode steps, else first, as write_kv writes them) or rows (written as
attention.write_kv writes them). Anything else (longer prefills, F.linear or oneDNN GEMMs, ...) runs the wrapped
executor. The hidden states are the same bit for bit (tests/test_cpp_stack.py); `--no-cpp-layer-stack`
(EngineConfig.cpp_layer_stack) switches it off.
"""
from __future__ import annotations

import torch

from nanoflow.flow.executor import ExecutorWrapper
from nanoflow.kernels import cpu_ext
from nanoflow.kernels.attention import AttentionMetadata, step_rows_inputs

TENSORS_PER_LAYER = 7  # layer_stack.cpp's kPerLayer


class CppLayerStack(ExecutorWrapper):
    """Wraps a sequential executor (`executor(input_ids, positions, meta, kv_caches) -> hidden`)."""

    def __init__(self, executor) -> None:
        super().__init__(executor)
        self._layers: list[torch.Tensor] | None = None  # per-layer tensors, collected on first use

    @torch.inference_mode()
    def __call__(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        layers = self._stack_tensors()
        rows = self._rows(input_ids, meta) if layers is not None else None
        if rows is None:
            return self.executor(input_ids, positions, meta, kv_caches)
        model, c = self.executor.model, self.executor.model.cfg
        attn, norm = model.layers[0].self_attn, model.layers[0].input_layernorm
        hidden, residual = cpu_ext.load().layer_stack(
            model.embed(input_ids), positions, model.rope.cos_sin, meta.slot_mapping, *rows, layers, kv_caches,
            [c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size], attn.scale, norm.eps,
            meta.kv_packed, not meta.prefills)
        return model.norm(hidden, residual)[0]

    def _rows(self, input_ids: torch.Tensor, meta: AttentionMetadata):
        """Every row's (block tables, context lengths) when this step takes the C++ call: C++ kernels on for
        it, no nano-op trace wanted, every row decodes or (paged prefill on) prefills a short context; else None."""
        if not (input_ids.shape[0] > 0 and cpu_ext.enabled() and self.executor.trace is None):
            return None
        if meta.prefills and not self.executor.model.paged_prefill:
            return None
        return step_rows_inputs(meta, input_ids.shape[0])

    def _stack_tensors(self) -> list[torch.Tensor] | None:
        """layer_stack.cpp's per-layer tensors, or None (an empty list) when the model does not fit it."""
        if self._layers is None:
            self._layers = stack_tensors(self.executor.model) or []
        return self._layers or None


def stack_tensors(model) -> list[torch.Tensor] | None:
    """Per layer: attention norm weight, qkv panels, qkv bias (empty: none), o panels, FFN norm weight, gate/up
    GLU panels, down panels; None unless every operation of the Python forward would be those C++ kernels."""
    if (model.tp_size != 1 or model.batch_invariant or cpu_ext.load() is None
            or next(model.parameters()).device.type != "cpu"):
        return None
    out: list[torch.Tensor] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj.packed, attn.o_proj.packed, mlp.gate_up_proj.packed, mlp.down_proj.packed)
        if any(p is None or p.kind != "panels" for p in linears) or attn.o_proj.bias is not None \
                or [p.glu for p in linears] != [False, False, True, False] or mlp.down_proj.bias is not None:
            return None
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(w.dtype != linears[0].data.dtype for w in norms):  # (fused_add_rms_norm: one dtype)
            return None
        bias = attn.qkv_proj.bias if attn.qkv_proj.bias is not None else norms[0].new_empty(0)
        out += [norms[0], linears[0].data, bias, linears[1].data, norms[1], linears[2].data, linears[3].data]
    return out
