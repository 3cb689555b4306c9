"""HF checkpoints as tools write them: a tied embedding stored only as `lm_head.weight`,
`model.safetensors.index.json` shards, and one-line errors for broken directories. Built in tmp_path from the
default model's HF export (float32), compared with the GGUF it came from."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoflow import LLM, SamplingParams
from nanoflow.bench.hf_export import export_gguf_to_hf
from nanoflow.models.loader import build_model, load_config, resolve_model

pytestmark = pytest.mark.slow  # exports and loads the default model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def export(default_gguf) -> tuple[str, dict[str, torch.Tensor]]:
    d = export_gguf_to_hf(default_gguf)
    with safe_open(os.path.join(d, "model.safetensors"), framework="pt") as f:
        return d, {k: f.get_tensor(k) for k in f.keys()}


def _hf_dir(tmp_path, export, files: dict[str, dict[str, torch.Tensor]], index: bool = False) -> str:
    src, _ = export
    out = tmp_path / "model"
    out.mkdir()
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), out / name)
    for fn, tensors in files.items():
        save_file(tensors, str(out / fn), metadata={"format": "pt"})
    if index:
        weight_map = {k: fn for fn, tensors in files.items() for k in tensors}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(out)


def _weights(path: str) -> dict[str, torch.Tensor]:
    src = resolve_model(path)
    model = build_model(src, load_config(src), torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tied_embedding_stored_as_lm_head_only(tmp_path, export, default_gguf):
    _, tensors = export
    tied = {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in tensors.items()}
    d = _hf_dir(tmp_path, export, {"model.safetensors": tied})
    params = SamplingParams(temperature=0, max_tokens=8)
    got = LLM(d, dtype="float32", max_model_len=128).generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    want = LLM(default_gguf, dtype="float32", max_model_len=128).generate(PROMPT, params, use_tqdm=False)[0]
    assert got.token_ids == want.outputs[0].token_ids


def test_index_json_shards_and_stray_files(tmp_path, export):
    _, tensors = export
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in names[:half]},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in names[half:]}}
    d = _hf_dir(tmp_path, export, shards, index=True)
    # A stray copy beside the shards is not part of the checkpoint the index describes.
    save_file({"junk": torch.zeros(1)}, os.path.join(d, "consolidated.safetensors"))
    whole = _weights(export[0])
    sharded = _weights(d)
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


@pytest.mark.parametrize("breakage,error", [
    ("missing_shard", "shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing"),
    ("missing_tensor", "weights missing from the checkpoint: layers.0.input_layernorm.weight"),
    ("unknown_tensor", "checkpoint tensor 'vision_tower.weight' has no place in this model"),
    ("wrong_shape", "has shape (3,), the model (config.json) expects (576,)"),
    ("bad_config", "config.json: not a usable HF config (KeyError"),
])
def test_broken_checkpoints_give_one_line_errors(tmp_path, export, breakage, error):
    _, tensors = export
    tensors = dict(tensors)
    files, index = {"model.safetensors": tensors}, False
    if breakage == "missing_shard":
        files, index = {"model-00001-of-00002.safetensors": tensors}, True
    elif breakage == "missing_tensor":
        del tensors["model.layers.0.input_layernorm.weight"]
    elif breakage == "unknown_tensor":
        tensors["vision_tower.weight"] = torch.zeros(2)
    elif breakage == "wrong_shape":
        tensors["model.norm.weight"] = torch.zeros(3)
    d = _hf_dir(tmp_path, export, files, index)
    if breakage == "missing_shard":
        idx = json.loads(open(os.path.join(d, "model.safetensors.index.json")).read())
        idx["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
        open(os.path.join(d, "model.safetensors.index.json"), "w").write(json.dumps(idx))
    if breakage == "bad_config":
        cfg = json.loads(open(os.path.join(d, "config.json")).read())
        del cfg["hidden_size"]
        open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        _weights(d)
    assert error in str(e.value) and "\n" not in str(e.value)
