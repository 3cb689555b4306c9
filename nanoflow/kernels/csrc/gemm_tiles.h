// How the panel GEMMs (gemm_bf16.cpp, gemm_f32.cpp) walk their work: row blocks whose x rows stay in L2, each a
// pass over the weight panels, each panel reused by every row tile of the block; runs of panels claimed by the
// threads as they come free.
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>
#include "claimed_runs.h"

namespace nanoflow_gemm {

constexpr int64_t MR = 6;  // rows per register tile (both kernels)

// Rows per row block: a block's x rows (row_bytes each) stay in L2 (kBlockBytes) while every panel passes, but
// never fewer than min_rows (each block is a pass over the weights, from DRAM when they outgrow L3: a 14336-wide K
// would otherwise get 6-row blocks); and the blocks are of equal size - fixed 120-row blocks left 256 rows a 16-row
// third block, a third pass over the LM head's 57 MB for a sliver of work.
constexpr int64_t kBlockBytes = 256 * 1024;
inline int64_t block_rows(int64_t M, int64_t row_bytes, int64_t min_rows, int64_t mr = MR) {
  const int64_t most = std::max<int64_t>(min_rows, kBlockBytes / row_bytes / mr * mr);
  const int64_t blocks = std::max<int64_t>(1, (M + most - 1) / most);
  return std::max<int64_t>(mr, ((M + blocks - 1) / blocks + mr - 1) / mr * mr);  // (M = 0: no blocks, no division)
}

// Work: runs of consecutive panels of one row block, claimed one at a time by whichever thread is free
// (claimed_runs.h), each run's panels walked in order, every row tile of the block per panel. A run is at most 8
// panels, and short enough that every thread gets ~8 runs; each tile prefetches its share of the next panel (at a
// run's end, the panel that starts the next run, likely claimed next).
// fn(part, m0, n, next, t, tiles): one tile, on the thread's `part` (< at::get_num_threads(); each part's runs,
// and so its panels of any one row, in increasing order); `next` is panel n + 1, or nullptr after the last.
template <typename F>
void for_each_tile(int64_t M, int64_t row_bytes, int64_t min_rows, const void* w, int64_t panel_bytes, int64_t panels,
                   F fn, int64_t mr = MR) {
  if (M <= 0 || panels <= 0) return;
  const int64_t MB = block_rows(M, row_bytes, min_rows, mr), blocks = (M + MB - 1) / MB;
  const int64_t run = std::clamp<int64_t>(blocks * panels / (8 * at::get_num_threads()), 1, 8);
  const int64_t runs = (panels + run - 1) / run;
  nanoflow_work::for_each_claimed_run(blocks * runs, 1, [&](int64_t part, int64_t u, int64_t) {
    const int64_t bl = u / runs, n_end = std::min(panels, (u % runs + 1) * run);
    const int64_t m_begin = bl * MB, tiles = (std::min(MB, M - m_begin) + mr - 1) / mr;
    for (int64_t n = (u % runs) * run; n < n_end; ++n) {
      const char* next = n + 1 < panels ? static_cast<const char*>(w) + (n + 1) * panel_bytes : nullptr;
      for (int64_t t = 0; t < tiles; ++t) fn(part, m_begin + t * mr, n, next, t, tiles);
    }
  });
}

// Calls f(std::integral_constant<int, R>{}) with R = min(kMaxRows, rows): a tile's row count as a template argument
// (kMaxRows: the kernel's tile rows, MR or gemm_f32's AVX-512 12).
template <int kMaxRows = MR, typename F>
inline void with_tile_rows(int64_t rows, F f) {
  const int64_t r = std::clamp<int64_t>(rows, 1, kMaxRows);
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((r == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, kMaxRows>{});
}

// The fused LM head + argmax's bookkeeping: each thread (`part`) keeps its rows' running maxima and their first
// columns (its panels of a row come in increasing order), merged by value and then by column: on a tie the first
// column wins, whichever thread saw it.
struct RowArgmax {
  explicit RowArgmax(int64_t M)
      : M(M), threads(at::get_num_threads()), best(threads * M, -INFINITY), arg(threads * M, 0) {}
  float* best_at(int64_t part, int64_t m0) { return best.data() + part * M + m0; }
  int64_t* arg_at(int64_t part, int64_t m0) { return arg.data() + part * M + m0; }
  void merge_into(int64_t* out) const {
    for (int64_t m = 0; m < M; ++m) {
      float b = -INFINITY;
      for (int64_t p = 0; p < threads; ++p) {
        const float v = best[p * M + m];
        if (v > b || (v == b && v != -INFINITY && arg[p * M + m] < out[m])) { b = v; out[m] = arg[p * M + m]; }
      }
    }
  }
  const int64_t M, threads;
  std::vector<float> best;
  std::vector<int64_t> arg;
};

}  // namespace nanoflow_gemm
