"""Shared Llama-family building blocks: pure math on tensors, no engine state."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoflow.kernels import cpu_ext, host_memory


def _fused_ext(x: torch.Tensor):
    """The C++ kernels for CPU tensors (one pass instead of torch's 3-6 with temporaries); None with
    --no-cpp-kernels, whose float32 path keeps HF's exact op order (bit-identical to the reference)."""
    return cpu_ext.get() if x.device.type == "cpu" else None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, adds it first and returns (normed, new_residual), saving a pass."""
        ext = _fused_ext(x) if residual is not None and x.is_contiguous() else None
        if ext is not None and self.weight.dtype == x.dtype:  # one pass, in place on both
            ext.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:  # HF's exact op order, so float32 matches the reference bit for bit
            y = F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight
        else:  # one fused pass (accumulates in float32 internally)
            y = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return y if residual is None else (y, residual)


@dataclass
class RopeInputs:
    """Per-step RoPE state shared by every layer: positions, plus the torch path's [T, 1, D] cos/sin."""
    positions: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> "RopeInputs":
        """The inputs of token rows [start, end) (a nano-batch)."""
        cut = (lambda t: None if t is None else t[start:end])
        return RopeInputs(self.positions[start:end], cut(self.cos), cut(self.sin))


class RotaryEmbedding(nn.Module):
    """Default (unscaled) RoPE with a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        # The C++ kernel's float32 table, [cos | sin] of the distinct frequencies. A plain attribute,
        # not a buffer, so model.to(bfloat16) leaves it in float32.
        half = head_dim // 2
        self.cos_sin = torch.cat((emb.cos()[:, :half], emb.sin()[:, :half]), -1).contiguous()

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeInputs:
        """Once per step; the torch path's cos/sin tables are looked up here, not in every layer."""
        if cpu_ext.get() is not None and positions.device.type == "cpu":
            return RopeInputs(positions)
        return RopeInputs(positions, self.cos[positions].to(dtype).unsqueeze(1),
                          self.sin[positions].to(dtype).unsqueeze(1))

    def apply_(self, x: torch.Tensor, num_heads: int, head_dim: int, rope: RopeInputs) -> None:
        """Rotate the first `num_heads` heads of each row of x [T, cols] in place (q and k heads are
        adjacent columns of the fused qkv output), HF's rotate-half convention."""
        if rope.cos is None:
            cpu_ext.get().rope_inplace(x, rope.positions, self.cos_sin, num_heads, head_dim)
            return
        heads = x[:, : num_heads * head_dim].view(x.shape[0], num_heads, head_dim)
        heads.copy_(apply_rope(heads, rope.cos, rope.sin))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] -> rotated copy."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Linear(nn.Module):
    """y = x W^T (+ b); weights kept in the serving dtype, never trained. `packed` (set by `prepack_linears`)
    is the same weight prepacked for a CPU GEMM (`PackedWeight`), used by forward; `weight` stays for the
    paths that write GEMM results into rows of a buffer (nano-batches) and for other devices. `batch_invariant` (set by
    `kernels.batch_invariant.enable`): every GEMM in fixed tiles of GEMM_TILE_ROWS rows (`tiled_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed: PackedWeight | None = None
        self.batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return tiled_linear(x, self.weight, self.bias, self.packed)
        if self.packed is not None and not self.packed.glu:  # (a GLU-packed weight is MLP.gate_up's)
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def packed_gemm_supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    """oneDNN prepacked weights pay for bfloat16 on a CPU that multiplies bf16 natively: 1.05-1.15x F.linear
    at M >= 256 and 1.3-1.8x at M <= 64 (SmolLM2's shapes, 2 AVX512-BF16 cores), with bit-identical results.
    Not for float32 (oneDNN sums in another order): there the C++ panel GEMM runs (gemm_panels_supported). Not
    where oneDNN only emulates bf16 (AVX-512 without AVX512-BF16, e.g. Ice Lake: `_is_mkldnn_bf16_supported()` is
    true there, but its bias add rounds differently from F.linear's)."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and cpu_ext.native_bf16()
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class PackedWeight:
    """A linear weight prepacked once for a CPU GEMM: "panels" for the C++ kernels (bf16: kernels/csrc/gemm_bf16.cpp,
    64-column panels of bf16 pairs; float32: gemm_f32.cpp, 16-column panels), "onednn" for oneDNN's blocked
    layout. `weight` is the [N, K] original (not a copy): the fallback when a step runs with C++ kernels off. `glu`
    (panels, an MLP's fused gate/up weight): the GEMM returns silu(gate) * up [M, N / 2], computed from its float32
    sums."""
    kind: str
    data: torch.Tensor
    weight: torch.Tensor
    glu: bool = False


def gemm_panels_supported(dtype: torch.dtype) -> bool:
    """The C++ panel GEMM runs here (C++ kernels on): bf16 built with AVX512-BF16; float32 built with AVX2+FMA (its
    AVX-512 tile where the CPU has AVX-512: as fast as oneDNN's prepacked float32 at M = 256, faster at M = 64)."""
    ext = cpu_ext.get()
    if ext is None:
        return False
    if dtype == torch.bfloat16:
        return ext.gemm_bf16_supported()
    return dtype == torch.float32 and ext.gemm_f32_supported()


def pack_weight(w: torch.Tensor, m_hint: int, kind: str = "onednn", glu: bool = False) -> PackedWeight:
    """`w` [N, K] in `kind`'s layout; oneDNN's is blocked for GEMMs of about `m_hint` rows (any M works).
    `glu`: `w` is gate rows then up rows, packed for the fused silu(gate) * up (panels, N a multiple of 2 panels).
    Panels: bf16 [N / 64, K / 2, 64, 2] (pairs of K for vdpbf16ps), float32 [N / 16, K, 16]."""
    if kind == "panels" and w.dtype == torch.float32:
        return _pack_panels(w, 16, glu, lambda p, k: p.view(-1, 16, k).permute(0, 2, 1))
    if kind == "panels" and w.shape[1] % 2 == 0:
        return _pack_panels(w, 64, glu, lambda p, k: p.view(-1, 64, k // 2, 2).permute(0, 2, 1, 3))
    return PackedWeight("onednn", torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), m_hint), w)


def _pack_panels(w: torch.Tensor, cols: int, glu: bool, layout) -> PackedWeight:
    """w's rows zero-padded to whole panels of `cols` and laid out by `layout(padded, K)`; GLU: each panel holds
    cols / 2 gate rows then the same cols / 2 up rows."""
    n, k = w.shape
    glu = glu and n % cols == 0
    rows = w.view(2, n // cols, cols // 2, k).transpose(0, 1).reshape(n, k) if glu else w
    padded = w.new_zeros(-(-n // cols) * cols, k)
    padded[:n] = rows
    packed = layout(padded, k)
    return PackedWeight("panels", host_memory.empty(packed.shape, w.dtype).copy_(packed), w, glu)


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) with a prepacked weight; `out`: [M, N] rows to write into (the panel GEMM writes there
    directly)."""
    if packed.kind == "panels":
        ext = cpu_ext.get()
        if ext is not None:
            n = packed.weight.shape[0] // (2 if packed.glu else 1)
            gemm = ext.gemm_f32 if packed.data.dtype == torch.float32 else ext.gemm_bf16
            y = gemm(x.reshape(-1, x.shape[-1]), packed.data, n, bias, out, packed.glu)
            return y if out is not None else y.view(*x.shape[:-1], n)
        y = F.linear(x, packed.weight, bias)
        y = silu_and_mul(y) if packed.glu else y
    else:
        y = torch.ops.mkldnn._linear_pointwise(x, packed.data, bias, "none", [], "")
    return y if out is None else out.copy_(y)


# Batch-invariant mode: every GEMM runs on exactly this many rows (the last tile zero-padded), so oneDNN/MKL
# pick one blocking per weight shape and a row's sums never depend on how many rows share its step. 64: per-row
# cost within ~5% of M=1024 (SmolLM2's layer GEMMs, bf16, 1 thread); a lone decode row pays for 64.
GEMM_TILE_ROWS = 64
HEAD_TILE_ROWS = 16  # the LM head's tile: few rows sample, and a padded head row costs 49152x576 MACs


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 packed: PackedWeight | None = None, tile: int = GEMM_TILE_ROWS,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) computed tile rows at a time, every call of exactly `tile` rows: row i's result is the
    same whatever M, its position, its row-mates, the executor's split or the thread count (checked in
    tests/test_batch_invariant.py). `out`: rows to write into (a nano-batch's rows of a step buffer)."""
    if out is None:
        out = x.new_empty(x.shape[0], weight.shape[0])
    gemm = (lambda a: packed_linear(a, packed, bias)) if packed is not None else (lambda a: F.linear(a, weight, bias))
    for start in range(0, x.shape[0], tile):
        rows = x[start:start + tile]
        if rows.shape[0] < tile:  # zero-pad the last tile: the same GEMM shape as every other tile
            rows = torch.cat((rows, rows.new_zeros(tile - rows.shape[0], rows.shape[1])))
        out[start:start + tile] = gemm(rows)[:out.shape[0] - start]
    return out


LOGITS_BLOCK = 2048  # vocab rows per GEMM on the CPU


def logits_linear(x: torch.Tensor, w: torch.Tensor, packed: PackedWeight | None = None,
                  batch_invariant: bool = False) -> torch.Tensor:
    """x [T, d] @ w[V, d]^T. `packed`: the head prepacked (`PackedWeight`), one GEMM (1.2x the blocks below, bf16).
    Else on the CPU a vocab-sized weight goes in blocks of LOGITS_BLOCK rows: one [V, d] float32 GEMM ran at
    60-70% of the blocks' FLOP/s (SmolLM2's 49152x576 head, 2 threads), and each block's values are
    bit-identical to the full GEMM's. --no-cpp-kernels keeps the single GEMM. `batch_invariant`: fixed row
    tiles of HEAD_TILE_ROWS (`tiled_linear`)."""
    if batch_invariant:
        return tiled_linear(x, w, None, packed, HEAD_TILE_ROWS)
    if packed is not None:
        return packed_linear(x, packed)
    if x.device.type != "cpu" or not cpu_ext.enabled() or w.shape[0] <= 2 * LOGITS_BLOCK:
        return F.linear(x, w)
    out = x.new_empty(x.shape[0], w.shape[0])
    for start in range(0, w.shape[0], LOGITS_BLOCK):
        out[:, start:start + LOGITS_BLOCK] = F.linear(x, w[start:start + LOGITS_BLOCK])
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    ext = _fused_ext(gate_up) if gate_up.is_contiguous() else None
    if ext is not None:
        return ext.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
