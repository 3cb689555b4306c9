"""One reading of a `--model` spec: models.loader turns it into a ModelConfig; `nanoflow roofline` adds only
the names it knows without weights (bare presets, the paper's shapes). No weights are loaded."""
from __future__ import annotations

import json

import pytest

from nanoflow.costmodel.analysis import PAPER_MODELS
from nanoflow.costmodel.roofline import resolve_model_config
from nanoflow.models.config import get_preset
from nanoflow.models.loader import load_config, resolve_model

HF_CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}


@pytest.mark.parametrize("spec", ["default", "dummy:qwen2-0.5b", "HF_DIR"])
def test_roofline_reads_a_spec_as_the_loader_does(spec, tmp_path):
    if spec == "HF_DIR":
        (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
        spec = str(tmp_path)
    assert resolve_model_config(spec) == (load_config(resolve_model(spec)), None)


def test_roofline_knows_presets_and_paper_shapes_by_name():
    assert resolve_model_config("llama-2-70b") == (get_preset("llama-2-70b"), None)
    pm = PAPER_MODELS["mixtral-8x7b"]  # MoE: no runnable preset, all experts stored
    assert resolve_model_config("mixtral-8x7b") == (pm.cfg, pm.weight_params)
    assert resolve_model_config("dummy:mixtral-8x7b") == (pm.cfg, pm.weight_params)


def test_unknown_names_list_what_roofline_knows(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*or a preset name: .*mixtral-8x7b"):
        resolve_model_config("nope")
    with pytest.raises(FileNotFoundError, match="has no config.json$"):  # a path: the loader's word alone
        resolve_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a usable HF config"):
        resolve_model_config(str(tmp_path))
