"""Every environment variable nanoflow reads, with what it means; modules read them only through these
accessors (read at call time, so a test's monkeypatch.setenv takes effect).

| variable | meaning |
|---|---|
| NANOFLOW_KV_CACHE_GB | default size of the KV pool per device in GB (`--kv-cache-gb`; 2.0) |
| NANOFLOW_NO_CPP | `1`: never use the C++ CPU kernels (the pure-torch path), whatever the engine asks |
| NANOFLOW_CPP_BUILD_TIMEOUT | seconds to wait for another process's C++ kernel build before using torch (600) |
| NANOFLOW_CACHE_DIR | root of nanoflow's caches (profiles, plans, C++ builds, converted models, disk KV tier) |
| XDG_CACHE_HOME | where the cache root defaults to `<XDG_CACHE_HOME>/nanoflow` (else ~/.cache/nanoflow) |
| NANOFLOW_HUGE_PAGES | `0`: leave the CPU KV cache and packed weights on 4 KB pages (kernels/host_memory.py) |
| NANOFLOW_CUDA_GRAPHS | `0`: run CUDA steps eagerly instead of as CUDA graphs |
| NANOFLOW_SM_PARTITION | how CUDA execution units split the SMs when the plan does not say (auto, or a mechanism) |
| NANOFLOW_TRACES | directory of the benchmark request traces (else ../shared/traces) |
| NANOFLOW_VLLM_VENV | vLLM's virtualenv for the vLLM baseline (else .venv-vllm at the repository root) |
| RANK, WORLD_SIZE | set by torchrun: this process is that tensor-parallel rank (env:// rendezvous) |
"""
from __future__ import annotations

import os


def kv_cache_gb() -> float:
    return float(os.environ.get("NANOFLOW_KV_CACHE_GB", "2.0"))


def no_cpp() -> bool:
    return os.environ.get("NANOFLOW_NO_CPP") == "1"


def cpp_build_timeout_s(default: float) -> float:
    return float(os.environ.get("NANOFLOW_CPP_BUILD_TIMEOUT", default))


def cache_dir(kind: str = "") -> str:
    """$NANOFLOW_CACHE_DIR/<kind>, else ~/.cache/nanoflow/<kind> (XDG_CACHE_HOME honoured): the one root of
    peak.json, profiles, plans, C++ builds, converted models and the disk KV tier."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get("NANOFLOW_CACHE_DIR") or os.path.join(xdg, "nanoflow")
    return os.path.join(root, kind) if kind else root


def huge_pages() -> bool:
    return os.environ.get("NANOFLOW_HUGE_PAGES", "1") != "0"


def cuda_graphs() -> bool:
    return os.environ.get("NANOFLOW_CUDA_GRAPHS", "1") != "0"


def sm_partition() -> str | None:
    return os.environ.get("NANOFLOW_SM_PARTITION") or None


def traces_dir() -> str | None:
    return os.environ.get("NANOFLOW_TRACES") or None


def vllm_venv() -> str | None:
    return os.environ.get("NANOFLOW_VLLM_VENV") or None


def torchrun_rank() -> int | None:
    """This process's rank when torchrun started it, else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None
