"""Loading from an HF directory (Llama, Qwen2 with QKV bias, Mistral), dummy presets, and clear errors."""
import pytest
import torch

from nanoflow import LLM, SamplingParams
from tests.conftest import _hf_greedy
from tests.helpers import tiny_hf_config



def _save_tiny(kind: str, path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**tiny_hf_config(vocab_size=512), tie_word_embeddings=tie)).eval()  # ids up to 300
    with torch.no_grad():  # make the biases visible in the output
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_hf_directory_matches_transformers(tmp_path, kind, tie):
    ref_model = _save_tiny(kind, tmp_path, tie)
    prompts = [[5, 17, 99, 300, 2, 41], [7, 7, 7, 8], list(range(20, 60))]
    refs = [_hf_greedy(ref_model, p, 12) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", dense_batch=16)
    assert llm.model_config.qkv_bias == (kind == "qwen2")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_dummy_preset_runs_token_ids():
    llm = LLM("dummy:smollm2-135m", dtype="bfloat16", max_model_len=128)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text needs a tokenizer"], use_tqdm=False)


@pytest.mark.parametrize("model,kw,exc,msg", [
    ("/no/such/model.gguf", {}, FileNotFoundError, "not found"),
    ("dummy:no-such-preset", {}, ValueError, "unknown model preset"),
    ("default", {"dtype": "int3"}, ValueError, "unsupported dtype"),
    ("default", {"dense_batch": 0}, ValueError, "dense_batch"),
])
def test_clear_errors(model, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LLM(model, **kw)


@pytest.mark.slow
def test_request_that_cannot_fit_is_rejected(llm_fp32):
    with pytest.raises(ValueError, match="context length"):
        llm_fp32.generate([[1] * 10], SamplingParams(max_tokens=10_000_000), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm_fp32.generate([[]], use_tqdm=False)
    assert not llm_fp32.engine.has_unfinished_requests()
