// The AVX512-BF16 path of paged decode attention (paged_decode.cpp): bf16, head_dim 64 or 128, GQA ratio 1-8.
// Dot products with vdpbf16ps, whose bf16 products are exact in float32; pages in rows or packed (decode_common.h).
#pragma once
#include <vector>
#include "decode_common.h"

#ifdef NANOFLOW_AVX512BF16
namespace nanoflow_decode {
using namespace nanoflow_vec;

inline void softmax_rows_avx512(float* s, int64_t rows, int64_t len) {
  for (int64_t g = 0; g < rows; ++g) {
    float* sg = s + g * len;
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sg + t));
    float m = _mm512_reduce_max_ps(vm);
    for (; t < len; ++t) m = std::max(m, sg[t]);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 vs = _mm512_setzero_ps();
    for (t = 0; t < len; t += 16) {
      const __mmask16 k = tail_mask(len - t);
      const __m512 e = exp_ps(_mm512_sub_ps(load_ps(sg + t, k), mv));
      store_ps(sg + t, e, k);
      vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vs));
    for (t = 0; t < len; t += 16) {
      const __mmask16 k = tail_mask(len - t);
      store_ps(sg + t, _mm512_mul_ps(load_ps(sg + t, k), inv), k);
    }
  }
}

// Sums of 16 vectors at once: lane i of the result is the sum of v[i]'s lanes. A transpose-and-add tree
// (45 shuffles/adds for 16 rows) instead of 16 horizontal reductions (~8 dependent ops each).
inline __m512 reduce16(__m512* v) {
  __m512 s2[8], s4[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: (v[2i] pairs, v[2i+1] pairs)
    s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit chunk: partial sums of v[4i..4i+3]
    s4[i] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 g1 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[0], s4[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(s4[0], s4[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 g2 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2], s4[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(s4[2], s4[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(g1, g2, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(g1, g2, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Prefetch into L2 what this work item reads of page `blk` (its kv heads of every slot). Each pass prefetches the
// pages the next pass reads (the K pass this request's V pages, the V pass the next request's K pages), a page per
// page processed: a whole pass of lead hides the latency of the random page walk.
inline void prefetch_page(const c10::BFloat16* cache, const int64_t* table, int64_t len, const DecodeArgs& a,
                          int64_t blk, int64_t nkv) {
  if (table == nullptr || blk * a.bs >= len) return;
  if (a.kv_packed) {  // the heads' pages are one run
    const char* p = reinterpret_cast<const char*>(head_page(cache, table[blk], a.kvh, a.hkv, a.bs, a.D));
    for (int64_t o = 0; o < nkv * a.bs * a.D * 2; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
    return;
  }
  const char* p = reinterpret_cast<const char*>(cache + (table[blk] * a.bs * a.hkv + a.kvh) * a.D);
  const int64_t row_bytes = nkv * a.D * 2, stride = a.hkv * a.D * 2;
  for (int64_t s = 0; s < std::min(a.bs, len - blk * a.bs); ++s, p += stride)
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
}

// Slots s and s + 1 of a V page as NV vectors of bf16 pairs (lane i of vector j: dims of the pair), the operands
// of vdpbf16ps against the probabilities (p_s, p_s+1). Packed pages hold them so (dims in order); rows are
// interleaved here (vpunpck{l,h}wd: lane 4l + k of vector 2m + h is d = 32m + 8l + 4h + k, undone at the end).
// Without slot s + 1 (an odd length's last slot) its half is zero: its probability is zero, its bytes stale.
template <int NV, bool PACKED>
inline void value_pairs(const c10::BFloat16* v0, int64_t s, bool pair, int64_t row_stride, __m512i* iv) {
  if constexpr (PACKED) {
    for (int j = 0; j < NV; ++j) {
      iv[j] = _mm512_loadu_si512(v0 + s * NV * 16 + j * 32);
      if (!pair) iv[j] = _mm512_maskz_mov_epi16(0x55555555, iv[j]);
    }
  } else {
    for (int m = 0; m < NV / 2; ++m) {
      const __m512i r = _mm512_loadu_si512(v0 + s * row_stride + m * 32);
      const __m512i q = pair ? _mm512_loadu_si512(v0 + (s + 1) * row_stride + m * 32) : _mm512_setzero_si512();
      iv[2 * m] = _mm512_unpacklo_epi16(r, q);
      iv[2 * m + 1] = _mm512_unpackhi_epi16(r, q);
    }
  }
}

// The accumulated rows to bf16 (nearest even, as torch rounds). Rows pages' sums sit interleaved (value_pairs: the
// output's 32 dims from m alternate the two vectors' 128-bit chunks), undone here, vectorized (a scalar loop was
// a third of the V pass).
template <int NV, bool PACKED>
void store_values(const float* acc, int64_t rows, c10::BFloat16* out) {
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = acc + r * NV * 16;
    c10::BFloat16* o = out + r * NV * 16;
    for (int m = 0; m < NV / 2; ++m) {
      const __m512 a = _mm512_loadu_ps(ar + 32 * m), b = _mm512_loadu_ps(ar + 32 * m + 16);
      store_bf16(o + 32 * m, PACKED ? a : _mm512_permutex2var_ps(a, lo, b));
      store_bf16(o + 32 * m + 16, PACKED ? b : _mm512_permutex2var_ps(a, hi, b));
    }
  }
}

// out = P V for kv heads [a.kvh, a.kvh + nkv): two slots at a time (value_pairs), each pair of V rows multiplied by
// the pair (p_t, p_t+1) with vdpbf16ps: half the instructions of converting every V row to float32 and one FMA per
// row. The probabilities are rounded to bf16 (relative error 2^-9, below the bf16 output's own 2^-8); products and
// sums stay float32.
template <int NV, int G, bool PACKED>
void weighted_values_bf16(const c10::BFloat16* kc, const c10::BFloat16* vc, const DecodeArgs& a, int64_t nkv,
                          float* sc, c10::BFloat16* out, std::vector<float>& accbuf) {
  const int64_t len = a.len, row_stride = a.hkv * a.D;
  // Probabilities as bf16, in place over the float32 scores (row r at r * pstride, 2 bytes each): len rounded up
  // to even, so that (p_t, p_t+1) is one aligned 32-bit load (a zero after an odd length), broadcast straight
  // from memory.
  uint16_t* pb = reinterpret_cast<uint16_t*>(sc);
  const int64_t pstride = len + (len & 1);
  for (int64_t r = 0; r < nkv * G; ++r) {
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 k = tail_mask(len - t);
      store_bf16(pb + r * pstride + t, load_ps(sc + r * len + t, k), k);
    }
    if (len & 1) pb[r * pstride + len] = 0;
  }
  accbuf.assign(nkv * G * NV * 16, 0.f);
  for (int64_t t0 = 0, blk = 0; t0 < len; t0 += a.bs, ++blk) {
    prefetch_page(kc, a.next_table, a.next_len, a, blk, nkv);
    const int64_t n_page = std::min(a.bs, len - t0);
    for (int64_t h = 0; h < nkv; ++h) {
      const c10::BFloat16* v0 = PACKED ? head_page(vc, a.table[blk], a.kvh + h, a.hkv, a.bs, a.D)
                                       : vc + (a.table[blk] * a.bs * a.hkv + a.kvh + h) * a.D;
      float* ah = accbuf.data() + h * G * NV * 16;
      const int32_t* ph = reinterpret_cast<const int32_t*>(pb + h * G * pstride + t0);
      __m512 acc[G][NV];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_loadu_ps(ah + (g * NV + j) * 16);
      for (int64_t s = 0; s < n_page; s += 2) {
        __m512i iv[NV];
        value_pairs<NV, PACKED>(v0, s, s + 1 < n_page, row_stride, iv);
        for (int g = 0; g < G; ++g) {
          const __m512bh p = (__m512bh)_mm512_set1_epi32(ph[(g * pstride + s) / 2]);
          for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], p, (__m512bh)iv[j]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(ah + (g * NV + j) * 16, acc[g][j]);
    }
  }
  store_values<NV, PACKED>(accbuf.data(), nkv * G, out);
}

// Scores against K pages in rows: 16 rows of a page at a time per query head (dot products with vdpbf16ps, one
// reduce16 per 16 rows).
template <int NV, int G>
void scores_rows_bf16(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc, const DecodeArgs& a,
                      int64_t nkv, float* sc) {
  constexpr int NB = NV / 2;  // 32-wide bf16 vectors per row
  const int64_t len = a.len, row_stride = a.hkv * a.D;
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t t0 = 0, blk = 0; t0 < len; t0 += a.bs, ++blk) {
    prefetch_page(vc, a.table, len, a, blk, nkv);
    const int64_t n_page = std::min(a.bs, len - t0);
    for (int64_t h = 0; h < nkv; ++h) {
      const c10::BFloat16* page = kc + (a.table[blk] * a.bs * a.hkv + a.kvh + h) * a.D;
      for (int64_t s0 = 0; s0 < n_page; s0 += 16) {
        const int64_t n = std::min<int64_t>(16, n_page - s0);
        const c10::BFloat16* k0 = page + s0 * row_stride;
        const __mmask16 valid = tail_mask(n);
        for (int g = 0; g < G; ++g) {
          const c10::BFloat16* qg = q + (h * G + g) * NV * 16;
          __m512bh qv[NB];
          for (int j = 0; j < NB; ++j) qv[j] = (__m512bh)_mm512_loadu_si512(qg + j * 32);
          __m512 acc[16];
          for (int s = 0; s < 16; ++s) {
            acc[s] = _mm512_setzero_ps();
            if (s < n)
              for (int j = 0; j < NB; ++j)
                acc[s] = _mm512_dpbf16_ps(acc[s], qv[j], (__m512bh)_mm512_loadu_si512(k0 + s * row_stride + j * 32));
          }
          store_ps(sc + (h * G + g) * len + t0 + s0, _mm512_mul_ps(reduce16(acc), scale), valid);
        }
      }
    }
  }
}

// Scores against packed K pages (a.bs a multiple of 16): per 16 slots, G accumulators in C chains each (the dot
// products' latency: two chains per head left G = 3 waiting on them; G > 4 keeps two, 4 G within the registers).
template <int NV, int G>
void scores_packed_bf16(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc, const DecodeArgs& a,
                        int64_t nkv, float* sc) {
  constexpr int NP = NV * 8, C = G <= 4 ? 4 : 2;  // pairs of dims per head; chains
  const int64_t len = a.len, bs = a.bs;
  const __m512 scale = _mm512_set1_ps(a.scale);
  const int32_t* qpairs = reinterpret_cast<const int32_t*>(q);
  for (int64_t t0 = 0, blk = 0; t0 < len; t0 += bs, ++blk) {
    prefetch_page(vc, a.table, len, a, blk, nkv);
    const int64_t n_page = std::min(bs, len - t0);
    for (int64_t h = 0; h < nkv; ++h) {
      const c10::BFloat16* page = head_page(kc, a.table[blk], a.kvh + h, a.hkv, bs, a.D);
      const int32_t* qh = qpairs + h * G * NP;
      for (int64_t s0 = 0; s0 < n_page; s0 += 16) {
        const c10::BFloat16* k0 = page + s0 * 2;
        __m512 acc[G][C];
        for (int g = 0; g < G; ++g)
          for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
        for (int j = 0; j < NP; j += C)
          for (int c = 0; c < C; ++c) {
            const __m512bh kv = (__m512bh)_mm512_loadu_si512(k0 + (j + c) * bs * 2);
            for (int g = 0; g < G; ++g)
              acc[g][c] = _mm512_dpbf16_ps(acc[g][c], (__m512bh)_mm512_set1_epi32(qh[g * NP + j + c]), kv);
          }
        const __mmask16 valid = tail_mask(n_page - s0);
        for (int g = 0; g < G; ++g) {
          __m512 sum = _mm512_add_ps(acc[g][0], acc[g][1]);
          if constexpr (C == 4) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[g][2], acc[g][3]));
          store_ps(sc + (h * G + g) * len + t0 + s0, _mm512_mul_ps(sum, scale), valid);
        }
      }
    }
  }
}

// NV = head_dim / 16 float32 vectors per row (4 for D=64, 8 for D=128); G = query heads per kv head; the item
// covers kv heads [a.kvh, a.kvh + nkv) of one request (all of them when there are enough requests: each K/V row
// of a page is then read whole and in order, which streams at DRAM speed; one head's slice of a row does not).
// Output: per page and kv head, each V row is loaded once for the G query heads, the accumulators in registers.
template <int NV, int G>
void decode_bf16(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc, const DecodeArgs& a,
                 int64_t nkv, c10::BFloat16* out, std::vector<float>& scores, std::vector<float>& accbuf) {
  const int64_t len = a.len;
  scores.resize(nkv * G * len);
  float* sc = scores.data();
  if (a.kv_packed) scores_packed_bf16<NV, G>(q, kc, vc, a, nkv, sc);
  else scores_rows_bf16<NV, G>(q, kc, vc, a, nkv, sc);
  softmax_rows_avx512(sc, nkv * G, len);
  if (a.kv_packed) weighted_values_bf16<NV, G, true>(kc, vc, a, nkv, sc, out, accbuf);
  else weighted_values_bf16<NV, G, false>(kc, vc, a, nkv, sc, out, accbuf);
}

template <int NV>
bool decode_bf16_g(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc, const DecodeArgs& a,
                   int64_t nkv, c10::BFloat16* out, std::vector<float>& scores, std::vector<float>& acc) {
  switch (a.G) {  // the GQA ratios of the supported model families
    case 1: decode_bf16<NV, 1>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 2: decode_bf16<NV, 2>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 3: decode_bf16<NV, 3>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 4: decode_bf16<NV, 4>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 5: decode_bf16<NV, 5>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 6: decode_bf16<NV, 6>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 7: decode_bf16<NV, 7>(q, kc, vc, a, nkv, out, scores, acc); return true;
    case 8: decode_bf16<NV, 8>(q, kc, vc, a, nkv, out, scores, acc); return true;
    default: return false;
  }
}

}  // namespace nanoflow_decode
#endif
