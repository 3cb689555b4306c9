"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) on a paged KV cache.

Weights use HF names with q/k/v and gate/up fused so each is one GEMM. The modules hold weights and the math
of each step of a layer; the forward is the layer's operation list (`nanoflow/flow/ops.py`) run in order, the
same operations every executor runs. Under tensor parallelism a model holds one rank's shard
(`distributed/shard.py`): its layers are built with the rank's head and MLP counts, the embedding and LM head
with its vocabulary rows.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoflow.flow.ops import Operation, StepState, final_hidden, layer_operations, run_op
from nanoflow.kernels import cpu_ext
from nanoflow.kernels.attention import AttentionMetadata, write_kv
from nanoflow.models.config import ModelConfig
from nanoflow.models.layers import Linear, PackedWeight, RMSNorm, RopeInputs, RotaryEmbedding, logits_linear, \
    pack_weight, packed_linear, silu_and_mul


class Attention(nn.Module):
    """The attention half of a layer: its steps are separate methods because each one is an operation
    (`nanoflow/flow/ops.py`), run on token ranges."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = [rotary]  # a list so the shared table is not registered once per layer
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        self.scale = cfg.head_dim ** -0.5

    def split(self, qkv: torch.Tensor):
        """Views q [n, Hq, D], k and v [n, Hkv, D] of the fused projection's output."""
        c = self.cfg
        return (t.view(qkv.shape[0], -1, c.head_dim) for t in qkv.split([c.q_size, c.kv_size, c.kv_size], dim=1))

    def rope_append(self, qkv: torch.Tensor, rope: RopeInputs, slot_mapping: torch.Tensor, kv_cache,
                    kv_packed: bool = False) -> None:
        """Rotate q and k in place (adjacent columns of the fused projection), then write K/V to the cache."""
        c = self.cfg
        self.rotary[0].apply_(qkv, c.num_heads + c.num_kv_heads, c.head_dim, rope)
        _, k, v = self.split(qkv)
        write_kv(kv_cache, k, v, slot_mapping, kv_packed)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """The fused gate/up GEMM and silu(gate) * up (one C++ GEMM where the weight is GLU-packed)."""
        packed = self.gate_up_proj.packed
        if packed is not None and packed.glu:
            return packed_linear(x, packed)
        return silu_and_mul(self.gate_up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attn_norm(self, x, residual):
        """(normed, residual); the first layer's residual is its input."""
        if residual is None:
            return self.input_layernorm(x), x
        return self.input_layernorm(x, residual)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, shard=None) -> None:
        """`shard`: a `TPShard` (this rank's part under tensor parallelism) or None (the whole model)."""
        super().__init__()
        self.shard = shard
        self.cfg = shard.local_config(cfg) if shard is not None else cfg  # this rank's layer shapes
        self.vocab_size = cfg.vocab_size
        self.vocab = shard.vocab if shard is not None else (0, cfg.vocab_size)  # rows of embedding and head
        rows = self.vocab[1] - self.vocab[0]
        self.embed_tokens = nn.Embedding(rows, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(self.cfg, self.rope) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, rows)
        self.packed_head: PackedWeight | None = None  # the LM head prepacked for a CPU GEMM (prepack_linears)
        self.tp = None  # the rank's TPGroup once it joined (distributed/comm.py); None: one device
        self.batch_invariant = False  # kernels/batch_invariant.enable
        self.paged_prefill = False  # CPU: short prefill chunks through the paged C++ kernel (attention.attend_prefill)

    @property
    def tp_size(self) -> int:
        return self.shard.world_size if self.shard is not None else 1

    def operations(self) -> list[Operation]:
        """One decoder layer's operations, in order: what every executor runs."""
        return layer_operations(self.tp_size)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step: every layer's operations in order on all its tokens
        (the sequential executor's work, without its plan)."""
        state = StepState(self, input_ids, positions, meta, kv_caches)
        ops = [op.name for op in self.operations()]
        for li in range(len(self.layers)):
            for op in ops:
                run_op(self, li, op, state, 0, state.num_tokens)
        return final_hidden(self, state)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; vocabulary-parallel under TP: each rank looks up the ids in its rows, zeros for
        the rest, and the all-reduce sums one non-zero row per token (exact in any dtype)."""
        if self.shard is None:
            return self.embed_tokens(input_ids)
        lo, hi = self.vocab
        inside = (input_ids >= lo) & (input_ids < hi)
        x = self.embed_tokens((input_ids - lo).clamp(0, hi - lo - 1))
        x.masked_fill_(~inside.unsqueeze(1), 0)
        if self.tp is not None:  # (a shard without its group: the profiler times rank 0's operations alone)
            self.tp.all_reduce_(x)
        return x

    def prepack_linears(self, m_hint: int, kind: str = "onednn", fuse_glu: bool = False) -> None:
        """Every linear layer and the LM head prepacked for `kind`'s GEMM ("panels" or "onednn",
        layers.PackedWeight: bf16 on a CPU with native bf16); costs a second copy of the weights. `fuse_glu`
        (panels): the MLPs' gate/up GEMMs return silu(gate) * up."""
        glu = {id(m.gate_up_proj) for m in self.modules() if isinstance(m, MLP)} if fuse_glu else set()
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = pack_weight(module.weight, m_hint, kind, id(module) in glu)
        self.packed_head = pack_weight(self.head_weight(), m_hint, kind)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's greedy token straight from a panel-packed LM head (the C++ GEMM keeps a running argmax of
        its bf16 outputs: the tokens argmax_rows picks from compute_logits, without storing the logits), or None
        when the head is not panel-packed here (one device, not batch-invariant, C++ kernels on)."""
        head = self.packed_head
        if head is None or head.kind != "panels" or self.tp is not None or self.batch_invariant:
            return None
        ext = cpu_ext.get()
        if ext is None:
            return None
        argmax = ext.gemm_f32_argmax if head.data.dtype == torch.float32 else ext.gemm_bf16_argmax
        return argmax(hidden, head.data, head.weight.shape[0])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under TP gathered on rank 0, which samples (None elsewhere)."""
        logits = logits_linear(hidden, self.head_weight(), self.packed_head, self.batch_invariant)
        return logits if self.tp is None else self.tp.gather_vocab(logits, self.vocab_size)
