"""Prefill attention through the paged C++ kernel (the CPU default) equals SDPA per chunk."""
import pytest
import torch

from nanoflow.kernels import cpu_ext
from nanoflow.kernels.attention import (PAGED_PREFILL_MAX_CONTEXT, AttentionMetadata, PrefillChunk, attend_prefill,
                                        pack_kv)

NB, BS, HKV, HQ, D = 256, 16, 3, 9, 64


def _step(chunks_spec, dtype):
    """(q, k, v, kv_cache, meta): chunks (q_len, prefix) laid out one after another, their KV written."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, NB, BS, HKV, D, generator=g).to(dtype)
    perm, used, start, chunks = torch.randperm(NB, generator=g), 0, 0, []
    for q_len, prefix in chunks_spec:
        n = -(-(prefix + q_len) // BS)
        chunks.append(PrefillChunk(start, q_len, prefix + q_len, perm[used:used + n]))
        used, start = used + n, start + q_len
    q = torch.randn(start, HQ, D, generator=g).to(dtype)
    flat = [kv[i].view(NB * BS, HKV, D) for i in (0, 1)]
    k, v = (torch.cat([flat[i][(p.block_table[:, None] * BS + torch.arange(BS)).flatten()]
                       [p.ctx_len - p.q_len:p.ctx_len] for p in chunks]) for i in (0, 1))
    return q, k, v, kv, AttentionMetadata(torch.empty(0, dtype=torch.long), 0, prefills=chunks)


@pytest.mark.skipif(cpu_ext.get() is None, reason="C++ kernels unavailable")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_prefill_matches_sdpa(dtype, tol):
    spec = [(30, 0), (17, 32), (5, 100), (1, 7), (40, PAGED_PREFILL_MAX_CONTEXT)]  # the last one stays on SDPA
    q, k, v, kv, meta = _step(spec, dtype)
    ref, paged = torch.empty_like(q), torch.empty_like(q)
    attend_prefill(ref, q, k, v, kv, meta, D ** -0.5, paged=False)
    attend_prefill(paged, q, k, v, kv, meta, D ** -0.5, paged=True)
    torch.testing.assert_close(paged.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("paged", [True, False])
def test_prefill_over_packed_kv_pages(dtype, tol, paged):
    """The same step over packed KV pages (the CPU default): the paged kernel and the SDPA path's gather."""
    if cpu_ext.get() is None or not cpu_ext.get().packed_kv_supported(D, BS, HQ // HKV, dtype.itemsize):
        pytest.skip(f"no packed {dtype} pages in this build")
    spec = [(30, 0), (17, 32), (5, 100), (40, PAGED_PREFILL_MAX_CONTEXT)]
    q, k, v, kv, meta = _step(spec, dtype)
    ref, got = torch.empty_like(q), torch.empty_like(q)
    attend_prefill(ref, q, k, v, kv, meta, D ** -0.5, paged=False)
    kv = pack_kv(kv)
    meta.kv_packed = True
    attend_prefill(got, q, k, v, kv, meta, D ** -0.5, paged=paged)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
