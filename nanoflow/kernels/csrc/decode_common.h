// Shared by the paged decode attention paths (paged_decode.cpp): a work item's arguments, the page walk and
// the portable softmax.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include "vec.h"

namespace nanoflow_decode {

struct DecodeArgs {  // one work item: a request's kv heads [kvh, kvh + the item's head count)
  int64_t len, bs, hkv, kvh, G, D;
  const int64_t* table;
  float scale;
  const int64_t* next_table = nullptr;  // the thread's next request (its K pages are prefetched during this V pass)
  int64_t next_len = 0;
  bool kv_packed = false;  // the pages' layout (below)
};

// Pages come in one of two layouts. Rows: K and V as [block, slot, kv head, d]. Packed, each kv head's page
// contiguous and laid out in 4-byte units of P = 4 / sizeof(element) values (bf16: pairs, float32: single values):
// K as [block, kv head, d / P, slot, P] - for a unit of dims the slots' units lie side by side, so a vector of
// slots (16 bf16 pairs in AVX-512, 8 float32 in AVX2) is one operand against the query's unit broadcast and a
// page's scores come out of the dot products directly (no horizontal reduction); V as [block, kv head, slot / P,
// d, P] - a vector holds 16 (bf16) or 8 (float32) dims of a unit of slots, the operand against the units'
// probabilities broadcast, the sums in d order.
// A head's page read front to back is one stream (rows interleave the heads: reading one head's slice of each row
// ran at 60% of the rate from DRAM).

// The start of kv head `h`'s page of block `blk` in a packed cache (K or V): its bs * D values, one run.
template <typename T>
inline T* head_page(T* cache, int64_t blk, int64_t h, int64_t hkv, int64_t bs, int64_t D) {
  return cache + (blk * hkv + h) * bs * D;
}

// One token's K and V rows ([kv head][D] each, U: the element's bits) of kv heads [h0, h1) into packed pages at
// `slot`: K a whole 4-byte unit of dims per store, V one element of its unit of slots. Full caches [blocks, bs,
// hkv, D] in packed layout.
template <typename U>
inline void write_packed_token(U* k_cache, U* v_cache, const U* k, const U* v, int64_t slot, int64_t bs,
                               int64_t hkv, int64_t D, int64_t h0, int64_t h1) {
  constexpr int64_t P = 4 / sizeof(U);
  const int64_t blk = slot / bs, off = slot % bs;
  for (int64_t h = h0; h < h1; ++h) {
    uint32_t* kp = reinterpret_cast<uint32_t*>(head_page(k_cache, blk, h, hkv, bs, D)) + off;
    const uint32_t* kr = reinterpret_cast<const uint32_t*>(k + h * D);
    for (int64_t i = 0; i < D / P; ++i) kp[i * bs] = kr[i];
    U* vp = head_page(v_cache, blk, h, hkv, bs, D) + off / P * P * D + off % P;
    for (int64_t d = 0; d < D; ++d) vp[P * d] = v[h * D + d];
  }
}

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

inline void softmax_rows(float* s, int64_t rows, int64_t len) {
  for (int64_t g = 0; g < rows; ++g) {
    float* sg = s + g * len;
    float m = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
    for (int64_t t = 0; t < len; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
  }
}


// Calls f(t, n, block, s0) for each page of context tokens [t_begin, t_end): tokens [t, t + n) sit in pool block
// `block` from slot s0 (no per-token division: a 64-bit divide per row costs more than the row's arithmetic).
template <typename F>
inline void for_each_page(const DecodeArgs& a, int64_t t_begin, int64_t t_end, F f) {
  for (int64_t t = t_begin, blk = t_begin / a.bs; t < t_end; ++blk) {
    const int64_t s0 = t - blk * a.bs, n = std::min(a.bs, t_end - blk * a.bs) - s0;
    f(t, n, a.table[blk], s0);
    t += n;
  }
}

// Calls f(t, row_offset) for context tokens [t_begin, t_end) of a rows cache, page by page.
template <typename F>
inline void for_each_row(const DecodeArgs& a, int64_t t_begin, int64_t t_end, F f) {
  const int64_t row_stride = a.hkv * a.D;
  for_each_page(a, t_begin, t_end, [&](int64_t t, int64_t n, int64_t block, int64_t s0) {
    int64_t off = ((block * a.bs + s0) * a.hkv + a.kvh) * a.D;
    for (int64_t s = 0; s < n; ++s, off += row_stride) f(t + s, off);
  });
}

// for_each_row over the whole context.
template <typename F>
inline void for_each_row(const DecodeArgs& a, F f) {
  for_each_row(a, 0, a.len, f);
}

}  // namespace nanoflow_decode
