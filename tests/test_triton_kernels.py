"""Triton kernels against torch references, on the CPU under TRITON_INTERPRET=1 (small shapes, CI-fast)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit runs: kernels then execute on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (Linux-only dependency)")

from nanoflow.kernels import triton_attention, triton_gemm  # noqa: E402
from nanoflow.kernels.attention import decode_attention_torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is off: Triton kernels cannot run", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") in ("", "0") else "cpu"
SMALL = dict(block_m=16, block_n=16, block_k=16)


@pytest.mark.parametrize("m,n,k,num_sms", [(32, 48, 32, 1), (37, 50, 40, 3), (64, 32, 16, 64), (5, 16, 24, 2)])
def test_persistent_linear_matches_torch(m, n, k, num_sms):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(DEV)
    w = torch.randn(n, k, generator=g).to(DEV)
    out = triton_gemm.persistent_linear(x, w, num_sms=num_sms, **SMALL)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)


def test_persistent_linear_bf16_and_strided_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 32, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(24, 32, generator=g).to(DEV, torch.bfloat16)
    big = torch.zeros(40, 64, dtype=torch.bfloat16, device=DEV)
    out = triton_gemm.persistent_linear(x, w, num_sms=2, out=big[:, 8:32], **SMALL)
    assert out.data_ptr() == big[:, 8:].data_ptr()
    torch.testing.assert_close(out.float(), (x.float() @ w.float().T), rtol=2e-2, atol=5e-2)
    assert big[:, :8].abs().sum() == 0 and big[:, 32:].abs().sum() == 0  # nothing written outside the view


def test_persistent_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="do not match"):
        triton_gemm.persistent_linear(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="num_sms"):
        triton_gemm.persistent_linear(torch.zeros(4, 8), torch.zeros(4, 8), num_sms=0)


def test_grid_is_bounded_by_tiles():
    assert triton_gemm.num_tiles(300, 256) == 3 * 2
    assert triton_gemm.num_tiles(1, 1) == 1


def _paged_case(num_reqs, hq, hkv, d, bs, lens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens)
    num_blocks = num_reqs * width + 3
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: num_reqs * width]  # pages scattered over the pool
    tables = perm.view(num_reqs, width).to(torch.long)
    q = torch.randn(num_reqs, hq, d, generator=g).to(dtype)
    return q.to(DEV), cache.to(DEV), tables.to(DEV), torch.tensor(lens, dtype=torch.long, device=DEV)


@pytest.mark.parametrize("hq,hkv,num_programs", [(4, 4, None), (6, 2, 1), (8, 2, 3), (3, 1, 100)])
def test_paged_decode_matches_torch(hq, hkv, num_programs):
    lens = [1, 17, 33, 8]
    q, cache, tables, ctx = _paged_case(len(lens), hq, hkv, 16, 8, lens, seed=hq)
    scale = 16 ** -0.5
    out = triton_attention.paged_decode_attention(q, cache, tables, ctx, scale, num_programs=num_programs)
    ref = decode_attention_torch(q, cache, tables, ctx, max(lens), scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_paged_decode_bf16():
    lens = [5, 30]
    q, cache, tables, ctx = _paged_case(2, 4, 2, 32, 16, lens, seed=3, dtype=torch.bfloat16)
    out = triton_attention.paged_decode_attention(q, cache, tables, ctx, 32 ** -0.5, num_programs=2)
    ref = decode_attention_torch(q.float(), cache.float(), tables, ctx, max(lens), 32 ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_paged_decode_rejects_bad_shapes():
    q, cache, tables, ctx = _paged_case(1, 3, 2, 16, 8, [4])
    with pytest.raises(ValueError, match="does not fit"):
        triton_attention.paged_decode_attention(q, cache, tables, ctx, 1.0)
