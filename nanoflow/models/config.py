"""Model shape: one dataclass shared by the loader, the runner and the cost model."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" (Llama 2/3, Mistral, SmolLM2) or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_gemm_params(self) -> int:
        """Weights one token multiplies through in one decoder layer (qkv, o, gate/up, down)."""
        d = self.hidden_size
        qkv = d * (self.q_size + 2 * self.kv_size)
        o = self.q_size * d
        ffn = 3 * d * self.intermediate_size
        return qkv + o + ffn

    def gemm_params(self, include_lm_head: bool = True) -> int:
        """Parameters used as GEMM weights per token (the paper's P_model for Eq. 5)."""
        n = self.num_layers * self.layer_gemm_params()
        if include_lm_head:
            n += self.vocab_size * self.hidden_size
        return n

    def num_parameters(self) -> int:
        """Stored parameters (embedding counted once when tied)."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        norms = (2 * self.num_layers + 1) * self.hidden_size
        bias = self.num_layers * (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        return self.num_layers * self.layer_gemm_params() + emb + head + norms + bias

    def flops_per_token(self, include_lm_head: bool = True) -> int:
        return 2 * self.gemm_params(include_lm_head)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        "llama", 49152, 576, 1536, 30, 9, 3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), name="smollm2-135m"),
    "llama-3-8b": ModelConfig(
        "llama", 128256, 4096, 14336, 32, 32, 8, max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama-3-8b"),
    "llama-2-7b": ModelConfig(
        "llama", 32000, 4096, 11008, 32, 32, 32, rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
        name="llama-2-7b"),
    "llama-2-70b": ModelConfig(
        "llama", 32000, 8192, 28672, 80, 64, 8, rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
        name="llama-2-70b"),
    "llama-3-70b": ModelConfig(
        "llama", 128256, 8192, 28672, 80, 64, 8, max_position_embeddings=8192, rope_theta=500000.0,
        bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama-3-70b"),
    "mistral-7b": ModelConfig(
        "llama", 32000, 4096, 14336, 32, 32, 8, max_position_embeddings=32768, rope_theta=1000000.0,
        bos_token_id=1, eos_token_ids=(2,), name="mistral-7b"),
    "qwen2-72b": ModelConfig(
        "qwen2", 152064, 8192, 29568, 80, 64, 8, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, qkv_bias=True, eos_token_ids=(151645, 151643), name="qwen2-72b"),
    "qwen2-0.5b": ModelConfig(
        "qwen2", 151936, 896, 4864, 24, 14, 2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True, eos_token_ids=(151645, 151643),
        name="qwen2-0.5b"),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
