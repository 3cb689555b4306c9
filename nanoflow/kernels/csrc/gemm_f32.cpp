// float32 GEMM on AVX2+FMA CPUs (no native bf16, so float32 is the fast dtype there): y [M, N] = x [M, K] W^T
// (+ b). Why: torch's F.linear (MKL / oneDNN) ran this model's layers at ~100-150 of the 194 GFLOP/s two Zen 3 cores
// reach in registers, the LM head at ~80; a 6 x 16 register tile over weights packed once reaches more. A build with
// AVX-512 takes gemm_f32_avx512.h's 12 x 32 tile over the same panels instead (bit-identical results).
//
// W is packed once (layers.pack_weight, "panels"): [N / 16 panels][K][16 columns] float32, N padded to 16 with
// zeros. A panel's row is two vectors, each the operand of an FMA against one x row's value broadcast: a 6-row x
// 16-column tile keeps 12 accumulators in registers over the whole K (K summed in order, one FMA per product).
// GLU packing (an MLP's fused gate/up weight, gate rows then up rows): each panel holds 8 gate columns and the same
// 8 up columns, and the tile writes silu(gate) * up (8 columns) straight from its sums.
#include <torch/extension.h>
#include <cmath>
#include <vector>
#include "gemm_f32_avx512.h"
#include "gemm_tiles.h"
#include "vec.h"

#ifdef NANOFLOW_AVX2
namespace {

using namespace nanoflow_vec;
using nanoflow_gemm::MR;
constexpr int64_t NR = 16;

struct GemmArgs {
  const float* x;
  int64_t ldx, M, N, K;
  const float* w;  // packed panels
  const float* bias;
  float* y;
  int64_t ldy;
  bool local = false;  // y is one tile's [MR][16] scratch (gemm_f32_argmax), not the [M, N] output
};

inline __m256i first_lanes(int64_t n) {  // lanes [0, n) set, for masked loads and stores of a row's tail
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Rows [m0, m0 + R) x panel `n`; meanwhile prefetches this tile's share (`part` of `parts`) of the next panel.
// One K step of row r: its x value broadcast against the panel row's two vectors.
#define NANOFLOW_F32_ROW(r)                                       \
  if constexpr (R > r) {                                          \
    const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);        \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                    \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                    \
  }

template <int R, bool GLU>
void tile(const GemmArgs& g, int64_t m0, int64_t n, const char* next, int64_t part, int64_t parts) {
  // Twelve named accumulators, not an array: GCC kept an array's in memory, storing all 12 every K step.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* panel = g.w + n * g.K * NR;
  const float* x = g.x + m0 * g.ldx;
  const int64_t ldx = g.ldx;
  // A panel row is one cache line: this tile prefetches its share of the next panel's lines, a few every
  // kChunk K steps (outside the FMA loop, which has no registers to spare).
  constexpr int64_t kChunk = 16;
  const int64_t line0 = g.K * part / parts, line_end = g.K * (part + 1) / parts;
  const int64_t chunks = std::max<int64_t>(1, (g.K + kChunk - 1) / kChunk);
  const int64_t per_chunk = (line_end - line0 + chunks - 1) / chunks;
  int64_t line = line0;
  for (int64_t k0 = 0; k0 < g.K; k0 += kChunk) {
    if (next != nullptr)
      for (const int64_t e = std::min(line + per_chunk, line_end); line < e; ++line)
        _mm_prefetch(next + line * 64, _MM_HINT_T1);
    const int64_t k1 = std::min(k0 + kChunk, g.K);
    for (int64_t k = k0; k < k1; ++k) {
      const __m256 b0 = _mm256_loadu_ps(panel + k * NR), b1 = _mm256_loadu_ps(panel + k * NR + 8);
      NANOFLOW_F32_ROW(0) NANOFLOW_F32_ROW(1) NANOFLOW_F32_ROW(2)
      NANOFLOW_F32_ROW(3) NANOFLOW_F32_ROW(4) NANOFLOW_F32_ROW(5)
    }
  }
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if constexpr (GLU) {
    for (int r = 0; r < R; ++r)
      _mm256_storeu_ps(g.y + (m0 + r) * g.ldy + n * 8, _mm256_mul_ps(silu256_ps(acc[r][0]), acc[r][1]));
    return;
  }
  const int64_t n0 = n * NR;
  for (int j = 0; j < 2; ++j) {
    const int64_t c = n0 + 8 * j;
    if (c >= g.N) break;
    const bool full = g.N - c >= 8;
    const __m256i k = first_lanes(g.N - c);
    const __m256 bias = g.bias == nullptr ? _mm256_setzero_ps()
                        : full ? _mm256_loadu_ps(g.bias + c) : _mm256_maskload_ps(g.bias + c, k);
    for (int r = 0; r < R; ++r) {
      float* out = g.y + (g.local ? r * NR + 8 * j : (m0 + r) * g.ldy + c);
      const __m256 v = _mm256_add_ps(acc[r][j], bias);
      if (full) _mm256_storeu_ps(out, v);
      else _mm256_maskstore_ps(out, k, v);
    }
  }
}

#undef NANOFLOW_F32_ROW

template <bool GLU>
void run_tile(const GemmArgs& g, int64_t m0, int64_t n, const char* next, int64_t part, int64_t parts) {
  nanoflow_gemm::with_tile_rows(g.M - m0, [&](auto R) { tile<decltype(R)::value, GLU>(g, m0, n, next, part, parts); });
}

// Row blocks of at least 48 rows (not bf16's 120): float32 x rows are twice as long, and a block that overflows L2
// (120 rows of K = 1536) left the down projection at ~135 GFLOP/s against ~185 for the others; 48 rows still do 24
// FLOPs per weight byte read.
template <typename F>
void for_each_tile(const GemmArgs& g, int64_t panels, F fn) {
  nanoflow_gemm::for_each_tile(g.M, g.K * 4, 48, g.w, g.K * NR * 4, panels, fn);
}

// Folds a tile's outputs (scratch [rows][16], panel columns from n0) into each row's running maximum and its first
// column. NaN never wins (as in argmax_rows); a later equal value does not displace an earlier column.
void argmax_tile(const float* s, int64_t rows, int64_t n0, int64_t N, float* best, int64_t* arg) {
  const int64_t cols = std::min<int64_t>(NR, N - n0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (s[r * NR + c] > best[r]) { best[r] = s[r * NR + c]; arg[r] = n0 + c; }
}

#ifdef NANOFLOW_AVX512F
// The AVX-512 tiles (gemm_f32_avx512.h: 12 rows x 2 panels) over the same walk; store(part, m, n, sums) receives
// row m's 16 sums of panel n, each row's panels in increasing order on its part.
template <typename Store>
void for_each_tile512(const GemmArgs& g, int64_t panels, Store store) {
  using nanoflow_gemm512::kTilePanels, nanoflow_gemm512::kTileRows, nanoflow_gemm512::tile512;
  const int64_t units = (panels + kTilePanels - 1) / kTilePanels;
  auto fn = [&](int64_t part, int64_t m0, int64_t u, const char* next, int64_t t, int64_t tiles) {
    const int64_t n = u * kTilePanels;
    const int64_t next_lines = next == nullptr ? 0 : std::min<int64_t>(kTilePanels, panels - n - kTilePanels) * g.K;
    const int64_t line0 = next_lines * t / tiles, line_end = next_lines * (t + 1) / tiles;
    const float* x = g.x + m0 * g.ldx;
    const float* panel = g.w + n * g.K * NR;
    auto out = [&](int r, int p, __m512 s) { store(part, m0 + r, n + p, s); };
    nanoflow_gemm::with_tile_rows<kTileRows>(g.M - m0, [&](auto R) {
      if (panels - n >= 2) tile512<decltype(R)::value, 2>(x, g.ldx, panel, g.K, next, line0, line_end, out);
      else tile512<decltype(R)::value, 1>(x, g.ldx, panel, g.K, next, line0, line_end, out);
    });
  };
  nanoflow_gemm::for_each_tile(g.M, g.K * 4, 48, g.w, kTilePanels * g.K * NR * 4, units, fn, kTileRows);
}

// gemm_f32 on AVX-512: row m's sums of panel n (+ bias) into y, or silu(gate) * up (GLU: 8 columns per panel).
void gemm512(const GemmArgs& g, int64_t panels, bool glu) {
  for_each_tile512(g, panels, [&](int64_t, int64_t m, int64_t n, __m512 s) {
    if (glu) {
      const __m256 gate = _mm512_castps512_ps256(s), up = _mm512_extractf32x8_ps(s, 1);
      _mm256_storeu_ps(g.y + m * g.ldy + n * 8, _mm256_mul_ps(silu256_ps(gate), up));
      return;
    }
    const int64_t c = n * NR;
    const __mmask16 k = tail_mask(g.N - c);
    if (g.bias != nullptr) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(k, g.bias + c));
    if (k == 0xFFFF) _mm512_storeu_ps(g.y + m * g.ldy + c, s);
    else _mm512_mask_storeu_ps(g.y + m * g.ldy + c, k, s);
  });
}

// gemm_f32_argmax on AVX-512: each sum folded into its row's running maximum on this part (argmax_tile's rule: a
// NaN never wins, a later equal value does not displace an earlier column); rows with no larger lane skip the scan.
void gemm512_argmax(const GemmArgs& g, int64_t panels, nanoflow_gemm::RowArgmax& maxima) {
  for_each_tile512(g, panels, [&](int64_t part, int64_t m, int64_t n, __m512 s) {
    float* best = maxima.best_at(part, m);
    const __mmask16 larger = _mm512_cmp_ps_mask(s, _mm512_set1_ps(*best), _CMP_GT_OQ) &
                             tail_mask(g.N - n * NR);
    if (larger == 0) return;
    alignas(64) float v[16];
    _mm512_store_ps(v, s);
    for (int c = 0; c < 16; ++c)
      if (((larger >> c) & 1) && v[c] > *best) { *best = v[c]; *maxima.arg_at(part, m) = n * NR + c; }
  });
}
#endif

}  // namespace
#endif

bool gemm_f32_supported() {
#ifdef NANOFLOW_AVX2
  return true;
#else
  return false;
#endif
}

namespace {
// x [M, K] float32 (rows made contiguous if they are not); w_packed [panels, K, 16] float32 for N columns (GLU
// packing: N / 8 panels). Returns x.
torch::Tensor checked_x(torch::Tensor x, const torch::Tensor& w_packed, int64_t N, bool glu, const char* name) {
  TORCH_CHECK(gemm_f32_supported(), name, " needs an AVX2+FMA build");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w_packed.scalar_type() == at::kFloat,
              name, ": x [M, K] and packed weights in float32");
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t panels = w_packed.size(0);
  TORCH_CHECK(w_packed.dim() == 3 && w_packed.is_contiguous() && w_packed.size(1) == x.size(1) &&
              w_packed.size(2) == 16 && (glu ? panels * 8 == N : panels * 16 >= N && (panels - 1) * 16 < N),
              name, ": packed weights do not match x or N");
  return x;
}
}  // namespace

// y = x W^T (+ bias) [M, N] float32 into `out` (rows with unit column stride) or a new tensor; glu: silu(gate) * up.
torch::Tensor gemm_f32(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                       c10::optional<torch::Tensor> out, bool glu) {
  x = checked_x(x, w_packed, N, glu, "gemm_f32");
  const int64_t M = x.size(0), panels = w_packed.size(0);
  TORCH_CHECK(!glu || !(bias.has_value() && bias->defined()), "gemm_f32: no bias with glu");
  torch::Tensor y = out.has_value() && out->defined() ? *out : torch::empty({M, N}, x.options());
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == M && y.size(1) == N &&
              (y.stride(1) == 1 || N == 1), "gemm_f32: out must be [M, N] float32 with unit column stride");
#ifdef NANOFLOW_AVX2
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "gemm_f32: bias must have N values");
  }
  GemmArgs g{x.data_ptr<float>(), x.stride(0), M, N, x.size(1), w_packed.data_ptr<float>(),
             b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), y.stride(0)};
#ifdef NANOFLOW_AVX512F
  gemm512(g, panels, glu);
#else
  for_each_tile(g, panels, [&](int64_t, int64_t m0, int64_t n, const char* next, int64_t t, int64_t tiles) {
    if (glu) run_tile<true>(g, m0, n, next, t, tiles);
    else run_tile<false>(g, m0, n, next, t, tiles);
  });
#endif
#endif
  return y;
}

// Greedy tokens straight from the LM head: per row of x W^T, the first column of the largest value - argmax_rows of
// gemm_f32's output, without writing and re-reading the [M, N] logits. Each thread keeps its rows' running maxima
// over its panels, merged in thread order (runs cover increasing panels).
torch::Tensor gemm_f32_argmax(torch::Tensor x, torch::Tensor w_packed, int64_t N) {
  TORCH_CHECK(N > 0, "gemm_f32_argmax: N must be positive");
  x = checked_x(x, w_packed, N, false, "gemm_f32_argmax");
  const int64_t M = x.size(0), panels = w_packed.size(0);
  auto tokens = torch::zeros({M}, x.options().dtype(torch::kLong));
#ifdef NANOFLOW_AVX2
  nanoflow_gemm::RowArgmax maxima(M);
  GemmArgs g{x.data_ptr<float>(), x.stride(0), M, N, x.size(1), w_packed.data_ptr<float>(), nullptr, nullptr, NR,
             true};
#ifdef NANOFLOW_AVX512F
  gemm512_argmax(g, panels, maxima);
#else
  std::vector<std::vector<float>> scratch(maxima.threads, std::vector<float>(MR * NR));
  for_each_tile(g, panels, [&](int64_t part, int64_t m0, int64_t n, const char* next, int64_t t, int64_t tiles) {
    GemmArgs gt = g;
    gt.y = scratch[part].data();
    run_tile<false>(gt, m0, n, next, t, tiles);
    argmax_tile(gt.y, std::min(MR, M - m0), n * NR, N, maxima.best_at(part, m0), maxima.arg_at(part, m0));
  });
#endif
  maxima.merge_into(tokens.data_ptr<int64_t>());
#endif
  return tokens;
}
