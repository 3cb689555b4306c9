"""C++ CPU kernels against the plain-torch reference path they replace."""
import pytest
import torch
import torch.nn.functional as F

from nanoflow.kernels import cpu_ext
from nanoflow.kernels.attention import decode_attention_torch, pack_kv
from nanoflow.models.layers import RotaryEmbedding, apply_rope

ext = cpu_ext.load()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ kernels could not be built here")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _paged_cache(num_blocks, block_size, hkv, d, dtype, gen):
    return torch.randn(2, num_blocks, block_size, hkv, d, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 4, 128), (8, 2, 32)])
@pytest.mark.parametrize("b, bs", [(6, 16), (40, 16), (40, 32), (40, 8)])  # few requests: an item per kv head
def test_paged_decode_matches_torch(dtype, hq, hkv, d, b, bs):
    gen = torch.Generator().manual_seed(0)
    nb = 1024 // bs * b // 4
    cache = _paged_cache(nb, bs, hkv, d, dtype, gen)
    lens = torch.tensor([1, 15, 16, 17, 100, 200] * (b // 6) + [33, 200, 199, 64][: b % 6])
    width = -(-int(lens.max()) // bs)
    tables = torch.randperm(nb, generator=gen)[: b * width].view(b, width)  # scattered, non-contiguous pages
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    got = ext.paged_decode(q, cache[0], cache[1], tables, lens, d ** -0.5)
    want = decode_attention_torch(q.float(), cache.float(), tables, lens, int(lens.max()), d ** -0.5)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (16, 4, 64), (8, 1, 128)])  # GQA 3, 4 (passes of 3 + 1), 8
@pytest.mark.parametrize("b", [6, 12])
def test_paged_decode_long_contexts(hq, hkv, d, b):
    """float32 contexts across the kernel's 128-token V chunks (decode_f32.h), on both work splits."""
    gen = torch.Generator().manual_seed(8)
    lens = torch.tensor([127, 128, 129, 256, 257, 700] * (b // 6))
    width = -(-int(lens.max()) // 16)
    cache = _paged_cache(b * width + 4, 16, hkv, d, torch.float32, gen)
    tables = torch.randperm(b * width + 4, generator=gen)[: b * width].view(b, width)
    q = torch.randn(b, hq, d, generator=gen)
    got = ext.paged_decode(q, cache[0], cache[1], tables, lens, d ** -0.5)
    want = decode_attention_torch(q, cache, tables, lens, int(lens.max()), d ** -0.5)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def _packs(dtype) -> bool:
    """paged_decode takes packed pages of this dtype in this build (bf16: AVX512-BF16, float32: AVX2)."""
    return ext is not None and ext.packed_kv_supported(64, 16, 3, dtype.itemsize)


PACKED_DTYPES = [pytest.param(t, marks=pytest.mark.skipif(not _packs(t), reason=f"no packed {t} pages in this build"))
                 for t in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (8, 2, 128), (4, 4, 64), (14, 2, 64)])
@pytest.mark.parametrize("b, bs", [(6, 16), (40, 16), (40, 32)])
def test_paged_decode_packed_kv_matches_torch(dtype, hq, hkv, d, b, bs):
    """Packed pages give the torch reference's result; slots past a context (odd lengths: the other half of the
    last V pair) hold NaN, as a reused block's stale bytes may, and must not reach the output."""
    gen = torch.Generator().manual_seed(5)
    nb = 1024 // bs * b // 4
    rows = _paged_cache(nb, bs, hkv, d, dtype, gen)
    lens = torch.tensor([1, 15, 16, 17, 100, 200] * (b // 6) + [33, 200, 199, 64][: b % 6])
    width = -(-int(lens.max()) // bs)
    tables = torch.randperm(nb, generator=gen)[: b * width].view(b, width)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    want = decode_attention_torch(q.float(), rows.float(), tables, lens, int(lens.max()), d ** -0.5)
    past = torch.arange(width * bs)[None] >= lens[:, None]  # [b, width * bs]: slots past each context
    slots = tables.repeat_interleave(bs, 1) * bs + torch.arange(bs).repeat(width)
    rows.view(2, nb * bs, hkv, d)[:, slots[past]] = float("nan")
    cache = pack_kv(rows)
    got = ext.paged_decode(q, cache[0], cache[1], tables, lens, d ** -0.5, True)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("b", [3, 40])  # items per (request, kv head) and per request
def test_paged_decode_writes_new_kv(dtype, b):
    """paged_decode(new_kv=...) (the layer stack's) = write_kv_packed, then paged_decode: same pages, same output."""
    gen = torch.Generator().manual_seed(7)
    nb, bs, hkv, d = 4 * b + 8, 16, 3, 64
    cache = pack_kv(_paged_cache(nb, bs, hkv, d, dtype, gen))
    lens = torch.randint(1, 4 * bs, (b,), generator=gen)
    tables = torch.randperm(nb, generator=gen)[: 4 * b].view(b, 4)
    slots = tables[torch.arange(b), (lens - 1) // bs] * bs + (lens - 1) % bs
    qkv = torch.randn(b, 15 * d, generator=gen).to(dtype)  # q, k, v as strided views of a fused output
    q, k, v = qkv[:, :9 * d].view(b, 9, d), qkv[:, 9 * d:12 * d].view(b, 3, d), qkv[:, 12 * d:].view(b, 3, d)
    separate, fused = cache.clone(), cache.clone()
    ext.write_kv_packed(separate, k, v, slots)
    want = ext.paged_decode(q, separate[0], separate[1], tables, lens, d ** -0.5, True)
    got = ext.paged_decode(q, fused[0], fused[1], tables, lens, d ** -0.5, True, [k, v, slots])
    assert torch.equal(got, want) and torch.equal(fused, separate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_packed_round_trip(dtype):
    """Packed K and V written by the C++ kernel and by the torch path are the same bytes, the rows laid out
    packed, and read back as the rows."""
    from nanoflow.kernels.attention import gather_kv, pack_kv, write_kv
    gen = torch.Generator().manual_seed(6)
    nb, bs, h, d = 12, 16, 3, 64
    qkv = torch.randn(40, 5 * h * d, generator=gen).to(dtype)  # k and v: strided views of a fused output
    k, v = qkv[:, 3 * h * d:4 * h * d].view(40, h, d), qkv[:, 4 * h * d:].view(40, h, d)
    slots = torch.randperm(nb * bs, generator=gen)[:40]
    rows, packed, packed_torch = (torch.zeros(2, nb, bs, h, d, dtype=dtype) for _ in range(3))
    write_kv(rows, k, v, slots)
    write_kv(packed, k, v, slots, kv_packed=True)
    with cpu_ext.switched(False):
        write_kv(packed_torch, k, v, slots, kv_packed=True)
    assert torch.equal(packed, packed_torch) and torch.equal(packed, pack_kv(rows))
    table = torch.randperm(nb, generator=gen)[None]
    for got, want in zip(gather_kv(packed, table, nb * bs - 5, packed=True), gather_kv(rows, table, nb * bs - 5)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 100])  # 100: a partial last vector
def test_fused_add_rms_norm_matches_torch(dtype, hidden):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, hidden, generator=gen).to(dtype)
    res = torch.randn(37, hidden, generator=gen).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    want_res = x + res
    want = F.rms_norm(want_res.float(), (hidden,), w.float(), 1e-5)
    ext.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(res, want_res)
    torch.testing.assert_close(x.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [1536, 100])
def test_silu_and_mul_matches_torch(dtype, inter):
    gu = torch.randn(33, 2 * inter, generator=torch.Generator().manual_seed(2)) * 4
    gu[0, :8] = torch.tensor([-200.0, -90.0, -88.5, -20.0, 0.0, 20.0, 88.5, 200.0])  # exp's clamped ends
    gu = gu.to(dtype)
    g, u = gu.float().chunk(2, dim=-1)
    got = ext.silu_and_mul(gu)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), F.silu(g) * u, **TOL[dtype])


def test_rope_inplace_matches_torch():
    rope = RotaryEmbedding(64, 4096, 10000.0)
    t, hq, hkv = 21, 9, 3
    qkv = torch.randn(t, (hq + 2 * hkv) * 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    pos = torch.randint(0, 4096, (t,))
    heads = qkv[:, : (hq + hkv) * 64].float().view(t, hq + hkv, 64)
    want = apply_rope(heads, rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1))
    v_before = qkv[:, (hq + hkv) * 64:].clone()
    ext.rope_inplace(qkv, pos, rope.cos_sin, hq + hkv, 64)
    torch.testing.assert_close(qkv[:, : (hq + hkv) * 64].float().view(t, hq + hkv, 64), want,
                               **TOL[torch.bfloat16])
    assert torch.equal(qkv[:, (hq + hkv) * 64:], v_before)  # v columns untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch(dtype):
    x = torch.randn(7, 49157, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[1, 5] = x[1, 4000] = x[1].max() + 1  # a tie: the first index wins, as in torch
    x[2, -1] = x[2].max() + 1  # the maximum in the tail after the vector lanes
    assert torch.equal(ext.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(ext.argmax_rows(x[:, :100]), x[:, :100].argmax(dim=-1))  # strided rows


def test_blocked_logits_equal_one_gemm():
    from nanoflow.models.layers import LOGITS_BLOCK, logits_linear
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2 * LOGITS_BLOCK + 777, 64, generator=gen)  # a ragged last block
    x = torch.randn(5, 64, generator=gen)
    assert torch.equal(logits_linear(x, w), F.linear(x, w))


@pytest.mark.skipif(not __import__("nanoflow.models.layers", fromlist=["x"]).packed_gemm_supported(
    torch.bfloat16, "cpu"), reason="no native bf16 GEMMs in oneDNN on this CPU")
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_packed_linear_equals_f_linear_bf16(m):
    """oneDNN prepacked weights give F.linear's bf16 results bit for bit, whatever the M the packing assumed."""
    from nanoflow.models.layers import pack_weight, packed_linear
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(960, 576, generator=gen).to(torch.bfloat16)
    b = torch.randn(960, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, 576, generator=gen).to(torch.bfloat16)
    packed = pack_weight(w, 256)
    assert torch.equal(packed_linear(x, packed), F.linear(x, w))
    assert torch.equal(packed_linear(x, packed, b), F.linear(x, w, b))


# The panel GEMMs of each dtype (bf16: AVX512-BF16 builds; float32: AVX2+FMA builds, with the 12-row AVX-512 tile
# where the CPU has AVX-512: the shapes below cover both tiles' row remainders and an odd number of panels).
PANEL_DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(ext is None or not ext.gemm_bf16_supported(),
                                                          reason="no AVX512-BF16 build here"), id="bf16"),
    pytest.param(torch.float32, marks=pytest.mark.skipif(ext is None or not ext.gemm_f32_supported(),
                                                         reason="no AVX2+FMA build here"), id="f32")]
# One rounding of the float32 product: bf16's output rounding, or float32 sums in another order.
PANEL_TOL = {torch.bfloat16: lambda k: dict(atol=1e-3 * k ** 0.5, rtol=2 ** -8),
             torch.float32: lambda k: dict(atol=1e-5 * k ** 0.5, rtol=1e-5)}


def _panel_argmax(dtype):
    return ext.gemm_f32_argmax if dtype == torch.float32 else ext.gemm_bf16_argmax


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 960, 576), (5, 100, 64), (13, 576, 1536), (64, 3072, 576), (257, 130, 96),
                                     (500, 130, 576), (250, 64, 1536), (0, 130, 96)])
def test_panel_gemm_matches_float32(m, n, k, dtype):
    """The C++ panel GEMM: x W^T (+ b) within one rounding of the exact product (bf16: products exact, float32
    sums, one bf16 rounding; float32: K summed in order), for every row-tile remainder (M mod 6), a last panel
    of fewer columns than a panel and several row blocks (500 x 576, 250 x 1536) and none (M = 0); `out` writes
    into rows of a wider buffer."""
    from nanoflow.models.layers import pack_weight, packed_linear
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    packed = pack_weight(w, m, "panels")
    assert packed.kind == "panels"
    want = (x.double() @ w.double().t() + b.double()).float()
    got = packed_linear(x, packed, b)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, **PANEL_TOL[dtype](k))
    buf = torch.zeros(m + 3, n + 5, dtype=dtype)
    packed_linear(x, packed, b, out=buf[2:2 + m, 3:3 + n])
    assert torch.equal(buf[2:2 + m, 3:3 + n], got) and buf[:2].abs().sum() == 0 and buf[:, :3].abs().sum() == 0


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
def test_panel_gemm_rows_independent_of_batch(dtype):
    """A row's result does not depend on how many rows share the call or where it sits (one K order per
    output, whatever the tiling and thread split)."""
    from nanoflow.models.layers import pack_weight, packed_linear
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(576, 576, generator=gen).to(dtype)
    x = torch.randn(500, 576, generator=gen).to(dtype)  # (several row blocks)
    packed = pack_weight(w, 64, "panels")
    full = packed_linear(x, packed)
    for lo, hi in ((0, 1), (7, 20), (150, 200), (3, 130), (100, 500)):
        assert torch.equal(packed_linear(x[lo:hi], packed), full[lo:hi])


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
@pytest.mark.parametrize("m", [1, 6, 37])
def test_panel_gemm_glu_matches_silu_of_float32(m, dtype):
    """GLU packing: the gate/up GEMM returns silu(gate) * up from its float32 sums (bf16: one rounding), like
    the unfused GEMM and silu_and_mul within the dtype's tolerance; C++ kernels off: the same math through
    F.linear."""
    from nanoflow.models.layers import pack_weight, packed_linear, silu_and_mul
    gen = torch.Generator().manual_seed(m)
    inter, k = 192, 128
    w = (torch.randn(2 * inter, k, generator=gen) / k ** 0.5).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    packed = pack_weight(w, m, "panels", glu=True)
    assert packed.glu
    gu = x.double() @ w.double().t()
    want = (F.silu(gu[:, :inter]) * gu[:, inter:]).float()
    got = packed_linear(x, packed)
    assert got.shape == (m, inter)
    torch.testing.assert_close(got.float(), want, **(dict(atol=1e-2, rtol=2 ** -7) if dtype == torch.bfloat16
                                                     else TOL[torch.float32]))
    torch.testing.assert_close(got, silu_and_mul(packed_linear(x, pack_weight(w, m, "panels"))), **TOL[dtype])
    with cpu_ext.switched(False):
        torch.testing.assert_close(packed_linear(x, packed), got, **TOL[dtype])


@pytest.mark.parametrize("dtype", PANEL_DTYPES)
@pytest.mark.parametrize("m, n", [(1, 4100), (7, 130), (64, 49152 // 8), (131, 700), (2500, 130)])
def test_panel_gemm_argmax_is_argmax_of_its_logits(m, n, dtype):
    """The fused LM head + argmax returns what argmax_rows picks from the panel GEMM's output, first maximum
    included: ties are forced by duplicated weight rows (in other panels, hence other threads' runs, and in the
    same panel), for row-tile remainders, a partial last panel and row blocks."""
    from nanoflow.models.layers import pack_weight, packed_linear
    gen = torch.Generator().manual_seed(n)
    k = 64
    w = torch.randn(n, k, generator=gen).to(dtype)
    hot = torch.randint(0, n, (8,), generator=gen)
    top = w[hot[0]].abs() * 4
    w[hot] = top  # eight equal rows whose products with x (positive) beat every other row's: a tie for the maximum
    w[n - 1] = top  # ... one of them in the partial last panel
    x = torch.randn(m, k, generator=gen).abs().to(dtype)
    x[0] = -x[0]  # except row 0: its maximum is elsewhere
    packed = pack_weight(w, m, "panels")
    logits = packed_linear(x, packed)
    want = ext.argmax_rows(logits)
    assert torch.equal(want, logits.float().argmax(dim=-1))  # torch's tie rule: the first maximum
    assert torch.equal(_panel_argmax(dtype)(x, packed.data, n), want)
    assert (want[1:] == min(hot.min().item(), n - 1)).all()  # the ties were real
