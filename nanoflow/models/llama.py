"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) on a paged KV cache.

Weights use HF names with q/k/v and gate/up fused so each is one GEMM.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoflow.kernels.attention import AttentionMetadata, paged_attention, write_kv
from nanoflow.models.config import ModelConfig
from nanoflow.models.layers import Linear, RMSNorm, RopeInputs, RotaryEmbedding, logits_linear, pack_weight, \
    silu_and_mul


class Attention(nn.Module):
    """The attention half of a layer. The steps are separate methods because NanoFlow runs each one as its
    own operation on token ranges (`nanoflow/flow/ops.py`); `forward` chains them on the whole batch."""

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

    def rope_append(self, qkv: torch.Tensor, rope: RopeInputs, slot_mapping: torch.Tensor, kv_cache) -> None:
        """Rotate q and k in place (adjacent columns of the fused projection), then write K/V to the cache."""
        c = self.cfg
        self.rotary[0].apply_(qkv, c.num_heads + c.num_kv_heads, c.head_dim, rope)
        _, k, v = self.split(qkv)
        write_kv(kv_cache, k, v, slot_mapping)

    def forward(self, x, rope: RopeInputs, meta: AttentionMetadata, kv_cache):
        qkv = self.qkv_proj(x)
        self.rope_append(qkv, rope, meta.slot_mapping, kv_cache)
        q, k, v = self.split(qkv)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.cfg.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """The fused gate/up GEMM and silu(gate) * up."""
        return silu_and_mul(self.gate_up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


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

    def forward(self, x, residual, rope: RopeInputs, meta, kv_cache):
        x, residual = self.attn_norm(x, residual)
        x = self.self_attn(x, rope, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rope) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.packed_head: torch.Tensor | None = None  # the LM head in oneDNN's layout (prepack_linears)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Returns final hidden states [T, hidden] for all tokens of the step."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.prepare(positions, x.dtype)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, meta, kv)
        x, _ = self.norm(x, residual)
        return x

    def prepack_linears(self, m_hint: int) -> None:
        """Every linear layer and the LM head in oneDNN's blocked layout (bf16 on a CPU with native bf16:
        `packed_gemm_supported`); costs a second copy of the weights."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = pack_weight(module.weight, m_hint)
        self.packed_head = pack_weight(self.head_weight(), m_hint)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_linear(hidden, self.head_weight(), self.packed_head)
