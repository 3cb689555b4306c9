"""SM-limited persistent GEMM in Triton (the "soft" SM partition of NanoFlow's execution units).

A persistent kernel launches at most `num_sms` programs; each walks the output tiles with stride `num_sms`
(the shape of Triton's tutorial 09, written here for `x @ w.T` with nn.Linear-layout weights). With one
big tile per program and one program per SM, the GEMM occupies about `num_sms` SMs, leaving the rest to a
concurrent memory- or network-bound nano-op. `num_sms` is a runtime argument, so a ladder of shares does not
compile one kernel per share.

On a CPU it runs under `TRITON_INTERPRET=1` (tests); without Triton, `available()` is False and callers use
torch.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is a Linux-only dependency; everything else in nanoflow works without it
    import triton
    import triton.language as tl
    _IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the platform
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns scalar tensors into loop bounds with `int(array)`, which numpy >= 2.4
    refuses for shape-(1,) arrays; use `.item()` so `tl.range(pid, n, step)` works under TRITON_INTERPRET."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "_nanoflow_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._nanoflow_patched = True
    interpreter._patch_lang_tensor = patched


if triton is not None:
    if interpreting():
        _patch_interpreter_for_numpy2()

    @triton.jit
    def _persistent_linear_kernel(
            a_ptr, b_ptr, c_ptr, M, N, K, num_sms,
            stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
            UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """C[M, N] = A[M, K] @ B[N, K]^T, fp32 accumulation, one program per SM walking tiles."""
        start_pid = tl.program_id(axis=0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_m * num_pid_n
        num_pid_in_group = GROUP_M * num_pid_n
        offs_k0 = tl.arange(0, BLOCK_K)
        for tile_id in tl.range(start_pid, num_tiles, num_sms):
            # Grouped ordering: consecutive tiles share rows of A, so A stays in L2 across programs.
            group_id = tile_id // num_pid_in_group
            first_pid_m = group_id * GROUP_M
            group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
            pid_m = first_pid_m + (tile_id % group_size_m)
            pid_n = (tile_id % num_pid_in_group) // group_size_m
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_k0
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
                b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                            mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
                if UPCAST:  # the CPU interpreter multiplies bf16 bit patterns as integers: widen first
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            c = acc.to(c_ptr.dtype.element_ty)
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, c,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def num_tiles(m: int, n: int, block_m: int = 128, block_n: int = 128) -> int:
    return -(-m // block_m) * -(-n // block_n)


def device_sm_count(device: torch.device | str | None = None) -> int:
    """Streaming multiprocessors of a CUDA device (what a full-share GEMM gets)."""
    return torch.cuda.get_device_properties(device or "cuda").multi_processor_count


def persistent_linear(x: torch.Tensor, weight: torch.Tensor, num_sms: int | None = None,
                      out: torch.Tensor | None = None, block_m: int = 128, block_n: int = 128,
                      block_k: int = 64, group_m: int = 8, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """`x @ weight.T` ([M, K] x [N, K] -> [M, N]) on at most `num_sms` programs.

    Defaults are the paper's Python branch tile (128x128x64, 3 stages, 4 warps); tests pass small tiles.
    """
    if triton is None:
        raise RuntimeError(f"Triton is not available ({_IMPORT_ERROR}); use torch.nn.functional.linear")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"persistent_linear: shapes {tuple(x.shape)} x {tuple(weight.shape)}^T do not match")
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if num_sms is None:
        num_sms = device_sm_count(x.device) if x.is_cuda else 4
    if num_sms < 1:
        raise ValueError(f"num_sms must be at least 1, got {num_sms}")
    grid = (max(1, min(num_sms, num_tiles(m, n, block_m, block_n))),)
    kwargs = {} if interpreting() else {"num_warps": num_warps, "num_stages": num_stages}
    # float32: TF32 only where torch's own matmuls use it (Triton's default is TF32, so the soft partition's
    # float32 GEMMs were less precise than F.linear and greedy tokens could differ from the other paths).
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else None
    _persistent_linear_kernel[grid](
        x, weight, out, m, n, k, grid[0],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, UPCAST=interpreting(),
        DOT_PRECISION=precision, **kwargs)
    return out
