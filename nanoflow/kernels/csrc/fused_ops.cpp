// Fused element-wise ops for the CPU path: each is one pass over memory instead of the 3-6 passes
// (and float32 temporaries) that the equivalent torch expression makes at bf16.
// All compute in float32 and round once on store; rows are split over ATen's thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include "vec.h"
#include "decode_common.h"

namespace {

template <typename T>
inline float f32(T x) { return static_cast<float>(x); }

// silu(g) = g / (1 + exp(-g)), exp's argument clamped as the vector kernels do: under -ffast-math an infinite
// exp(-g) (g < -88) is not a case the compiler keeps, and such rows came out non-finite (bf16 on AVX2-only CPUs).
inline float silu_scalar(float g) { return g / (1.f + std::exp(std::min(-g, 88.f))); }

constexpr int64_t kGrain = 16;  // rows per task: small enough to balance 2-8 threads at decode sizes

using namespace nanoflow_vec;

#ifdef NANOFLOW_AVX512BF16
// The bf16 rows of fused_add_rms_norm in AVX-512: the scalar loop's c10::BFloat16 conversions do not vectorize
// (10x slower than the float32 loop). Same arithmetic: the sum is rounded to bf16 before it is squared.
void add_rms_norm_row_bf16(c10::BFloat16* x, c10::BFloat16* res, const c10::BFloat16* w, int64_t H, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 k = tail_mask(H - i);
    store_bf16(res + i, _mm512_add_ps(load_bf16(x + i, k), load_bf16(res + i, k)), k);
    const __m512 s = load_bf16(res + i, k);
    ss = _mm512_fmadd_ps(s, s, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / H + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 k = tail_mask(H - i);
    store_bf16(x + i, _mm512_mul_ps(_mm512_mul_ps(load_bf16(res + i, k), inv), load_bf16(w + i, k)), k);
  }
}

void silu_and_mul_row_bf16(const c10::BFloat16* g, const c10::BFloat16* u, c10::BFloat16* o, int64_t I) {
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 k = tail_mask(I - i);
    store_bf16(o + i, _mm512_mul_ps(silu_ps(load_bf16(g + i, k)), load_bf16(u + i, k)), k);
  }
}
#endif

#ifdef NANOFLOW_AVX2
// float32 silu * up, vectorized (std::exp and the division kept the scalar loop at ~170 us for 256 x 1536).
void silu_and_mul_row_f32(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    _mm256_storeu_ps(o + i, _mm256_mul_ps(silu256_ps(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = silu_scalar(g[i]) * u[i];
}
#endif

}  // namespace

// residual += x; x = rms_norm(residual) * weight. In place on both (x is a temporary GEMM output).
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(), "x/residual mismatch");
  const int64_t H = x.size(-1), rows = x.numel() / H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xr = xp + r * H;
        scalar_t* rr = rp + r * H;
#ifdef NANOFLOW_AVX512BF16
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          using B = c10::BFloat16;  // (the branch is compiled for every dtype: the casts are no-ops where taken)
          add_rms_norm_row_bf16(reinterpret_cast<B*>(xr), reinterpret_cast<B*>(rr), reinterpret_cast<const B*>(wp), H,
                                static_cast<float>(eps));
          continue;
        }
#endif
        float ss = 0.f;
        for (int64_t i = 0; i < H; ++i) {
          const scalar_t s = static_cast<scalar_t>(f32(xr[i]) + f32(rr[i]));  // the residual stream keeps dtype
          rr[i] = s;
          ss += f32(s) * f32(s);
        }
        const float inv = 1.f / std::sqrt(ss / H + static_cast<float>(eps));
        for (int64_t i = 0; i < H; ++i) xr[i] = static_cast<scalar_t>(f32(rr[i]) * inv * f32(wp[i]));
      }
    });
  });
}

// gate_up [T, 2I] -> silu(gate) * up [T, I].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous(), "gate_up must be contiguous");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * I;
        const scalar_t* u = g + I;
        scalar_t* o = op + r * I;
#ifdef NANOFLOW_AVX512BF16
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          using B = c10::BFloat16;
          silu_and_mul_row_bf16(reinterpret_cast<const B*>(g), reinterpret_cast<const B*>(u), reinterpret_cast<B*>(o), I);
          continue;
        }
#endif
#ifdef NANOFLOW_AVX2
        if constexpr (std::is_same_v<scalar_t, float>) {
          silu_and_mul_row_f32(reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(u),
                               reinterpret_cast<float*>(o), I);
          continue;
        }
#endif
        for (int64_t i = 0; i < I; ++i) {
          o[i] = static_cast<scalar_t>(silu_scalar(f32(g[i])) * f32(u[i]));
        }
      }
    });
  });
  return out;
}

// Rotate-half RoPE in place on the first `num_heads` heads of each row of x [T, row_stride]
// (q and k heads, adjacent in the fused qkv output). cos_sin [max_pos, head_dim] float32 holds
// cos in the first half and sin in the second half of each row.
void rope_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin, int64_t num_heads,
                  int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, row] with unit column stride");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous(), "cos_sin must be float32");
  auto pos = positions.to(torch::kLong).contiguous();
  const int64_t T = x.size(0), stride = x.stride(0), half = head_dim / 2;
  const float* cs = cos_sin.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_inplace", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cs + pp[t] * head_dim;
        const float* s = c + half;
        for (int64_t h = 0; h < num_heads; ++h) {
          scalar_t* v = xp + t * stride + h * head_dim;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = f32(v[i]), x2 = f32(v[i + half]);
            v[i] = static_cast<scalar_t>(x1 * c[i] - x2 * s[i]);
            v[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * s[i]);
          }
        }
      }
    });
  });
}

// Row-wise argmax (first index of the maximum, like torch.argmax), parallel over rows: torch's CPU
// argmax runs one row per thread at ~1 GB/s, which made greedy sampling cost as much as the LM head.
torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [rows, vocab] with unit column stride");
  const int64_t rows = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  auto out = torch::empty({rows}, logits.options().dtype(torch::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "argmax_rows", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = lp + r * stride;
        constexpr int64_t kLanes = 16;  // independent running maxima, so the loop vectorizes
        float best[kLanes];
        int64_t idx[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) { best[l] = -INFINITY; idx[l] = V; }
        int64_t i = 0;
        for (; i + kLanes <= V; i += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) {
            const float v = f32(row[i + l]);
            if (v > best[l]) { best[l] = v; idx[l] = i + l; }
          }
        float m = -INFINITY;
        int64_t arg = 0;
        for (int64_t l = 0; l < kLanes; ++l)
          if (best[l] > m || (best[l] == m && idx[l] < arg)) { m = best[l]; arg = idx[l]; }
        for (; i < V; ++i)
          if (f32(row[i]) > m) { m = f32(row[i]); arg = i; }
        op[r] = arg;
      }
    });
  });
  return out;
}

// k, v [T, H, D] (rows may be strided, heads dense) into kv_cache [2, nb, bs, H, D] at slot_mapping, as packed
// pages (decode_common.h: per block and kv head, K as [D / P, bs, P], V as [bs / P, D, P]; P = 2 for 16-bit
// values, 1 for float32).
namespace {
template <typename U>
void write_packed_tokens(torch::Tensor kv_cache, const torch::Tensor& k, const torch::Tensor& v, const int64_t* sp) {
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), nb = kv_cache.size(1), bs = kv_cache.size(2);
  const auto* ks = reinterpret_cast<const U*>(k.data_ptr());
  const auto* vs = reinterpret_cast<const U*>(v.data_ptr());
  auto* kd = reinterpret_cast<U*>(kv_cache.data_ptr());
  U* vd = kd + nb * bs * H * D;
  // A token's K units land on H * D / P different cache lines (read for ownership, often from DRAM): latency
  // bound, so both threads take part even for a decode step's few dozen tokens.
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      nanoflow_decode::write_packed_token(kd, vd, ks + t * k.stride(0), vs + t * v.stride(0), sp[t], bs, H, D, 0, H);
  });
}
}  // namespace

void write_kv_packed(torch::Tensor kv_cache, torch::Tensor k, torch::Tensor v, torch::Tensor slot_mapping) {
  const int64_t size = kv_cache.element_size();
  TORCH_CHECK(kv_cache.is_contiguous() && (size == 2 || size == 4) && k.element_size() == size &&
              v.element_size() == size, "16-bit or float32 KV");
  for (const auto& x : {k, v})
    TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "k, v must be [T, H, D], heads dense");
  TORCH_CHECK(kv_cache.size(2) % 2 == 0 && k.size(2) % 2 == 0, "packed pages need an even block size and head_dim");
  auto slots = slot_mapping.to(torch::kLong).contiguous();
  if (size == 2) write_packed_tokens<uint16_t>(kv_cache, k, v, slots.data_ptr<int64_t>());
  else write_packed_tokens<uint32_t>(kv_cache, k, v, slots.data_ptr<int64_t>());
}
