// Vector helpers shared by the C++ CPU kernels: bf16 <-> float32 in AVX-512 registers and a vectorized exp.
#pragma once
#include <c10/util/BFloat16.h>
#include <cstdint>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define NANOFLOW_AVX512BF16 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NANOFLOW_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define NANOFLOW_AVX512F 1  // (gemm_f32's AVX-512 tile; AVX512-BF16 is NANOFLOW_AVX512BF16)
#endif
#endif

namespace nanoflow_vec {

#if defined(NANOFLOW_AVX512BF16) || defined(NANOFLOW_AVX512F)
// Lanes [0, n) of 16 set: masked loads and stores of a row's tail.
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
#endif

#ifdef NANOFLOW_AVX512BF16

// 16 (or the first n, masked) bf16 values widened to float32: exact.
// (Full vectors take plain loads and stores: masked stores are slow on AMD's AVX-512.)
inline __m512 load_bf16(const c10::BFloat16* p, __mmask16 k = 0xFFFF) {
  const __m256i h = k == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Rounded to bf16 to nearest even, as c10::BFloat16(float) and torch round (finite values).
inline void store_bf16(void* p, __m512 v, __mmask16 k = 0xFFFF) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (k == 0xFFFF) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_mask_storeu_epi16(p, k, h);
}

inline __m512 load_ps(const float* p, __mmask16 k = 0xFFFF) {
  return k == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}

inline void store_ps(float* p, __m512 v, __mmask16 k = 0xFFFF) {
  if (k == 0xFFFF) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, k, v);
}

// exp(x) for float32: 2^n * p(r), |r| <= ln2/2, degree-6 polynomial (relative error ~2e-7, far below bf16's
// 4e-3); x is clamped to [-87, 88] (so the result stays finite: callers divide by it). std::exp does not
// vectorize.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 1 / d for finite d >= 1: a 14-bit estimate and one Newton step (~2^-28). vdivps is ~10x slower on AMD.
inline __m512 recip_ps(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

// silu(g) = g / (1 + exp(-g))
inline __m512 silu_ps(__m512 g) {
  return _mm512_mul_ps(g, recip_ps(_mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
}
#endif

#ifdef NANOFLOW_AVX2
// exp(x) on AVX2+FMA, the same polynomial (x clamped to [-87, 88]: 2^n built in the exponent bits).
inline __m256 exp256_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147181f), x);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));  // p * 2^n
}

// silu(g) = g / (1 + exp(-g)): a 12-bit reciprocal estimate and one Newton step (~2^-23) instead of vdivps.
inline __m256 silu256_ps(__m256 g) {
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp256_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)));
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(g, _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f))));
}
#endif

}  // namespace nanoflow_vec
