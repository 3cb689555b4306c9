"""The vLLM peer without vLLM: the GGUF -> HF export it loads, and the rows it gives when vLLM cannot run."""
import argparse
import json
import os
import sys

import pytest
import torch

from nanoflow.bench.workloads import BenchRequest

PROMPT = "The capital of France is"
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_gguf, monkeypatch_module):
    from nanoflow.bench.hf_export import export_gguf_to_hf
    monkeypatch_module.setenv("NANOFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return export_gguf_to_hf(default_gguf)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
def test_export_is_cached_and_keyed_by_the_gguf(exported, default_gguf):
    from nanoflow.bench.hf_export import cache_root, export_gguf_to_hf, hf_model_dir
    assert os.path.dirname(exported) == cache_root() and os.environ["NANOFLOW_CACHE_DIR"] in exported
    names = set(os.listdir(exported))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.startswith(".export-") for n in os.listdir(cache_root()))  # no half-written copy left
    mtime = os.path.getmtime(os.path.join(exported, "model.safetensors"))
    assert export_gguf_to_hf(default_gguf) == exported == hf_model_dir("default")  # reused, not redone
    assert os.path.getmtime(os.path.join(exported, "model.safetensors")) == mtime
    assert hf_model_dir(exported) == exported  # an HF dir is used as it is
    with open(os.path.join(exported, "config.json")) as f:
        assert "quantization_config" not in json.load(f)


@pytest.mark.slow
def test_export_greedy_equals_ours_float32(exported, llm_fp32):
    """What vLLM will load (the exported dir, via HF transformers here) greedily continues a prompt exactly as
    our engine does on the GGUF, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoflow import SamplingParams
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
                             do_sample=False)
    theirs = out[0, len(ids):].tolist()
    ours = llm_fp32.generate([ids], SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids
    assert list(ours) == theirs


def _requests() -> list[BenchRequest]:
    return [BenchRequest(list(range(200, 216)), 4), BenchRequest(list(range(300, 308)), 2)]


def _assert_why_row(row: dict, *words: str) -> None:
    assert row["system"].startswith("vLLM") and "total_tokens_per_s" not in row
    assert all(w in row["note"] for w in words), row["note"]


def test_no_venv_gives_a_row_that_says_why(tmp_path):
    from nanoflow.bench.vllm_baseline import run_vllm
    row = run_vllm("/nonexistent/model", _requests(), torch.float32, [256], venv=tmp_path / "no-venv")
    _assert_why_row(row, "no vLLM virtualenv", "make bench-deps")


def test_our_row_says_when_the_torch_fallback_ran(monkeypatch):
    """C++ kernels asked for on a CPU but not built here: our row's note says the torch fallback ran (a number
    8x below the usual one is then the machine's, not the engine's); built, or switched off: no note."""
    from types import SimpleNamespace

    from nanoflow.bench.offline import _kernels_note
    from nanoflow.kernels import cpu_ext
    llm = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(device="cpu", cpp_kernels=True)))
    monkeypatch.setattr(cpu_ext, "enabled", lambda: True)
    monkeypatch.setattr(cpu_ext, "load", lambda: None)
    assert "torch fallback" in _kernels_note(llm)
    llm.engine.config.cpp_kernels = False
    assert _kernels_note(llm) is None
    llm.engine.config.cpp_kernels = True
    monkeypatch.setattr(cpu_ext, "load", lambda: object())
    assert _kernels_note(llm) is None


@pytest.mark.slow
def test_vllm_that_cannot_import_gives_a_row_that_says_why(tmp_path, monkeypatch):
    """A "venv" whose python has no vllm: the runner subprocess fails, and the row carries its error."""
    import tempfile

    from nanoflow.bench.vllm_baseline import run_vllm
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the failed run's logs stay here, not in /tmp
    (tmp_path / "bin").mkdir()
    os.symlink(sys.executable, tmp_path / "bin" / "python")
    row = run_vllm("/nonexistent/model", _requests(), torch.bfloat16, [64, 128], venv=tmp_path, timeout_s=120)
    _assert_why_row(row, "failed at every budget", "B=64", "B=128", "No module named 'vllm'")
    assert row["dtype"] == "bfloat16" and len(row["per_budget"]) == 2
    logs = list(tmp_path.glob("nanoflow-vllm-*/vllm-*.log"))
    assert len(logs) == 2 and all(str(log) in row["note"] for log in logs)  # the note says where to look


@pytest.mark.slow
def test_compare_vllm_without_venv_prints_and_writes(llm_fp32, tmp_path, capsys):
    """`bench offline --compare vllm` on a machine without .venv-vllm: a row that says why, in the table and
    the JSON, next to ours (no exception, no conversion)."""
    from nanoflow.bench.offline import run_peers
    from nanoflow.bench.report import print_summary, write_json
    args = argparse.Namespace(model="default", compare="vllm", vllm_token_budgets="256",
                              vllm_venv=str(tmp_path / "missing"))
    rows = run_peers(args, llm_fp32, _requests())
    assert len(rows) == 1
    _assert_why_row(rows[0], "no vLLM virtualenv")
    rows.insert(0, {"system": "nanoflow (float32)", "num_requests": 2, "input_tokens": 24, "output_tokens": 6,
                    "elapsed_s": 1.0, "total_tokens_per_s": 30.0, "output_tokens_per_s": 6.0,
                    "requests_per_s": 2.0, "pct_of_optimal": 1.0})
    print_summary(rows, "smoke")
    out = capsys.readouterr().out
    assert "vLLM" in out and "no vLLM virtualenv" in out
    write_json(str(tmp_path / "out.json"), {"results": rows})
    with open(tmp_path / "out.json") as f:
        assert json.load(f)["results"][1]["note"] == rows[1]["note"]


def test_cpu_list():
    from nanoflow.bench.vllm_baseline import cpu_list
    assert cpu_list({0, 1}) == "0-1"
    assert cpu_list({5, 0, 1, 2}) == "0-2,5"
    assert cpu_list({3}) == "3"
    assert cpu_list() == cpu_list(os.sched_getaffinity(0))
