"""Measured peaks of this machine: GEMM FLOP/s at the model's real shapes (the `Compute` of Eq. 5,
which the paper measures rather than takes from a datasheet) and memory bandwidth.

Results are cached in <cache dir>/peak.json (env.cache_dir) so a second run is instant. A peak is the best the
machine has shown: a re-measurement keeps the larger of the new and the cached value, because a measurement
taken while other work shares the cores can only come out low (it must never lower the optimum).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from nanoflow.env import cache_dir
from nanoflow.models.config import ModelConfig

MAX_WEIGHT_BYTES = 512 * 2**20  # slice N beyond this: FLOP/s, not the full weight, is the point
MAX_CALL_FLOPS = {"cpu": 2e10, "cuda": 2e13}  # keep one call well under the time budget


def default_cache_path() -> str:
    return os.path.join(cache_dir(), "peak.json")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _cached(path: str, key: str) -> float:
    """The stored peak for `key`, 0.0 if there is none (or it is not a positive number)."""
    value = _load(path).get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


def _store(path: str, key: str, value: float) -> None:
    data = _load(path)
    data[key] = value
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: concurrent runs never see half a file


def _device_tag(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:threads={torch.get_num_threads()}"


def _sync(device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def gemm_shapes(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(name, N, K, calls per model pass) for fused qkv, o, fused gate_up, down and the LM head."""
    L, d = cfg.num_layers, cfg.hidden_size
    return [("qkv", cfg.q_size + 2 * cfg.kv_size, d, L), ("o", d, cfg.q_size, L),
            ("gate_up", 2 * cfg.intermediate_size, d, L), ("down", d, cfg.intermediate_size, L),
            ("lm_head", cfg.vocab_size, d, 1)]


def _sliced_n(n: int, k: int, m: int, elt: int, device: str) -> int:
    """Largest N (multiple of 64 when sliced) within the weight-size and per-call FLOP caps."""
    cap = min(MAX_WEIGHT_BYTES // (k * elt), int(MAX_CALL_FLOPS["cuda" if device.startswith("cuda")
                                                               else "cpu"] // (2 * m * k)))
    return n if n <= cap else max(64, cap // 64 * 64)


def _time_linear(x: torch.Tensor, w: torch.Tensor, budget: float, sync: Callable[[], None]) -> float:
    """Seconds per call of x @ w^T after warmup: the fastest single call within `budget`, of F.linear and,
    where the engine uses them, prepacked weights for oneDNN (bf16 on a CPU with native bf16) and for the C++
    panel GEMMs (those, and float32 on an AVX2-only CPU): the peak is the fastest GEMM the machine has, whatever
    the engine runs. The fastest, not the mean: this is a peak, and on a shared machine a descheduled OpenMP
    thread makes some calls several times slower."""
    from nanoflow.models.layers import gemm_panels_supported, pack_weight, packed_gemm_supported, packed_linear
    best = _time_call(lambda: F.linear(x, w), budget, sync)
    kinds = ["onednn"] if packed_gemm_supported(w.dtype, w.device) else []
    kinds += ["panels"] if w.device.type == "cpu" and gemm_panels_supported(w.dtype) else []
    for kind in kinds:
        packed = pack_weight(w, x.shape[0], kind)
        best = min(best, _time_call(lambda p=packed: packed_linear(x, p), budget, sync))
    return best


def _time_call(fn: Callable[[], object], budget: float, sync: Callable[[], None]) -> float:
    for _ in range(2):
        fn()
    sync()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


@torch.inference_mode()
def _measure_gemm(cfg: ModelConfig, dtype: torch.dtype, m: int, seconds: float, device: str) -> float:
    shapes = gemm_shapes(cfg)
    elt = torch.empty((), dtype=dtype).element_size()
    sync = _sync(device)
    total_flops = total_time = 0.0
    for _, n, k, calls in shapes:
        ns = _sliced_n(n, k, m, elt, device)
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(ns, k, dtype=dtype, device=device) * k**-0.5
        rate = 2.0 * m * ns * k / _time_linear(x, w, seconds / len(shapes), sync)
        full = 2.0 * m * n * k * calls  # the full-size op runs at the sliced op's rate
        total_flops += full
        total_time += full / rate
        del x, w
    return total_flops / total_time


def measure_gemm_peak(cfg: ModelConfig, dtype: torch.dtype, m: int, seconds: float = 1.0,
                      refresh: bool = False, device: str = "cpu", cache_path: str | None = None) -> float:
    """Aggregate GEMM FLOP/s of one model pass at M = m tokens: total FLOPs over total time, each
    layer shape timed with torch's own F.linear (weights [N, K] in `dtype`). Cached per
    (shape, dtype, m, device/threads); `refresh` re-measures and keeps the larger value."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    path = cache_path or default_cache_path()
    shape = "x".join(str(v) for v in (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                                      cfg.q_size, cfg.kv_size, cfg.vocab_size))
    key = f"gemm|{shape}|{str(dtype).replace('torch.', '')}|m={m}|{_device_tag(device)}"
    cached = _cached(path, key)
    if cached and not refresh:
        return cached
    value = max(cached, _measure_gemm(cfg, dtype, m, seconds, device))
    _store(path, key, value)
    return value


@torch.inference_mode()
def measure_mem_bandwidth(seconds: float = 0.5, nbytes: int = 256 * 2**20, refresh: bool = False,
                          device: str = "cpu", cache_path: str | None = None) -> float:
    """Streaming bandwidth in bytes/s from large tensor copies (each copy reads and writes nbytes).
    Much larger than any cache, so this is DRAM / HBM bandwidth."""
    path = cache_path or default_cache_path()
    key = f"membw|{nbytes}|{_device_tag(device)}"
    cached = _cached(path, key)
    if cached and not refresh:
        return cached
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = _sync(device)
    dst.copy_(src)  # warmup: fault in the pages
    sync()
    copies, t0 = 0, time.perf_counter()
    while copies < 3 or time.perf_counter() - t0 < seconds:
        dst.copy_(src)
        copies += 1
        sync()
    value = max(cached, 2.0 * nbytes * copies / (time.perf_counter() - t0))
    _store(path, key, value)
    return value
