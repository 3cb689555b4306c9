"""Engine options: one dataclass shared by LLM(...), the CLI and the server."""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field, fields

from nanoflow import env


@functools.lru_cache(maxsize=None)
def preferred_dtype(device: str | None = None) -> str:
    """What `dtype="auto"` means on `device` (None: the best device here): bfloat16 where the hardware multiplies
    it natively (a GPU, or a CPU with AVX512-BF16/AMX), else float32 - on an AVX2-only CPU bf16 GEMMs are
    emulated and about 4x slower."""
    import torch

    from nanoflow.kernels import cpu_ext
    on_gpu = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if on_gpu:
        return "bfloat16"
    return "bfloat16" if cpu_ext.native_bf16() else "float32"


def default_dense_batch(device: str, dtype: str) -> int:
    """The token budget per step that is fastest on this hardware (`dense_batch=None`). A GPU: 2048 (the
    paper's B_dense). A CPU with native bf16 multiplies 1024-row GEMMs ~10% faster than 256-row ones and a
    bigger step amortises the per-step costs (1.36x end to end on const:128/128 x 256, 2 AVX512-BF16 cores);
    in float32 (AVX2-only CPUs, and AVX-512 ones without BF16 such as Ice Lake), 512 did not beat 256
    (docs/benchmarks.md)."""
    if device.startswith("cuda"):
        return 2048
    return 1024 if dtype == "bfloat16" else 256


def resolve_device(device: str) -> str:
    """What `device` means: "auto" -> "cuda" when CUDA is available, else "cpu"; "cpu", "cuda" and "cuda:N" are
    checked here, so a bad value fails with one clear line before any weights load."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, sep, index = device.partition(":")
    if device != "cpu" and (kind != "cuda" or (sep and not index.isdigit())):
        raise ValueError(f"unsupported device {device!r}; choose auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if sep and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


@dataclass
class EngineConfig:
    model: str = "default"
    dtype: str = "auto"  # auto: preferred_dtype(device); bfloat16 | float32
    device: str = "auto"  # auto: cuda if available, else cpu; cpu | cuda | cuda:N (weights, KV cache, every step)
    dense_batch: int | None = None  # tokens per step (NanoFlow's B_dense); None: default_dense_batch(device, dtype)
    executor: str = "sequential"  # NanoFlow's intra-device parallelism: sequential | nanobatch | overlap
    plan: str | None = None  # plan JSON for nanobatch/overlap ("auto": nanoflow tune); None: the default plan
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's context length
    block_size: int = 16
    # Like vLLM's VLLM_CPU_KVCACHE_SPACE: NANOFLOW_KV_CACHE_GB sets the default pool size (tests keep it small).
    kv_cache_gb: float = field(default_factory=env.kv_cache_gb)
    num_kv_blocks: int | None = None  # overrides kv_cache_gb (tests force preemption with it)
    admission_control: bool = True
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    cpp_kernels: bool = True  # C++ CPU kernels (decode attention, fused norm/rope/silu, argmax); off: pure torch
    packed_gemm: bool = True  # prepacked weights for CPU GEMMs (bf16 with native bf16, float32 on AVX2-only CPUs)
    cpp_gemm: bool = True  # those GEMMs in the C++ panel kernels (csrc/gemm_bf16.cpp, gemm_f32.cpp); off: oneDNN's
    # for bf16, F.linear for float32
    fused_greedy_head: bool = True  # CPU: plain greedy steps take tokens from the LM head GEMM's running argmax
    cpp_layer_stack: bool = True  # CPU: a step's layers in one C++ call (decode rows, short prefills; cpp_stack.py)
    batch_invariant: bool = False  # greedy output independent of batch-mates (kernels/batch_invariant.py; CPU)
    paged_prefill: bool = True  # CPU: prefill attention of short contexts through the paged C++ kernel, one call
    packed_kv_cache: bool = True  # CPU bf16 and float32: KV pages laid out for the C++ kernel (attention.py)
    # Schedule step i+1 while step i runs on the device. None: on with a GPU, off on a CPU, where the step's
    # own threads are the device: a scheduling thread beside them cost 1.22x (ShareGPT 512+512 x 64, 2 cores).
    async_scheduling: bool | None = None
    prefix_caching: bool = True  # reuse cached full KV blocks across requests (off: --no-prefix-cache)
    contiguous_kv_blocks: bool = True  # place a request's KV blocks next to each other (block_manager.py)
    host_kv_cache_gb: float = 0.0  # host-memory KV tier for finished requests' blocks (0: off)
    disk_kv_cache_gb: float = 0.0  # on-disk KV tier behind the host tier (0: off)
    kv_cache_dir: str | None = None  # directory of the disk tier (default env.cache_dir("kv"))
    # Tensor parallelism (distributed/): ranks split each layer; rank 0 lives in the engine process and samples.
    tensor_parallel_size: int = 1
    nnodes: int = 1  # machines the ranks span (each runs its share of ranks; node 0 runs the engine)
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # rendezvous of the ranks (node 0's address when nnodes > 1)
    master_port: int = 0  # 0: a free port (one node only)
    distributed_timeout_s: float = 60.0  # a collective that cannot finish by then fails the step (dead/hung rank)
    # Offline jobs (nanoflow/batch): N engine processes, each on its own cores/device (engine/data_parallel.py)
    data_parallel_size: int = 1
    prefix_grouping: bool = True  # offline jobs admit requests sharing a prompt prefix together (batch/grouping.py)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.dtype == "auto":
            self.dtype = preferred_dtype(self.device)
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.dense_batch is None:
            self.dense_batch = default_dense_batch(self.device, self.dtype)
        if self.executor not in ("sequential", "nanobatch", "overlap"):
            raise ValueError(f"executor must be sequential, nanobatch or overlap, got {self.executor!r}")
        for name in ("dense_batch", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        for name in ("host_kv_cache_gb", "disk_kv_cache_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size % self.nnodes or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} must be a multiple of nnodes "
                             f"{self.nnodes}, and node_rank in [0, nnodes)")
        if self.tensor_parallel_size > 1 and (self.host_kv_cache_gb or self.disk_kv_cache_gb):
            raise ValueError("the host/disk KV tiers hold one device's KV: not with tensor_parallel_size > 1")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}")
        if (self.host_kv_cache_gb or self.disk_kv_cache_gb) and not self.prefix_caching:
            raise ValueError("the host/disk KV tiers are keyed by prefix-cache hashes: they need prefix caching")


def add_model_arguments(g, device: bool = True) -> None:
    """--model, --dtype, --device (unless `device` is False) and --dense-batch with the engine's defaults: the
    options every command that loads or models a model shares (engine commands, profile, tune, roofline)."""
    g.add_argument("--model", default=EngineConfig.model,
                   help="'default' (SmolLM2-135M-Instruct), a .gguf file, an HF directory or dummy:<preset>")
    g.add_argument("--dtype", default=EngineConfig.dtype,
                   help="auto (bfloat16 where the hardware multiplies it natively, else float32) | bfloat16 | float32")
    if device:
        g.add_argument("--device", default=EngineConfig.device,
                       help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N: where the weights, the KV "
                            "cache and every step live")
    g.add_argument("--dense-batch", type=int, default=None,
                   help="token budget per step (default: the hardware's best: 1024 on a CPU with native bf16, "
                        "256 on an AVX2-only CPU, 2048 on a GPU)")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    add_model_arguments(g)
    g.add_argument("--executor", default=d.executor,
                   help="sequential | nanobatch | overlap: each step's layers as one batch, as the plan's "
                        "nano-batches, or overlapped on execution units (bench offline: a comma list)")
    g.add_argument("--plan", default=None, help="plan JSON for --executor nanobatch/overlap, or 'auto'")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--kv-cache-gb", type=float, default=d.kv_cache_gb,
                   help="KV pool size on the device (a fixed size, also on a GPU: size it to the free memory left "
                        "after the weights; NANOFLOW_KV_CACHE_GB sets the default)")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--no-admission-control", dest="admission_control", action="store_false")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--num-threads", type=int, default=None)
    g.add_argument("--no-cpp-kernels", dest="cpp_kernels", action="store_false",
                   help="pure-torch CPU path: no C++ kernels, one-GEMM LM head (ablation; also NANOFLOW_NO_CPP=1)")
    g.add_argument("--no-packed-gemm", dest="packed_gemm", action="store_false",
                   help="F.linear instead of prepacked weights for CPU GEMMs (ablation)")
    g.add_argument("--no-cpp-gemm", dest="cpp_gemm", action="store_false",
                   help="no C++ panel GEMM (ablation): oneDNN for bf16 on an AVX512-BF16 CPU (the C++ kernel is "
                        "1.1-1.4x oneDNN at decode batches of 1-128 rows), F.linear for float32 on an AVX2-only CPU")
    g.add_argument("--no-fused-greedy-head", dest="fused_greedy_head", action="store_false",
                   help="CPU (C++ panel GEMM): compute the logits and then their argmax for plain greedy steps instead "
                        "of one LM-head kernel that keeps a running argmax (ablation; the tokens are the same)")
    g.add_argument("--no-cpp-layer-stack", dest="cpp_layer_stack", action="store_false",
                   help="CPU: run a step's layers from Python op by op instead of one C++ call of the same kernels "
                        "(steps of decode rows and prefill chunks up to 1024 tokens of context; ablation, the "
                        "tokens are the same)")
    g.add_argument("--no-paged-prefill", dest="paged_prefill", action="store_false",
                   help="CPU: prefill attention with SDPA per chunk instead of the paged C++ kernel, one call per "
                        "step, for contexts up to 1024 tokens (ablation)")
    g.add_argument("--no-contiguous-kv-blocks", dest="contiguous_kv_blocks", action="store_false",
                   help="hand out free KV blocks in pool order instead of placing a request's blocks next to each "
                        "other (ablation: CPU decode attention reads them as scattered pages)")
    g.add_argument("--no-packed-kv-cache", "--no-packed-k-cache", dest="packed_kv_cache", action="store_false",
                   help="CPU (bf16 and float32): K and V pages in [slot, head, dim] rows instead of packed, head by "
                        "head, for the C++ attention kernel's dot products (ablation)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="every reduction in a fixed order, so a request's logits (and greedy tokens) do not depend "
                        "on its batch-mates, the executor or prompt chunking (CPU; costs throughput)")
    g.add_argument("--async", dest="async_scheduling", action="store_true", default=None,
                   help="schedule step i+1 while step i runs (the default on a GPU; off by default on a CPU, where "
                        "the scheduling thread competes with the step's own threads)")
    g.add_argument("--no-async", dest="async_scheduling", action="store_false", default=None,
                   help="schedule each step only after the previous one's tokens are read (the default on a CPU)")
    g.add_argument("--no-prefix-cache", dest="prefix_caching", action="store_false",
                   help="do not reuse cached KV blocks of shared prompt prefixes")
    g.add_argument("--host-kv-cache-gb", type=float, default=d.host_kv_cache_gb,
                   help="host-memory tier for finished requests' KV blocks (0: off)")
    g.add_argument("--disk-kv-cache-gb", type=float, default=d.disk_kv_cache_gb,
                   help="on-disk KV tier behind the host tier (0: off); survives restarts")
    g.add_argument("--kv-cache-dir", default=None, help="directory of the disk KV tier (default: <cache dir>/kv)")
    g.add_argument("--tensor-parallel-size", "-tp", default=str(d.tensor_parallel_size),
                   help="split every layer over N ranks (processes pinned to their own cores on a CPU, one GPU "
                        "each on CUDA; gloo / NCCL). bench offline: a comma list")
    g.add_argument("--nnodes", type=int, default=d.nnodes, help="machines the tensor-parallel ranks span")
    g.add_argument("--node-rank", type=int, default=d.node_rank, help="this machine's index (0 runs the engine)")
    g.add_argument("--master-addr", default=d.master_addr, help="rendezvous address of the ranks (node 0)")
    g.add_argument("--master-port", type=int, default=d.master_port, help="rendezvous port (0: pick a free one)")
    g.add_argument("--distributed-timeout", dest="distributed_timeout_s", type=float,
                   default=d.distributed_timeout_s,
                   help="seconds a collective may wait for a rank before the step fails (a dead or hung worker)")
    g.add_argument("--data-parallel-size", type=int, default=d.data_parallel_size,
                   help="engine replicas, each in its own process on its own cores (CPU) or GPU")
    g.add_argument("--no-prefix-grouping", dest="prefix_grouping", action="store_false",
                   help="offline jobs: admit in input order instead of grouping requests that share a prefix")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kw = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    if isinstance(kw.get("tensor_parallel_size"), str):  # bench offline takes a comma list: the first here
        kw["tensor_parallel_size"] = int(kw["tensor_parallel_size"].split(",")[0])
    return EngineConfig(**kw)
