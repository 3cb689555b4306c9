// gemm_f32.cpp's tile on AVX-512 CPUs (float32 is the fast dtype there too when they lack AVX512-BF16, e.g. Ice
// Lake): the same 16-column panels, one zmm per panel row, and a 12-row x 2-panel tile - 24 accumulators of the 32
// registers, 2 panel loads and 12 broadcasts per K step for 24 FMAs (the AVX2 tile's 6 x 16 on 2 Ice Lake cores
// ran at ~130 GFLOP/s where MKL and oneDNN reached 180-230; this one ~200, as oneDNN's prepacked float32 at M = 256
// and faster at M = 64). Each output is the same FMA chain over K in order as the AVX2 tile's, so the two give
// bit-identical results. (K blocks of 128-192 steps, to keep the panels' rows in L1 across the row tiles, measured
// no faster: a tile alone ran at ~110-125 GFLOP/s per core whether its panels came from L1 or L2.)
#pragma once
#include <algorithm>
#include <cstdint>
#include "vec.h"

#ifdef NANOFLOW_AVX512F
namespace nanoflow_gemm512 {

using namespace nanoflow_vec;
constexpr int64_t kTileRows = 12;  // (named apart from gemm_tiles.h's MR and gemm_f32.cpp's NR: a using-directive
                                    // let an unqualified MR resolve to the AVX2 tile's 6, silently doubling the work)
constexpr int64_t kPanelCols = 16;  // columns per weight panel
constexpr int64_t kTilePanels = 2;  // weight panels per tile

// The tile's operands: R rows of x from `x` (ldx apart), P panels from `panel` (K rows of 16 each, one after
// another); out(r, p, sums) receives row r's 16 sums of panel p. Meanwhile it prefetches lines [line0, line_end) of
// the next tile's panels (`next`) into L2, a few every kChunk K steps.
// Named accumulators (GCC kept an array's in memory in the AVX2 tile); K summed in order, one FMA per product.
#define NANOFLOW_ROW(r)                                                 \
  if constexpr (R > r) {                                                \
    const __m512 a = _mm512_set1_ps(x[r * ldx + k]);                    \
    c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);                          \
    if constexpr (P > 1) c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1);     \
  }
#define NANOFLOW_OUT(r)                          \
  if constexpr (R > r) {                         \
    out(r, 0, c##r##0);                          \
    if constexpr (P > 1) out(r, 1, c##r##1);     \
  }

template <int R, int P, typename Out>
inline void tile512(const float* x, int64_t ldx, const float* panel, int64_t K, const char* next, int64_t line0,
                    int64_t line_end, Out out) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00,
         c81 = c00, c90 = c00, c91 = c00, c100 = c00, c101 = c00, c110 = c00, c111 = c00;
  const float* panel1 = panel + K * kPanelCols;
  // This tile's share of the next tile's panel lines, a few every kChunk K steps (as the AVX2 tile).
  constexpr int64_t kChunk = 16;
  const int64_t chunks = std::max<int64_t>(1, (K + kChunk - 1) / kChunk);
  const int64_t per_chunk = (line_end - line0 + chunks - 1) / chunks;
  int64_t line = line0;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    if (next != nullptr)
      for (const int64_t e = std::min(line + per_chunk, line_end); line < e; ++line)
        _mm_prefetch(next + line * 64, _MM_HINT_T1);
    const int64_t k1 = std::min(k0 + kChunk, K);
    for (int64_t k = k0; k < k1; ++k) {
      const __m512 b0 = _mm512_loadu_ps(panel + k * kPanelCols);
      const __m512 b1 = P > 1 ? _mm512_loadu_ps(panel1 + k * kPanelCols) : b0;
      NANOFLOW_ROW(0) NANOFLOW_ROW(1) NANOFLOW_ROW(2) NANOFLOW_ROW(3) NANOFLOW_ROW(4) NANOFLOW_ROW(5)
      NANOFLOW_ROW(6) NANOFLOW_ROW(7) NANOFLOW_ROW(8) NANOFLOW_ROW(9) NANOFLOW_ROW(10) NANOFLOW_ROW(11)
    }
  }
  NANOFLOW_OUT(0) NANOFLOW_OUT(1) NANOFLOW_OUT(2) NANOFLOW_OUT(3) NANOFLOW_OUT(4) NANOFLOW_OUT(5)
  NANOFLOW_OUT(6) NANOFLOW_OUT(7) NANOFLOW_OUT(8) NANOFLOW_OUT(9) NANOFLOW_OUT(10) NANOFLOW_OUT(11)
}

#undef NANOFLOW_ROW
#undef NANOFLOW_OUT

}  // namespace nanoflow_gemm512
#endif
