"""The paper's cost model (§3.1-3.5): Eq. 1-5, the bound classification and a Table 2 style
per-operation breakdown of one iteration (the whole dense batch through all layers).

Conventions (docs/paper-notes.md, sections 1-4): hardware numbers are aggregate
over the instance; collectives are 2 ring AllReduces per layer over one-way link bandwidth;
"params" is P_model, the GEMM weights one token multiplies through (MoE: active ones).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nanoflow.models.config import ModelConfig, get_preset
from nanoflow.costmodel.hardware import Hardware

# --- Eq. 1-4 ----------------------------------------------------------------------------------


def t_mem(hw: Hardware) -> float:
    """Eq. 1: at the largest batch every iteration streams all device memory once (seconds)."""
    return hw.total_mem_bytes / hw.total_mem_bw


def t_compute(params: float, dense_batch: float, hw: Hardware) -> float:
    """Eq. 2: dense GEMMs dominate, 2 FLOPs per weight per token (seconds)."""
    return 2.0 * dense_batch * params / hw.total_flops


def net_bytes_per_device(cfg: ModelConfig, dense_batch: float, dtype_bytes: int, n: int) -> float:
    """Bytes one device sends per iteration under TP=n: 2 ring AllReduces per layer, each moving
    2(n-1)/n of the activation (4 x B x D x S x L with the ring factor -> 3.5 for n = 8)."""
    if n <= 1:
        return 0.0
    return 4.0 * (n - 1) / n * dense_batch * cfg.hidden_size * dtype_bytes * cfg.num_layers


def t_net(cfg: ModelConfig, dense_batch: float, dtype_bytes: int, hw: Hardware) -> float:
    """Eq. 3 with the ring factor and one-way bandwidth that reproduce Fig. 2 (seconds)."""
    nbytes = net_bytes_per_device(cfg, dense_batch, dtype_bytes, hw.num_devices)
    if nbytes == 0.0:
        return 0.0
    return math.inf if hw.net_bw_oneway <= 0 else nbytes / hw.net_bw_oneway


def t_ratio(params: float, dense_batch: float, hw: Hardware) -> float:
    """Eq. 4: T_R = T_mem / T_compute; below 1 means compute-bound."""
    return t_mem(hw) / t_compute(params, dense_batch, hw)


def classify(t_comp: float, t_mem_: float, t_net_: float) -> str:
    """The resource with the longest time bounds the iteration (§3.3)."""
    worst = max(("compute", t_comp), ("memory", t_mem_), ("network", t_net_), key=lambda kv: kv[1])
    return f"{worst[0]}-bound"


# --- B_dense from KV capacity (Fig. 3 reconstruction) ------------------------------------------


def kv_capacity_tokens(cfg: ModelConfig, hw: Hardware, dtype_bytes: int, weight_params: float) -> float:
    """Tokens of KV that fit next to the weights (activations ignored, as in §3.1); 0 if none."""
    free = hw.total_mem_bytes - weight_params * dtype_bytes
    return max(free, 0.0) / cfg.kv_bytes_per_token(dtype_bytes)


def steady_dense_batch(capacity_tokens: float, prompt_len: float, decode_len: float) -> float:
    """Steady state: a live request holds p + d/2 tokens of KV on average, so N_req = C/(p + d/2);
    each iteration carries N_req decode tokens plus N_req x p/d prefill tokens."""
    n_req = capacity_tokens / (prompt_len + decode_len / 2)
    return n_req * (prompt_len + decode_len) / decode_len


# --- Eq. 5 -------------------------------------------------------------------------------------


def optimal_throughput_params(params: float, peak_flops: float) -> float:
    """Eq. 5 for a given P_model: tokens/s per device at compute peak `peak_flops` per device."""
    return peak_flops / (2.0 * params)


def optimal_throughput(cfg: ModelConfig, peak_flops: float, include_lm_head: bool = True) -> float:
    """Eq. 5: optimal total (prefill + decode) tokens/s per device, `peak_flops` per device.
    Independent of memory, p and d in the compute-bound regime."""
    return optimal_throughput_params(cfg.gemm_params(include_lm_head), peak_flops)


# --- Table 2: per-operation breakdown ----------------------------------------------------------


@dataclass(frozen=True)
class OpCost:
    """One operation over the whole iteration, aggregate over devices (Table 2 units)."""

    name: str
    gflop: float
    mem_gb: float
    net_gb: float
    t_compute_ms: float
    t_mem_ms: float
    t_net_ms: float

    @property
    def t_ms(self) -> float:
        return max(self.t_compute_ms, self.t_mem_ms, self.t_net_ms)

    @property
    def bound(self) -> str:
        return classify(self.t_compute_ms, self.t_mem_ms, self.t_net_ms)


def _op(name: str, flops: float, mem: float, net: float, hw: Hardware) -> OpCost:
    net_bw = hw.net_bw_oneway * hw.num_devices
    t_n = 0.0 if net == 0 else (math.inf if net_bw <= 0 else net / net_bw * 1e3)
    return OpCost(name, flops / 1e9, mem / 1e9, net / 1e9,
                  flops / hw.total_flops * 1e3, mem / hw.total_mem_bw * 1e3, t_n)


def _gemm(name: str, n: int, k: int, tokens: float, layers: int, s: int, hw: Hardware) -> OpCost:
    # Weights read once per iteration plus input and output activations.
    return _op(name, 2.0 * tokens * n * k * layers, (n * k + tokens * (n + k)) * s * layers, 0.0, hw)


def op_breakdown(cfg: ModelConfig, hw: Hardware, dense_batch: float, prompt_len: float,
                 decode_len: float, dtype_bytes: int = 2, include_lm_head: bool = True) -> list[OpCost]:
    """Table 2 rows for one iteration. The batch holds n_d = B d/(p+d) decode tokens with p + d/2
    tokens of context on average and n_p = B p/(p+d) prefill tokens each attending to p keys
    (the paper counts the full square); this reproduces Table 2 with p/d = 512/1024."""
    b, s, L = dense_batch, dtype_bytes, cfg.num_layers
    d, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    n_d = b * decode_len / (prompt_len + decode_len)
    n_p = b - n_d
    ctx = prompt_len + decode_len / 2
    # Attention activations per token and layer: read q, write o, append the new k and v.
    act = (2 * q + 2 * kv) * s * L
    kv_tok = cfg.kv_bytes_per_token(s)
    n = hw.num_devices
    net = net_bytes_per_device(cfg, b, s, n) * n
    ops = [
        _gemm("KQV", q + 2 * kv, d, b, L, s, hw),
        _gemm("O", d, q, b, L, s, hw),
        _gemm("UG", 2 * inter, d, b, L, s, hw),
        _gemm("D", d, inter, b, L, s, hw),
        _op("DecAttn", 4.0 * q * n_d * ctx * L, n_d * ctx * kv_tok + n_d * act, 0.0, hw),
        _op("PfAttn", 4.0 * q * n_p * prompt_len * L, n_p * act, 0.0, hw),
        # Reduce-scatter adds (n-1)/n x B x D per device per AllReduce; bytes also touch memory.
        _op("Net", 2.0 * (n - 1) * b * d * L, net, net, hw),
    ]
    if include_lm_head:
        # Logits only at sampled positions: every decode token plus one per finishing prefill.
        sampled = n_d + n_p / max(prompt_len, 1.0)
        ops.append(_gemm("LMHead", cfg.vocab_size, d, sampled, 1, s, hw))
    return ops


def op_totals(ops: list[OpCost]) -> dict[str, float]:
    """Table 2's total row (ms per resource) and the serial sum of per-op maxima."""
    return {"t_compute_ms": sum(o.t_compute_ms for o in ops), "t_mem_ms": sum(o.t_mem_ms for o in ops),
            "t_net_ms": sum(o.t_net_ms for o in ops), "t_serial_ms": sum(o.t_ms for o in ops)}


# --- Everything for one configuration ----------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """Eq. 1-5 and the per-op sums for one model x hardware x batch x workload."""

    model: str
    hardware: str
    num_devices: int
    dtype_bytes: int
    dense_batch: float
    prompt_len: float
    decode_len: float
    params: float
    t_compute_s: float
    t_mem_s: float
    t_net_s: float
    bound: str
    t_r: float
    net_over_compute: float
    kv_capacity_tokens: float
    steady_dense_batch: float
    t_r_steady: float | None
    optimal_per_device: float
    optimal_total: float
    ops: list[OpCost]

    def op_totals(self) -> dict[str, float]:
        return op_totals(self.ops)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ops"] = [dict(asdict(o), t_ms=o.t_ms, bound=o.bound) for o in self.ops]
        totals = self.op_totals()
        out["op_totals"] = dict(totals, bound=classify(totals["t_compute_ms"], totals["t_mem_ms"],
                                                       totals["t_net_ms"]))
        return _finite(out)


def _finite(x):
    """JSON has no inf/nan: map them to null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def analyze(cfg: ModelConfig, hw: Hardware, dense_batch: float, prompt_len: float, decode_len: float,
            dtype_bytes: int = 2, params: float | None = None,
            weight_params: float | None = None) -> Roofline:
    """All of §3's quantities. `params` overrides P_model (e.g. the paper's nominal 70e9);
    `weight_params` overrides the stored parameter count used for KV capacity (MoE: all experts)."""
    p_model = float(params) if params is not None else float(cfg.gemm_params(True))
    w_params = float(weight_params) if weight_params is not None else (
        p_model if params is not None else float(cfg.num_parameters()))
    tc = t_compute(p_model, dense_batch, hw)
    tm = t_mem(hw)
    tn = t_net(cfg, dense_batch, dtype_bytes, hw)
    cap = kv_capacity_tokens(cfg, hw, dtype_bytes, w_params)
    b_steady = steady_dense_batch(cap, prompt_len, decode_len) if decode_len > 0 else math.inf
    tr_steady = t_ratio(p_model, b_steady, hw) if 0 < b_steady < math.inf else None
    per_dev = optimal_throughput_params(p_model, hw.compute_gflops * 1e9)
    return Roofline(
        model=cfg.name, hardware=hw.name, num_devices=hw.num_devices, dtype_bytes=dtype_bytes,
        dense_batch=dense_batch, prompt_len=prompt_len, decode_len=decode_len, params=p_model,
        t_compute_s=tc, t_mem_s=tm, t_net_s=tn, bound=classify(tc, tm, tn), t_r=tm / tc,
        net_over_compute=tn / tc, kv_capacity_tokens=cap, steady_dense_batch=b_steady,
        t_r_steady=tr_steady, optimal_per_device=per_dev, optimal_total=per_dev * hw.num_devices,
        ops=op_breakdown(cfg, hw, dense_batch, prompt_len, decode_len, dtype_bytes))


# --- Models the paper evaluates that have no preset, and the sizes it plugs in -----------------

# Mixtral 8x7B as a dense model of its active weights: 2 of 8 experts per token, so the FFN is
# twice as wide. LLaMA-3-405B and Deepseek-67B are shape-only (never loaded).
MIXTRAL_8X7B_ACTIVE = ModelConfig("llama", 32000, 4096, 2 * 14336, 32, 32, 8, name="mixtral-8x7b")
LLAMA_3_405B = ModelConfig("llama", 128256, 16384, 53248, 126, 128, 8, name="llama-3-405b")
DEEPSEEK_67B = ModelConfig("llama", 102400, 8192, 22016, 95, 64, 8, name="deepseek-67b")


@dataclass(frozen=True)
class PaperModel:
    """A model as the paper's figures treat it: nominal P_model (MoE: active, about 12.6B, the
    value Fig. 2 and the Fig. 11 optimum imply) and stored weights for KV capacity."""

    cfg: ModelConfig
    params: float
    weight_params: float
    num_devices: int  # devices used in Fig. 3 / Fig. 11


PAPER_MODELS: dict[str, PaperModel] = {
    "llama-3-8b": PaperModel(get_preset("llama-3-8b"), 8e9, 8e9, 1),
    "mixtral-8x7b": PaperModel(MIXTRAL_8X7B_ACTIVE, 12.6e9, 46.7e9, 8),
    "llama-2-70b": PaperModel(get_preset("llama-2-70b"), 70e9, 70e9, 8),
    "llama-3-70b": PaperModel(get_preset("llama-3-70b"), 70e9, 70e9, 8),
    "qwen2-72b": PaperModel(get_preset("qwen2-72b"), 72e9, 72e9, 8),
    "deepseek-67b": PaperModel(DEEPSEEK_67B, 67e9, 67e9, 8),
    "llama-3-405b": PaperModel(LLAMA_3_405B, 405e9, 405e9, 16),
}

# Table 4 mean lengths (input, output) and the constant workloads of Fig. 3 / Fig. 7.
WORKLOADS: dict[str, tuple[float, float]] = {
    "lmsys": (102, 222), "splitwise": (1155, 211), "sharegpt": (246, 322),
    "512/512": (512, 512), "1024/512": (1024, 512), "512/1024": (512, 1024),
}


def fig2_net_over_compute(model: str, hw: Hardware, tp: int = 8, dtype_bytes: int = 2) -> float:
    """One Fig. 2 cell: T_net/T_compute under TP=`tp` (B_dense cancels). Pipeline stages (405B
    runs 8 x 2PP) do not change the ratio: each stage has half the layers and half the params."""
    pm = PAPER_MODELS[model]
    h = hw.with_devices(tp)
    return t_net(pm.cfg, 1.0, dtype_bytes, h) / t_compute(pm.params, 1.0, h)


def fig3_t_ratio(model: str, hw: Hardware, workload: str, dtype_bytes: int = 2) -> float:
    """One Fig. 3 cell: T_R at the steady-state B_dense that the KV capacity allows."""
    pm = PAPER_MODELS[model]
    h = hw.with_devices(pm.num_devices)
    p, d = WORKLOADS[workload]
    cap = kv_capacity_tokens(pm.cfg, h, dtype_bytes, pm.weight_params)
    return t_ratio(pm.params, steady_dense_batch(cap, p, d), h)
