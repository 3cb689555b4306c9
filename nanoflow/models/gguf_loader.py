"""GGUF metadata and tensors through the `gguf` package (dequantized to float32)."""
from __future__ import annotations

import functools

import numpy as np
import torch

from nanoflow.models.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@functools.lru_cache(maxsize=4)
def _reader(path: str):
    import gguf
    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path: str) -> ModelConfig:
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")
    names = {t.name for t in r.tensors}
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    heads = _field(r, f"{arch}.attention.head_count")
    return ModelConfig(
        architecture=arch, vocab_size=int(emb.shape[1]),
        hidden_size=_field(r, f"{arch}.embedding_length"),
        intermediate_size=_field(r, f"{arch}.feed_forward_length"),
        num_layers=_field(r, f"{arch}.block_count"), num_heads=heads,
        num_kv_heads=_field(r, f"{arch}.attention.head_count_kv", heads),
        max_position_embeddings=_field(r, f"{arch}.context_length", 4096),
        rms_norm_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (), name=_field(r, "general.name", arch))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaves q/k rows for its rope; restore HF's half-split layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: str, cfg: ModelConfig):
    from gguf.quants import dequantize
    for t in _reader(path).tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        parts = t.name.split(".")
        if parts[0] == "blk":
            sub = _LAYER_NAMES[parts[2]]
            name = f"layers.{parts[1]}.{sub}.{parts[3]}"
            if cfg.architecture == "llama" and parts[2] in ("attn_q", "attn_k"):
                w = _unpermute(w, cfg.num_heads if parts[2] == "attn_q" else cfg.num_kv_heads)
        elif t.name == "token_embd.weight":
            name = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            continue
        yield name, torch.from_numpy(np.array(w, copy=True))
