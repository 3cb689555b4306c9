"""HF transformers peer baseline: ``generate`` with static batches, best batch size found.

Static batching is the honest HF behaviour: every request in a batch is left-padded to the longest prompt
and decoded for the batch's longest output (EOS suppressed with ``min_new_tokens``), but only each
request's own input + output tokens count as useful throughput.
"""
from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from nanoflow.bench.workloads import BenchRequest, throughput_metrics

_ESTIMATE_BATCHES = 2  # batches per batch size in the estimation phase


def load_hf_model(model_dir: str, gguf_file: str | None, dtype: torch.dtype):
    """HF model (dequantized when loading a GGUF) with the fastest attention that works on CPU."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # architectures without SDPA support fall back to eager
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    return model.eval()


def _pad_id(model) -> int:
    cfg = model.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def _generate_batch(model, batch: list[BenchRequest], pad_id: int) -> int:
    """One static batch; returns the number of token positions computed (padding included)."""
    max_in = max(r.input_len for r in batch)
    max_out = max(r.output_len for r in batch)
    ids = torch.full((len(batch), max_in), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), max_in), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding so every row's next token lands in the last column
        ids[i, max_in - r.input_len:] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        mask[i, max_in - r.input_len:] = 1
    # An explicit config replaces the checkpoint's sampling defaults: pure greedy, fixed length.
    gen_cfg = GenerationConfig(max_new_tokens=max_out, min_new_tokens=max_out, do_sample=False,
                               pad_token_id=pad_id, eos_token_id=model.generation_config.eos_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    if out.shape[1] != max_in + max_out:
        raise RuntimeError(f"HF generate produced {out.shape[1] - max_in} tokens, expected {max_out}")
    return len(batch) * (max_in + max_out)


def _run_static(model, requests: list[BenchRequest], batch_size: int, pad_id: int) -> dict:
    t0 = time.perf_counter()
    computed = sum(_generate_batch(model, requests[i:i + batch_size], pad_id)
                   for i in range(0, len(requests), batch_size))
    elapsed = time.perf_counter() - t0
    return {"batch_size": batch_size, **throughput_metrics(requests, elapsed), "computed_tokens": computed}


def _estimate_full_s(res: dict, batch_size: int, n_full: int) -> float:
    """Scale a subset run to the full set by batch count (each static batch costs about the same)."""
    n_sub_batches = -(-res["num_requests"] // batch_size)
    return res["elapsed_s"] * (-(-n_full // batch_size)) / n_sub_batches


def _estimate_phase(model, requests, batch_sizes, pad_id) -> list[dict]:
    rows = []
    for bs in batch_sizes:
        subset = requests[:bs * _ESTIMATE_BATCHES]
        row = _run_static(model, subset, bs, pad_id)
        row["scope"] = "full" if len(subset) == len(requests) else f"first {len(subset)} requests"
        row["est_full_elapsed_s"] = _estimate_full_s(row, bs, len(requests))
        rows.append(row)
    return rows


def _full_phase(model, requests, rows, time_budget_s, pad_id) -> tuple[dict, str]:
    """Measure on the full set: all batch sizes if the budget allows, else only the estimated best."""
    pending = [r for r in rows if r["scope"] != "full"]
    est_all = sum(r["est_full_elapsed_s"] for r in pending)
    if pending and time_budget_s is not None and est_all <= time_budget_s:
        for r in pending:
            r.update(_run_static(model, requests, r["batch_size"], pad_id), scope="full")
        method = "every batch size measured on the full request set (time budget allowed it)"
    else:
        best = max(rows, key=lambda r: r["total_tokens_per_s"])
        if best["scope"] != "full":
            best.update(_run_static(model, requests, best["batch_size"], pad_id), scope="full")
        method = (f"each batch size estimated on its first {_ESTIMATE_BATCHES} batches of requests; "
                  "the best estimate was then measured on the full request set")
    full = [r for r in rows if r["scope"] == "full"]
    return max(full, key=lambda r: r["total_tokens_per_s"]), method


def run_hf(model_dir: str, gguf_file: str | None, requests: list[BenchRequest], dtype: torch.dtype,
           batch_sizes: list[int], time_budget_s: float | None = None) -> dict:
    """Best static-batch HF ``generate`` throughput over ``batch_sizes`` (greedy, forced output lengths)."""
    if not requests:
        raise ValueError("no requests")
    sizes = sorted({min(int(b), len(requests)) for b in batch_sizes if int(b) >= 1})
    if not sizes:
        raise ValueError(f"no valid batch size in {batch_sizes}")
    model = load_hf_model(model_dir, gguf_file, dtype)
    pad_id = _pad_id(model)
    _generate_batch(model, [BenchRequest(requests[0].prompt_token_ids[:8], 2)], pad_id)  # warm-up, untimed
    rows = _estimate_phase(model, requests, sizes, pad_id)
    best, method = _full_phase(model, requests, rows, time_budget_s, pad_id)
    keys = ("batch_size", "num_requests", "input_tokens", "output_tokens", "elapsed_s",
            "total_tokens_per_s", "output_tokens_per_s", "requests_per_s", "computed_tokens")
    return {"system": "HF transformers", **{k: best[k] for k in keys},
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": model.config._attn_implementation,
            "method": method + "; static batches, left padding, greedy, EOS suppressed; timed after a warm-up",
            "per_batch_size": rows}
