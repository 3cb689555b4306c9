// bf16 GEMM for decode-sized batches on the CPU (AVX512-BF16): y [M, N] = x [M, K] W^T (+ b), float32 sums,
// rounded to bf16 once. Why: at M <= 64 oneDNN's bf16 GEMM ran this model's layers at 230-345 GFLOP/s with the
// weights coming from DRAM (every layer's are, in a real step), and padded M to its blocking (M = 48 cost what
// M = 64 did); this kernel keeps the FMA units busy by prefetching the next weight panel while the current one
// is reused from L2 by every row tile.
//
// W is packed once (layers.pack_gemm_weight): [N / 64 panels][K / 2 pairs][64 columns][2] bf16, N padded to 64
// and K to even with zeros. A panel's pair row is 4 vectors, each the operand of vdpbf16ps against one x row's
// pair broadcast: a 6-row x 64-column tile keeps 24 accumulators in registers over the whole K.
// GLU packing (an MLP's fused gate/up weight, gate rows then up rows): each panel holds 32 gate columns and the
// same 32 up columns, and the tile writes silu(gate) * up (32 columns) straight from its float32 sums: the
// [M, 2I] gate/up output is never written, read back or rounded.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include "gemm_tiles.h"
#include "vec.h"

#ifdef NANOFLOW_AVX512BF16
namespace {

using namespace nanoflow_vec;
using nanoflow_gemm::MR;
constexpr int64_t NR = 64;

struct GemmArgs {
  const uint16_t* x;
  int64_t ldx, M, N, kp;  // kp: pairs of K
  const uint16_t* w;      // packed panels
  const c10::BFloat16* bias;
  c10::BFloat16* y;
  int64_t ldy;
  bool glu;
  bool local = false;  // y is one tile's [MR][64] scratch (gemm_bf16_argmax), not the [M, N] output
};

// Where row r, column c of the tile at rows m0 / panel columns n0 goes.
inline int64_t out_at(const GemmArgs& g, int64_t m0, int r, int64_t n0, int64_t c) {
  return g.local ? r * NR + (c - n0) : (m0 + r) * g.ldy + c;
}

// Rows [m0, m0 + R) x panel `n`. Meanwhile prefetches this tile's share (slice `part` of `parts`) of the next
// panel into L2, so that panel streams from DRAM while this one is reused from cache.
template <int R, bool GLU>
void tile(const GemmArgs& g, int64_t m0, int64_t n, const char* next, int64_t part, int64_t parts) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint16_t* panel = g.w + n * g.kp * NR * 2;
  const int32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = reinterpret_cast<const int32_t*>(g.x + (m0 + r) * g.ldx);
  // This tile's share of the next panel, in cache lines, spread over its K steps.
  const int64_t lines = g.kp * NR * 2 * 2 / 64, line0 = lines * part / parts, line_end = lines * (part + 1) / parts;
  const int64_t per_step = (line_end - line0 + g.kp - 1) / std::max<int64_t>(g.kp, 1);
  for (int64_t p = 0; p < g.kp; ++p) {
    const uint16_t* b = panel + p * NR * 2;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64), b3 = (__m512bh)_mm512_loadu_si512(b + 96);
    if (next != nullptr)
      for (int64_t l = line0 + p * per_step, e = std::min(l + per_step, line_end); l < e; ++l)
        _mm_prefetch(next + l * 64, _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(xr[r][p]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
    }
  }
  if constexpr (GLU) {
    for (int j = 0; j < 2; ++j)
      for (int r = 0; r < R; ++r)
        store_bf16(g.y + (m0 + r) * g.ldy + n * 32 + 16 * j, _mm512_mul_ps(silu_ps(acc[r][j]), acc[r][j + 2]));
    return;
  }
  const int64_t n0 = n * NR;
  for (int j = 0; j < 4; ++j) {
    const int64_t c = n0 + 16 * j;
    if (c >= g.N) break;
    const __mmask16 k = tail_mask(g.N - c);
    const __m512 bias = g.bias != nullptr ? load_bf16(g.bias + c, k) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) store_bf16(g.y + out_at(g, m0, r, n0, c), _mm512_add_ps(acc[r][j], bias), k);
  }
}

template <bool GLU>
void run_tile(const GemmArgs& g, int64_t m0, int64_t n, const char* next, int64_t part, int64_t parts) {
  nanoflow_gemm::with_tile_rows(g.M - m0, [&](auto R) { tile<decltype(R)::value, GLU>(g, m0, n, next, part, parts); });
}

// (x rows: kp pairs of bf16, 4 bytes each; a panel: kp x 64 pairs)
template <typename F>
void for_each_tile(const GemmArgs& g, int64_t panels, F fn) {
  nanoflow_gemm::for_each_tile(g.M, g.kp * 4, MR * 20, g.w, g.kp * NR * 2 * sizeof(uint16_t), panels, fn);
}

// Folds a tile's bf16 outputs (scratch [rows][64], panel columns from n0) into each row's running maximum and its
// first column. NaN never wins (as in argmax_rows); a later equal value does not displace an earlier column.
void argmax_tile(const c10::BFloat16* s, int64_t rows, int64_t n0, int64_t N, float* best, int64_t* arg) {
  const int64_t cols = std::min<int64_t>(NR, N - n0);
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* row = s + r * NR;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 k = tail_mask(cols - c);
      const __m512 v = load_bf16(row + c, k);
      m = _mm512_mask_max_ps(m, k & _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), m, v);
    }
    const float v = _mm512_reduce_max_ps(m);
    if (!(v > best[r])) continue;
    for (int64_t c = 0; c < cols; ++c)
      if (static_cast<float>(row[c]) == v) { best[r] = v; arg[r] = n0 + c; break; }
  }
}

}  // namespace
#endif

bool gemm_bf16_supported() {
#ifdef NANOFLOW_AVX512BF16
  return true;
#else
  return false;
#endif
}

namespace {
// The checks gemm_bf16 and gemm_bf16_argmax share: x [M, K] bf16, K even, its rows made contiguous if they are
// not; w_packed bf16 panels for K and N columns (GLU packing: N / 32 panels). Returns x.
torch::Tensor checked_x(torch::Tensor x, const torch::Tensor& w_packed, int64_t N, bool glu, const char* name) {
  TORCH_CHECK(gemm_bf16_supported(), name, " needs an AVX512-BF16 build");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && w_packed.scalar_type() == at::kBFloat16,
              name, ": x [M, K] and packed weights in bfloat16");
  if (x.stride(1) != 1 || x.stride(0) % 2 != 0) x = x.contiguous();
  const int64_t K = x.size(1), kp = w_packed.size(1), panels = w_packed.size(0);
  TORCH_CHECK(w_packed.is_contiguous() && w_packed.size(2) == 64 && w_packed.size(3) == 2 && kp == (K + 1) / 2 &&
              (glu ? panels * 32 == N : panels * 64 >= N && (panels - 1) * 64 < N),
              name, ": packed weights do not match x or N");
  TORCH_CHECK(K % 2 == 0, name, ": K must be even");
  return x;
}
}  // namespace

// x [M, K] bf16 (rows contiguous); w_packed [N / 64, K / 2, 64, 2] bf16 (see above); bias [N] bf16 or None;
// out: [M, N] bf16 rows to write into (unit column stride), else a new tensor. glu: w_packed in GLU packing
// (N / 32 panels, no bias), the result silu(gate) * up [M, N].
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> out, bool glu) {
  x = checked_x(x, w_packed, N, glu, "gemm_bf16");
  const int64_t M = x.size(0), kp = w_packed.size(1), panels = w_packed.size(0);
  TORCH_CHECK(!glu || !(bias.has_value() && bias->defined()), "gemm_bf16: no bias with glu");
  torch::Tensor y = out.has_value() && out->defined() ? *out : torch::empty({M, N}, x.options());
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.dim() == 2 && y.size(0) == M && y.size(1) == N &&
              (y.stride(1) == 1 || N == 1), "gemm_bf16: out must be [M, N] bf16 with unit column stride");
#ifdef NANOFLOW_AVX512BF16
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kBFloat16).contiguous();
    TORCH_CHECK(b.numel() == N, "gemm_bf16: bias must have N values");
  }
  GemmArgs g{reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), M, N, kp,
             reinterpret_cast<const uint16_t*>(w_packed.data_ptr()),
             b.defined() ? b.data_ptr<c10::BFloat16>() : nullptr, y.data_ptr<c10::BFloat16>(), y.stride(0), glu};
  for_each_tile(g, panels, [&](int64_t, int64_t m0, int64_t n, const char* next, int64_t t, int64_t tiles) {
    if (g.glu) run_tile<true>(g, m0, n, next, t, tiles);
    else run_tile<false>(g, m0, n, next, t, tiles);
  });
#endif
  return y;
}

// Greedy tokens straight from the LM head: per row of x W^T, the first column of the largest bf16-rounded value -
// what argmax_rows returns on gemm_bf16's output, without writing and re-reading the [M, N] logits (25 MB a step
// at 256 rows of a 49152-token vocabulary). Each tile goes through a [6][64] scratch; each thread keeps its rows'
// running maxima over its panels, merged in thread order (runs cover increasing panels).
torch::Tensor gemm_bf16_argmax(torch::Tensor x, torch::Tensor w_packed, int64_t N) {
  TORCH_CHECK(N > 0, "gemm_bf16_argmax: N must be positive");
  x = checked_x(x, w_packed, N, false, "gemm_bf16_argmax");
  const int64_t M = x.size(0), kp = w_packed.size(1), panels = w_packed.size(0);
  auto tokens = torch::zeros({M}, x.options().dtype(torch::kLong));
#ifdef NANOFLOW_AVX512BF16
  nanoflow_gemm::RowArgmax maxima(M);
  std::vector<std::vector<c10::BFloat16>> scratch(maxima.threads, std::vector<c10::BFloat16>(MR * NR));
  GemmArgs g{reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), M, N, kp,
             reinterpret_cast<const uint16_t*>(w_packed.data_ptr()), nullptr, nullptr, NR, false, true};
  for_each_tile(g, panels, [&](int64_t part, int64_t m0, int64_t n, const char* next, int64_t t, int64_t tiles) {
    GemmArgs gt = g;
    gt.y = scratch[part].data();
    run_tile<false>(gt, m0, n, next, t, tiles);
    argmax_tile(gt.y, std::min(MR, M - m0), n * NR, N, maxima.best_at(part, m0), maxima.arg_at(part, m0));
  });
  maxima.merge_into(tokens.data_ptr<int64_t>());
#endif
  return tokens;
}
