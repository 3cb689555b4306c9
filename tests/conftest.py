import gc
import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter vs compiler when a kernel is decorated, i.e. when the first test module imports
    # nanoflow.kernels.triton_*: set it here, before any of them, so the CPU run executes the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Engines of earlier test modules may linger until collected: keep each KV pool small (server subprocesses inherit).
os.environ.setdefault("NANOFLOW_KV_CACHE_GB", "0.5")

import pytest

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the ocean.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one paragraph.",
    "List three uses of a paperclip:",
    "Translate to French: I love reading books in the evening.",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the mountains,",
]
NUM_TOKENS = 64


@pytest.fixture(autouse=True, scope="module")
def _collect_engines_after_module():
    """Free the module's engines (weights + KV pools) before the next module builds its own."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from nanoflow.models.loader import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def hf_reference(default_gguf):
    """Greedy continuations from HF transformers (float32, one prompt at a time) on the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(default_gguf), os.path.basename(default_gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    refs = []
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=False)
        refs.append((ids, _hf_greedy(model, ids, NUM_TOKENS)))
    return refs


@torch.inference_mode()
def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy loop with HF's KV cache; EOS does not stop it (like ignore_eos)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, new = out.past_key_values, []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        new.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new


@pytest.fixture(scope="session")
def llm_fp32():
    from nanoflow import LLM
    return LLM("default", dtype="float32")
