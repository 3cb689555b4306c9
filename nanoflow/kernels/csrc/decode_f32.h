// The AVX2+FMA float32 path of paged decode attention (paged_decode.cpp): head_dim 64 or 128.
#pragma once
#include <type_traits>
#include <vector>
#include "decode_common.h"

#ifdef NANOFLOW_AVX2
namespace nanoflow_decode {
using namespace nanoflow_vec;

// float32 on AVX2+FMA (CPUs without AVX-512, where auto dtype picks float32). The portable loop ran at
// ~3 GB/s, mostly in scalar expf; this one streams K and V once per (request, kv head) near DRAM speed.
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline void softmax_rows_avx2(float* s, int64_t rows, int64_t len) {
  for (int64_t g = 0; g < rows; ++g) {
    float* sg = s + g * len;
    float m = -INFINITY;
    for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
      const __m256 e = exp256_ps(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mv));
      _mm256_storeu_ps(sg + t, e);
      vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum256(vs);
    for (; t < len; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (t = 0; t + 8 <= len; t += 8) _mm256_storeu_ps(sg + t, _mm256_mul_ps(_mm256_loadu_ps(sg + t), inv));
    for (; t < len; ++t) sg[t] *= 1.f / sum;
  }
}

// Eight vectors' horizontal sums as one vector: [sum(d[0]), ..., sum(d[7])] (a tree of hadds: ~1 op per sum
// where eight hsum256 calls took ~6 each).
inline __m256 hsum8x256(const float* d) {  // d: eight vectors, one after another (any alignment)
  auto v = [d](int i) { return _mm256_loadu_ps(d + 8 * i); };
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(v(0), v(1)), _mm256_hadd_ps(v(2), v(3)));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(v(4), v(5)), _mm256_hadd_ps(v(6), v(7)));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

// Calls f(std::integral_constant<int, H>{}, g) for the query heads of a kv head in passes of H <= 3 from g (the
// V passes' and packed K pass's register budget: 4H accumulators and a vector per head).
template <typename F>
inline void for_each_head_pass(int64_t G, F f) {
  for (int64_t g = 0; g < G; g += 3) {
    if (G - g >= 3) f(std::integral_constant<int, 3>{}, g);
    else if (G - g == 2) f(std::integral_constant<int, 2>{}, g);
    else f(std::integral_constant<int, 1>{}, g);
  }
}

// H query heads' outputs for 32 dims over n rows of a V page (v: the rows' first dim, rows `stride` apart), from
// `out` (zero at the context's first page): 4H accumulators in registers (with H probabilities and one V vector: 16
// at H = 3), each V vector loaded once for the H heads. Both layouts' V passes, a page at a time.
template <int H>
inline void value_rows(const float* v, int64_t stride, int64_t n, const float* probs, int64_t len, float* out,
                       int64_t D, bool first) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 4; ++i) acc[h][i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + h * D + i * 8);
  for (int64_t s = 0; s < n; ++s, v += stride) {
    __m256 p[H];
    for (int h = 0; h < H; ++h) p[h] = _mm256_set1_ps(probs[h * len + s]);
    for (int i = 0; i < 4; ++i) {
      const __m256 x = _mm256_loadu_ps(v + i * 8);
      for (int h = 0; h < H; ++h) acc[h][i] = _mm256_fmadd_ps(p[h], x, acc[h][i]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + h * D + i * 8, acc[h][i]);
}

constexpr int64_t kValueChunk = 128;  // tokens per V chunk: 96 KB of rows at 3 kv heads of 64 dims

// NV = head_dim / 8 vectors per row; kv heads [a.kvh, a.kvh + nkv) of one request (G query heads each). K: one
// pass over the token rows, all nkv heads of a row in turn (a row's heads are adjacent: one head's slice of each
// row, a pass per head, read DRAM as a strided stream at ~60% of the rate), each K slice loaded once and kept in
// registers for its G query heads; each (token, query head) dot product stays a vector of 8 partial sums until
// eight tokens' are reduced together. The same pass prefetches the first V chunk's rows into L2.
template <int NV>
void decode_f32_avx2(const float* q, const float* kc, const float* vc, const DecodeArgs& a, int64_t nkv, float* out,
                     std::vector<float>& scores) {
  const int64_t G = a.G, len = a.len, R = nkv * G, D = NV * 8;  // R: score rows, (kv head, query head) in order
  scores.resize(R * len + R * 64);  // (after the scores: R rows x 8 tokens of partial-sum vectors)
  float* sc = scores.data();
  float* parts = sc + R * len;  // [R][8 tokens][8 partial sums]
  const __m256 scale = _mm256_set1_ps(a.scale);
  auto flush = [&](int64_t t0, int64_t n) {  // tokens [t0, t0 + n): their scores from the partial sums
    for (int64_t r = 0; r < R; ++r) {
      std::fill(parts + (r * 8 + n) * 8, parts + (r + 1) * 64, 0.f);
      alignas(32) float v[8];
      _mm256_store_ps(v, _mm256_mul_ps(hsum8x256(parts + r * 64), scale));
      std::copy(v, v + n, sc + r * len + t0);
    }
  };
  auto prefetch_v = [&, row_bytes = nkv * D * 4](int64_t, int64_t off) {  // a row's V (these kv heads) into L2
    for (int64_t l = 0; l < row_bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(vc + off) + l, _MM_HINT_T1);
  };
  for_each_row(a, [&](int64_t t, int64_t off) {
    if (t < kValueChunk) prefetch_v(t, off);  // (the first V chunk's rows)
    for (int64_t h = 0; h < nkv; ++h) {
      __m256 kr[NV];
      for (int j = 0; j < NV; ++j) kr[j] = _mm256_loadu_ps(kc + off + h * D + j * 8);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + (h * G + g) * D;
        __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(qg), kr[0]), s1 = _mm256_setzero_ps();
        for (int j = 1; j < NV; ++j)  // two chains hide the FMA latency
          (j & 1 ? s1 : s0) = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j * 8), kr[j], j & 1 ? s1 : s0);
        _mm256_storeu_ps(parts + ((h * G + g) * 8 + (t & 7)) * 8, _mm256_add_ps(s0, s1));
      }
    }
    if ((t & 7) == 7) flush(t - 7, 8);
  });
  if (len & 7) flush(len & ~int64_t(7), len & 7);
  softmax_rows_avx2(sc, R, len);
  // V, a chunk of kValueChunk tokens at a time (its rows stay in L2 while every pass goes over them; a long
  // context's V did not fit, and each pass re-read it from DRAM), in passes of up to 3 query heads of a kv head x
  // 32 dims (value_rows, a page at a time), kept in `out` between pages. Each output sums over t in order, page
  // after page. The next chunk's rows are prefetched into L2 meanwhile.
  for (int64_t t0 = 0; t0 < len; t0 += kValueChunk) {
    const int64_t t1 = std::min(len, t0 + kValueChunk);
    for_each_row(a, t1, std::min(len, t1 + kValueChunk), prefetch_v);
    for (int64_t h = 0; h < nkv; ++h)
      for_each_head_pass(G, [&](auto H, int64_t g) {
        for (int64_t j = 0; j < D; j += 32)
          for_each_page(a, t0, t1, [&](int64_t t, int64_t n, int64_t block, int64_t s0) {
            const float* v = vc + ((block * a.bs + s0) * a.hkv + a.kvh + h) * D + j;
            value_rows<decltype(H)::value>(v, a.hkv * D, n, sc + (h * G + g) * len + t, len,
                                           out + (h * G + g) * D + j, D, t == 0);
          });
      });
  }
}

// Packed pages (decode_common.h; float32: per kv head K as [D][bs], V as [bs][D]). The K pass takes 16 slots of a
// page at once: one FMA per (dim, 8 slots, query head) against the query's value broadcast, the 16 scores straight
// out of the sums (no horizontal reductions: the rows kernel's K pass spent as long in those as in its FMAs); the V
// passes read each head's page rows in order. Each score sums d in two chains (even and odd d), added at the end.

// Scores of slots [c, c + 16) of a K page (kp: its column c, rows bs apart) for H query heads (q rows D apart):
// s[h * 16 + i], scaled.
template <int H>
inline void key_scores(const float* kp, int64_t bs, const float* q, int64_t D, __m256 scale, float* s) {
  __m256 e[H][2], o[H][2];
  for (int h = 0; h < H; ++h) e[h][0] = e[h][1] = o[h][0] = o[h][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 2) {
    const float *k0 = kp + d * bs, *k1 = k0 + bs;
    const __m256 a0 = _mm256_loadu_ps(k0), a1 = _mm256_loadu_ps(k0 + 8);
    for (int h = 0; h < H; ++h) {
      const __m256 x = _mm256_broadcast_ss(q + h * D + d);
      e[h][0] = _mm256_fmadd_ps(x, a0, e[h][0]);
      e[h][1] = _mm256_fmadd_ps(x, a1, e[h][1]);
    }
    const __m256 b0 = _mm256_loadu_ps(k1), b1 = _mm256_loadu_ps(k1 + 8);
    for (int h = 0; h < H; ++h) {
      const __m256 x = _mm256_broadcast_ss(q + h * D + d + 1);
      o[h][0] = _mm256_fmadd_ps(x, b0, o[h][0]);
      o[h][1] = _mm256_fmadd_ps(x, b1, o[h][1]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 2; ++i)
      _mm256_storeu_ps(s + h * 16 + i * 8, _mm256_mul_ps(_mm256_add_ps(e[h][i], o[h][i]), scale));
}

// kv heads [a.kvh, a.kvh + nkv) of one request over packed pages; NV = head_dim / 8.
template <int NV>
void decode_f32_packed(const float* q, const float* kc, const float* vc, const DecodeArgs& a, int64_t nkv,
                       float* out, std::vector<float>& scores) {
  const int64_t G = a.G, len = a.len, bs = a.bs, D = NV * 8;
  scores.resize(nkv * G * len + 48);
  float* sc = scores.data();
  float* tile = sc + nkv * G * len;  // [3][16] scores of one key_scores call
  const __m256 scale = _mm256_set1_ps(a.scale);
  for_each_page(a, 0, len, [&](int64_t t0, int64_t n, int64_t block, int64_t) {
    for (int64_t h = 0; h < nkv; ++h) {
      const float* kp = head_page(kc, block, a.kvh + h, a.hkv, bs, D);
      for_each_head_pass(G, [&](auto H, int64_t g) {
        for (int64_t c = 0; c < n; c += 16) {  // (the lanes past n: stale slots, not copied)
          key_scores<decltype(H)::value>(kp + c, bs, q + (h * G + g) * D, D, scale, tile);
          const int64_t m = std::min<int64_t>(16, n - c);
          for (int i = 0; i < decltype(H)::value; ++i)
            std::copy(tile + i * 16, tile + i * 16 + m, sc + (h * G + g + i) * len + t0 + c);
        }
      });
    }
  });
  softmax_rows_avx2(sc, nkv * G, len);
  for_each_page(a, 0, len, [&](int64_t t0, int64_t n, int64_t block, int64_t) {
    for (int64_t h = 0; h < nkv; ++h) {
      const float* vp = head_page(vc, block, a.kvh + h, a.hkv, bs, D);
      for_each_head_pass(G, [&](auto H, int64_t g) {
        for (int64_t j = 0; j < D; j += 32)
          value_rows<decltype(H)::value>(vp + j, D, n, sc + (h * G + g) * len + t0, len, out + (h * G + g) * D + j,
                                         D, t0 == 0);
      });
    }
  });
}

}  // namespace nanoflow_decode
#endif
