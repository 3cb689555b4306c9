// Work split by claiming, shared by the panel GEMMs (gemm_tiles.h) and paged decode attention (paged_decode.cpp):
// runs of consecutive items taken from an atomic counter by whichever thread is free, not equal shares fixed up
// front - on a shared host one core often runs slower than the other for a while, and an equal split left the
// faster one waiting for it at the end of every call.
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>

namespace nanoflow_work {

// Calls fn(part, begin, end) for runs [begin, end) of `run` items (the last may be shorter) covering [0, items),
// each on some thread's `part` (< at::get_num_threads()); a part's runs come in increasing order.
template <typename F>
void for_each_claimed_run(int64_t items, int64_t run, F fn) {
  if (items <= 0) return;
  const int64_t runs = (items + run - 1) / run, parts = std::min<int64_t>(runs, at::get_num_threads());
  std::atomic<int64_t> claimed{0};
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part)  // (pe - pb > 1 only when run inline, on one thread)
      for (int64_t begin = claimed.fetch_add(run); begin < items; begin = claimed.fetch_add(run))
        fn(part, begin, std::min(items, begin + run));
  });
}

}  // namespace nanoflow_work
