// The AVX2+FMA float32 path of paged decode attention (paged_decode.cpp): head_dim 64 or 128.
#pragma once
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

// NV = head_dim / 8 vectors per row; G query heads share each K and V row (loaded once, kept in registers).
template <int NV>
void decode_f32_avx2(const float* q, const float* kc, const float* vc, const DecodeArgs& a, float* out,
                     std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t G = a.G, len = a.len;
  scores.resize(G * len);
  acc.assign(G * NV * 8, 0.f);
  float* sc = scores.data();
  for_each_row(a, [&](int64_t t, int64_t off) {
    __m256 kr[NV];
    for (int j = 0; j < NV; ++j) kr[j] = _mm256_loadu_ps(kc + off + j * 8);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * NV * 8;
      __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(qg), kr[0]), s1 = _mm256_setzero_ps();
      for (int j = 1; j < NV; ++j)  // two chains hide the FMA latency
        (j & 1 ? s1 : s0) = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j * 8), kr[j], j & 1 ? s1 : s0);
      sc[g * len + t] = hsum256(_mm256_add_ps(s0, s1)) * a.scale;
    }
  });
  softmax_rows_avx2(sc, G, len);
  float* ac = acc.data();
  for_each_row(a, [&](int64_t t, int64_t off) {
    __m256 vr[NV];
    for (int j = 0; j < NV; ++j) vr[j] = _mm256_loadu_ps(vc + off + j * 8);
    for (int64_t g = 0; g < G; ++g) {
      const __m256 p = _mm256_set1_ps(sc[g * len + t]);
      float* ag = ac + g * NV * 8;
      for (int j = 0; j < NV; ++j) _mm256_storeu_ps(ag + j * 8, _mm256_fmadd_ps(p, vr[j], _mm256_loadu_ps(ag + j * 8)));
    }
  });
  std::copy(ac, ac + G * NV * 8, out);
}

}  // namespace nanoflow_decode
#endif
