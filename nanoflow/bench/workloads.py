"""Offline-benchmark workloads: trace-sampled or constant-length requests with forced output lengths.

The paper forces every request's output length from the trace (``ignore_eos``), so prompt *content* is
irrelevant to throughput; prompts are seeded random token ids and only their lengths come from the trace.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanoflow import env

TRACE_SPECS = ("splitwise", "lmsys", "sharegpt")
# Token ids below this are often special/control tokens in small vocabularies; keep prompts "plain".
_SAFE_LOW_ID = 100


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def find_traces_dir(traces_dir: str | None = None) -> Path:
    """Locate the trace CSVs: explicit arg, $NANOFLOW_TRACES, <repo>/../shared/traces, <cwd>/../shared/traces."""
    if traces_dir is not None:
        # An explicit directory that doesn't exist is a user error; don't silently fall back.
        if not Path(traces_dir).is_dir():
            raise FileNotFoundError(f"traces dir {traces_dir!r} does not exist")
        return Path(traces_dir)
    repo_root = Path(__file__).resolve().parents[2]  # nanoflow/bench/workloads.py -> repo root
    candidates = [env.traces_dir(),
                  repo_root.parent / "shared" / "traces", Path.cwd().parent / "shared" / "traces"]
    tried = [str(c) for c in candidates if c]
    for cand in tried:
        if Path(cand).is_dir():
            return Path(cand)
    raise FileNotFoundError("trace directory not found; set NANOFLOW_TRACES or pass traces_dir. Tried: "
                            + ", ".join(tried))


@functools.lru_cache(maxsize=8)
def load_trace(path: str) -> np.ndarray:
    """(N, 2) int64 array of (ContextTokens, GeneratedTokens); cached since traces are re-sampled often."""
    # Timestamps are non-numeric (some are literally "XXX"), so only the two length columns are parsed.
    arr = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(1, 2), dtype=np.int64, ndmin=2)
    if arr.shape[0] == 0:
        raise ValueError(f"trace {path} has no rows")
    return arr


def _parse_const(spec: str) -> tuple[int, int]:
    body = spec[len("const:"):]
    try:
        in_s, out_s = body.split("/")
        n_in, n_out = int(in_s), int(out_s)
    except ValueError:
        raise ValueError(f"bad const workload {spec!r}: expected 'const:IN/OUT', e.g. 'const:128/128'") from None
    if n_in < 1 or n_out < 1:
        raise ValueError(f"bad const workload {spec!r}: IN and OUT must be >= 1")
    return n_in, n_out


def _cap_lengths(n_in: int, n_out: int, max_model_len: int,
                 max_input: int | None, max_output: int | None) -> tuple[int, int]:
    """Apply user caps, then fit into the context. The prompt is truncated first (as vLLM's benchmark does),
    because the forced output length is what the trace says the request costs in decode steps."""
    if max_input is not None:
        n_in = min(n_in, max_input)
    if max_output is not None:
        n_out = min(n_out, max_output)
    n_out = max(1, min(n_out, max_model_len - 1))
    n_in = max(1, min(n_in, max_model_len - n_out))
    return n_in, n_out


def _sample_lengths(spec: str, num_requests: int, rng: np.random.Generator,
                    traces_dir: str | None) -> np.ndarray:
    if spec.startswith("const:"):
        n_in, n_out = _parse_const(spec)
        return np.tile(np.array([[n_in, n_out]], dtype=np.int64), (num_requests, 1))
    if spec not in TRACE_SPECS:
        raise ValueError(f"unknown workload {spec!r}: expected one of {', '.join(TRACE_SPECS)} or 'const:IN/OUT'")
    trace = load_trace(str(find_traces_dir(traces_dir) / f"{spec}.csv"))
    # Without replacement when possible so a sample doesn't repeat requests; with replacement otherwise.
    idx = rng.choice(trace.shape[0], size=num_requests, replace=num_requests > trace.shape[0])
    return trace[idx]


def sample_workload(spec: str, num_requests: int, seed: int, vocab_size: int, max_model_len: int,
                    max_input: int | None = None, max_output: int | None = None,
                    traces_dir: str | None = None) -> list[BenchRequest]:
    """Sample ``num_requests`` requests for workload ``spec`` (splitwise|lmsys|sharegpt|const:IN/OUT).

    Deterministic for a given seed. Lengths are capped to max_input/max_output and to
    input + output <= max_model_len, with input >= 1 and output >= 1.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    lengths = _sample_lengths(spec, num_requests, rng, traces_dir)
    low = _SAFE_LOW_ID if vocab_size > 2 * _SAFE_LOW_ID else 0
    requests = []
    for raw_in, raw_out in lengths.tolist():
        n_in, n_out = _cap_lengths(raw_in, raw_out, max_model_len, max_input, max_output)
        ids = rng.integers(low, vocab_size, size=n_in).tolist()
        requests.append(BenchRequest(prompt_token_ids=ids, output_len=n_out))
    return requests


def summarize_workload(requests: list[BenchRequest]) -> dict:
    """Count and length statistics of a workload (for reports and sanity checks)."""
    ins = np.array([r.input_len for r in requests], dtype=np.int64)
    outs = np.array([r.output_len for r in requests], dtype=np.int64)
    return {
        "num_requests": len(requests),
        "input_tokens": int(ins.sum()),
        "output_tokens": int(outs.sum()),
        "mean_input": float(ins.mean()) if len(ins) else 0.0,
        "mean_output": float(outs.mean()) if len(outs) else 0.0,
        "max_input": int(ins.max()) if len(ins) else 0,
        "max_output": int(outs.max()) if len(outs) else 0,
    }


def throughput_metrics(requests: list[BenchRequest], elapsed_s: float) -> dict:
    """The shared metric keys of every offline baseline; only each request's own tokens count as useful."""
    stats = summarize_workload(requests)
    total = stats["input_tokens"] + stats["output_tokens"]
    return {
        "num_requests": stats["num_requests"],
        "input_tokens": stats["input_tokens"],
        "output_tokens": stats["output_tokens"],
        "elapsed_s": elapsed_s,
        "total_tokens_per_s": total / elapsed_s,
        "output_tokens_per_s": stats["output_tokens"] / elapsed_s,
        "requests_per_s": stats["num_requests"] / elapsed_s,
    }


# ---- multi-round conversations (KV reuse benchmark) ----
@dataclass
class Conversation:
    """Rounds of one chat: each round's prompt = the previous round's prompt + its output + `user[k]`;
    `output_lens[k]` is forced (ignore_eos), so only lengths come from the trace, as for single requests."""
    user: list[list[int]]
    output_lens: list[int]

    @property
    def num_rounds(self) -> int:
        return len(self.user)


def parse_multiturn(spec: str) -> tuple[str, int, int]:
    """'multiturn:lmsys' or 'multiturn:lmsys:rounds=3-5' -> (trace, min rounds, max rounds)."""
    parts = spec.split(":")
    trace, lo, hi = (parts[1] if len(parts) > 1 else ""), 3, 5
    for opt in parts[2:]:
        key, _, val = opt.partition("=")
        try:
            if key != "rounds":
                raise ValueError
            lo_s, _, hi_s = val.partition("-")
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            raise ValueError(f"bad multiturn option {opt!r} in {spec!r}: expected rounds=LO-HI") from None
    if trace not in TRACE_SPECS or not 1 <= lo <= hi:
        raise ValueError(f"bad multiturn workload {spec!r}: expected 'multiturn:{{{','.join(TRACE_SPECS)}}}"
                         f"[:rounds=LO-HI]' with 1 <= LO <= HI")
    return trace, lo, hi


def sample_conversations(spec: str, num_conversations: int, seed: int, vocab_size: int, max_model_len: int,
                         max_input: int | None = None, max_output: int | None = None,
                         traces_dir: str | None = None) -> list[Conversation]:
    """Conversations with trace-sampled per-round lengths (user turn = the trace's prompt length, reply = its
    output length, both capped), LO..HI rounds each; rounds that would overflow max_model_len are dropped."""
    trace, lo, hi = parse_multiturn(spec)
    rng = np.random.default_rng(seed)
    low = _SAFE_LOW_ID if vocab_size > 2 * _SAFE_LOW_ID else 0
    convs = []
    for _ in range(num_conversations):
        n_rounds = int(rng.integers(lo, hi + 1))
        lengths = _sample_lengths(trace, n_rounds, rng, traces_dir)
        user, outs, total = [], [], 0
        for raw_in, raw_out in lengths.tolist():
            n_in, n_out = _cap_lengths(raw_in, raw_out, max_model_len, max_input, max_output)
            if total + n_in + n_out > max_model_len:
                break
            user.append(rng.integers(low, vocab_size, size=n_in).tolist())
            outs.append(n_out)
            total += n_in + n_out
        convs.append(Conversation(user, outs))
    return convs


def sample_shared_prefix(spec: str, num_requests: int, num_prefixes: int, prefix_lens: tuple[int, int], seed: int,
                         vocab_size: int, max_model_len: int, max_input: int | None = None,
                         max_output: int | None = None, traces_dir: str | None = None) -> list[BenchRequest]:
    """A batch job with shared prefixes (BatchLLM's setting): `num_prefixes` system prompts of
    prefix_lens[0]..prefix_lens[1] tokens, each request one of them (uniformly) plus a trace-length user turn,
    in shuffled order; output lengths from the trace. Deterministic for a given seed."""
    lo, hi = prefix_lens
    if not 1 <= lo <= hi or hi >= max_model_len:
        raise ValueError(f"prefix lengths {lo}..{hi} must be within 1..{max_model_len - 1}")
    rng = np.random.default_rng(seed)
    low = _SAFE_LOW_ID if vocab_size > 2 * _SAFE_LOW_ID else 0
    prefixes = [rng.integers(low, vocab_size, size=int(rng.integers(lo, hi + 1))).tolist()
                for _ in range(num_prefixes)]
    turns = sample_workload(spec, num_requests, seed + 1, vocab_size, max_model_len - hi, max_input, max_output,
                            traces_dir)
    which = rng.integers(0, num_prefixes, size=num_requests)  # independent draws: the order is already shuffled
    return [BenchRequest(prefixes[k] + t.prompt_token_ids, t.output_len) for k, t in zip(which.tolist(), turns)]
