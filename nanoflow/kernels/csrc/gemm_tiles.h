// How the panel GEMMs (gemm_bf16.cpp, gemm_f32.cpp) walk their work: row blocks whose x rows stay in L2, each a
// pass over the weight panels, each panel reused by every row tile of the block; work split into contiguous runs,
// one per thread.
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace nanoflow_gemm {

constexpr int64_t MR = 6;  // rows per register tile (both kernels)

// Rows per row block: a block's x rows (row_bytes each) stay in L2 (kBlockBytes) while every panel passes, but
// never fewer than min_rows (each block is a pass over the weights, from DRAM when they outgrow L3: a 14336-wide K
// would otherwise get 6-row blocks); and the blocks are of equal size - fixed 120-row blocks left 256 rows a 16-row
// third block, a third pass over the LM head's 57 MB for a sliver of work.
constexpr int64_t kBlockBytes = 256 * 1024;
inline int64_t block_rows(int64_t M, int64_t row_bytes, int64_t min_rows) {
  const int64_t most = std::max<int64_t>(min_rows, kBlockBytes / row_bytes / MR * MR);
  const int64_t blocks = std::max<int64_t>(1, (M + most - 1) / most);
  return std::max<int64_t>(MR, ((M + blocks - 1) / blocks + MR - 1) / MR * MR);  // (M = 0: no blocks, no division)
}

// Work items: (row block, panel, row tile), each thread a contiguous run: a panel is shared by at most two
// threads, and each thread prefetches the panel after its current one. w: the packed panels, panel_bytes apart;
// row blocks as block_rows.
// fn(part, m0, n, next, t, tiles): one tile, on the thread's run `part` (< at::get_num_threads()); `next` is the
// next panel when this thread goes on to it, else nullptr.
template <typename F>
void for_each_tile(int64_t M, int64_t row_bytes, int64_t min_rows, const void* w, int64_t panel_bytes, int64_t panels,
                   F fn) {
  const int64_t MB = block_rows(M, row_bytes, min_rows), blocks = (M + MB - 1) / MB;
  std::vector<int64_t> first(blocks + 1, 0);  // first item of each row block
  for (int64_t bl = 0; bl < blocks; ++bl)
    first[bl + 1] = first[bl] + panels * ((std::min(MB, M - bl * MB) + MR - 1) / MR);
  const int64_t items = first[blocks];
  if (items == 0) return;
  const int64_t parts = std::min<int64_t>(items, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const int64_t begin = items * part / parts, end = items * (part + 1) / parts;
      for (int64_t i = begin, bl = 0; i < end; ++i) {
        while (i >= first[bl + 1]) ++bl;
        const int64_t tiles = (first[bl + 1] - first[bl]) / panels, j = i - first[bl];
        const int64_t n = j / tiles, t = j % tiles;
        const bool more = n + 1 < panels && first[bl] + (n + 1) * tiles < end;  // this thread does panel n + 1
        const char* next = more ? static_cast<const char*>(w) + (n + 1) * panel_bytes : nullptr;
        fn(part, bl * MB + t * MR, n, next, t, tiles);
      }
    }
  });
}

// Calls f(std::integral_constant<int, R>{}) with R = min(MR, rows): a tile's row count as a template argument.
template <typename F>
inline void with_tile_rows(int64_t rows, F f) {
  switch (std::min(MR, rows)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 6>{}); break;
  }
}

// The fused LM head + argmax's bookkeeping: each thread's run (`part`) keeps its rows' running maxima and their
// columns, merged in thread order - runs cover increasing panels, so on a tie the first column wins.
struct RowArgmax {
  explicit RowArgmax(int64_t M)
      : M(M), threads(at::get_num_threads()), best(threads * M, -INFINITY), arg(threads * M, 0) {}
  float* best_at(int64_t part, int64_t m0) { return best.data() + part * M + m0; }
  int64_t* arg_at(int64_t part, int64_t m0) { return arg.data() + part * M + m0; }
  void merge_into(int64_t* out) const {
    for (int64_t m = 0; m < M; ++m) {
      float b = -INFINITY;
      for (int64_t p = 0; p < threads; ++p)
        if (best[p * M + m] > b) { b = best[p * M + m]; out[m] = arg[p * M + m]; }
    }
  }
  const int64_t M, threads;
  std::vector<float> best;
  std::vector<int64_t> arg;
};

}  // namespace nanoflow_gemm
