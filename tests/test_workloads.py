"""Offline-benchmark workloads and peers: sampling rules, plus tiny real smoke runs of the baselines."""
import os

import pytest
import torch

from nanoflow.bench.report import print_summary, write_json
from nanoflow.bench.workloads import (BenchRequest, find_traces_dir, sample_workload, summarize_workload,
                                      throughput_metrics)
from tests.helpers import save_tiny_hf_model

VOCAB = 49152


def _lengths(reqs):
    return [(r.input_len, r.output_len) for r in reqs]


@pytest.mark.parametrize("spec", ["splitwise", "lmsys", "sharegpt"])
def test_traces_load_and_respect_caps(spec):
    reqs = sample_workload(spec, 200, seed=1, vocab_size=VOCAB, max_model_len=512, max_input=300, max_output=200)
    assert len(reqs) == 200
    for r in reqs:
        assert 1 <= r.input_len <= 300 and 1 <= r.output_len <= 200
        assert r.input_len + r.output_len <= 512
        assert all(100 <= t < VOCAB for t in r.prompt_token_ids)
    assert len(set(_lengths(reqs))) > 10  # really sampled from the trace, not constant


def test_seed_determinism():
    a = sample_workload("sharegpt", 50, seed=7, vocab_size=VOCAB, max_model_len=2048)
    b = sample_workload("sharegpt", 50, seed=7, vocab_size=VOCAB, max_model_len=2048)
    c = sample_workload("sharegpt", 50, seed=8, vocab_size=VOCAB, max_model_len=2048)
    assert a == b
    assert a != c


def test_context_cap_keeps_output_and_truncates_prompt():
    (r,) = sample_workload("const:1000/300", 1, seed=0, vocab_size=VOCAB, max_model_len=512)
    assert (r.input_len, r.output_len) == (212, 300)
    (r,) = sample_workload("const:10/900", 1, seed=0, vocab_size=VOCAB, max_model_len=512)
    assert (r.input_len, r.output_len) == (1, 511)


def test_const_parsing_and_summary():
    reqs = sample_workload("const:128/64", 4, seed=0, vocab_size=VOCAB, max_model_len=4096)
    assert _lengths(reqs) == [(128, 64)] * 4
    s = summarize_workload(reqs)
    assert (s["num_requests"], s["input_tokens"], s["output_tokens"]) == (4, 512, 256)
    assert s["mean_input"] == 128.0 and s["mean_output"] == 64.0
    m = throughput_metrics(reqs, 2.0)
    assert m["total_tokens_per_s"] == 384.0 and m["output_tokens_per_s"] == 128.0 and m["requests_per_s"] == 2.0


@pytest.mark.parametrize("spec, match", [
    ("nope", "unknown workload"), ("const:12", "const:IN/OUT"), ("const:a/b", "const:IN/OUT"),
    ("const:0/5", ">= 1"),
])
def test_bad_spec_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        sample_workload(spec, 4, seed=0, vocab_size=VOCAB, max_model_len=512)


def test_traces_dir_resolution(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        find_traces_dir(str(tmp_path / "missing"))
    (tmp_path / "lmsys.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nXXX,5,7\nXXX,3,0\n")
    monkeypatch.setenv("NANOFLOW_TRACES", str(tmp_path))
    assert find_traces_dir() == tmp_path
    reqs = sample_workload("lmsys", 2, seed=0, vocab_size=VOCAB, max_model_len=64)
    assert sorted(_lengths(reqs)) == [(3, 1), (5, 7)]  # a zero-length output is raised to 1


def test_report_outputs(tmp_path, capsys):
    reqs = [BenchRequest([101, 102], 3)]
    rows = [{"system": "ours", **throughput_metrics(reqs, 1.0), "pct_of_optimal": 50.0},
            {"system": "peer", **throughput_metrics(reqs, 2.0)}]
    print_summary(rows, "smoke")
    out = capsys.readouterr().out
    assert "2.00x" in out and "50.0%" in out
    write_json(str(tmp_path / "sub" / "r.json"), {"rows": rows, "dtype": torch.float32})
    assert (tmp_path / "sub" / "r.json").read_text().startswith("{")


def test_report_rounds(capsys):
    """`--repeats`: each round's peer row is compared with ours of the same round; the median of the ratios."""
    from nanoflow.bench.report import print_rounds
    reqs = [BenchRequest([101, 102], 3)]
    rows = [{"system": "ours", "round": k, **throughput_metrics(reqs, ours)}
            for k, ours in ((1, 1.0), (2, 2.0), (3, 1.0))]
    for k, (row, peer) in enumerate(zip(list(rows), (1.5, 2.0, 1.2)), 1):
        rows.insert(rows.index(row) + 1, {"system": "peer", "round": k, **throughput_metrics(reqs, peer)})
    print_summary(rows, "smoke")
    print_rounds(rows)
    out = capsys.readouterr().out
    # "1.00x": ours x 3, round 2's peer (2.0 s each), the median line's round 2
    assert "ours #2" in out and "peer #3" in out and out.count("1.00x") == 5
    assert "ours ÷ peer: median 1.20x over 3 interleaved rounds (1.50x, 1.00x, 1.20x)" in out


def test_repeats_takes_one_configuration():
    import argparse
    from nanoflow.bench.offline import _check_repeats
    ok = dict(repeats=3, more_executors=[], tp_sizes=[1], compare_async=False, profile=False)
    _check_repeats(argparse.Namespace(**ok))
    for bad, match in (({"profile": True}, "one configuration"), ({"more_executors": ["overlap"]}, "executor"),
                       ({"repeats": 0}, "at least 1")):
        with pytest.raises(ValueError, match=match):
            _check_repeats(argparse.Namespace(**{**ok, **bad}))


@pytest.mark.slow
def test_hf_baseline_smoke(default_gguf):
    from nanoflow.bench.hf_baseline import run_hf
    reqs = sample_workload("const:8/4", 2, seed=0, vocab_size=VOCAB, max_model_len=64)
    r = run_hf(os.path.dirname(default_gguf), os.path.basename(default_gguf), reqs, torch.float32, [1, 2])
    assert r["batch_size"] in (1, 2) and r["num_requests"] == 2 and r["output_tokens"] == 8
    assert r["total_tokens_per_s"] > 0 and len(r["per_batch_size"]) == 2


def test_hf_baseline_on_a_tiny_model(tmp_path):
    """The HF baseline's static batching on a tiny random HF directory (fast; the smoke above runs the GGUF)."""
    from nanoflow.bench.hf_baseline import run_hf
    reqs = sample_workload("const:8/4", 2, seed=0, vocab_size=512, max_model_len=64)
    r = run_hf(save_tiny_hf_model(tmp_path, vocab_size=512), None, reqs, torch.float32, [1, 2])
    assert r["batch_size"] in (1, 2) and r["num_requests"] == 2 and r["output_tokens"] == 8
    assert r["total_tokens_per_s"] > 0 and len(r["per_batch_size"]) == 2


@pytest.mark.slow
def test_llamacpp_baseline_smoke(default_gguf):
    pytest.importorskip("llama_cpp")
    from nanoflow.bench.llamacpp_baseline import run_llamacpp
    # More requests than sequences in flight, so slots (and their KV) are reused.
    reqs = sample_workload("const:8/4", 3, seed=0, vocab_size=VOCAB, max_model_len=64)
    reqs.append(BenchRequest(reqs[0].prompt_token_ids, 6))
    r = run_llamacpp(default_gguf, reqs, n_parallel=2, keep_tokens=True)
    assert [len(t) for t in r["output_token_ids"]] == [4, 4, 4, 6]
    assert r["output_token_ids"][3][:4] == r["output_token_ids"][0]  # same prompt, greedy: same start
    assert r["num_requests"] == 4 and r["total_tokens_per_s"] > 0
