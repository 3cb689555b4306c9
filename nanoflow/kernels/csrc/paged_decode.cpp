// Paged decode attention for the CPU: one query token per request against its paged KV.
// Reads each K and V row exactly once (no gather copy); float32 accumulation; parallel over
// (request, kv head) with ATen's thread pool so it honours torch.set_num_threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// Row to float32. The bf16 case is a plain shift so the compiler vectorizes it.
template <typename T>
static inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* o = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) o[d] = static_cast<uint32_t>(s[d]) << 16;
}

template <typename T>
static void decode_one(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t len,
                       int64_t bs, int64_t hkv, int64_t kvh, int64_t G, int64_t D, float scale, T* out,
                       std::vector<float>& scores, std::vector<float>& qf, std::vector<float>& acc) {
  scores.resize(G * len);
  qf.resize(G * D);
  acc.assign(G * D, 0.f);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  for (int64_t t = 0; t < len; ++t) {
    const T* k = kc + ((table[t / bs] * bs + t % bs) * hkv + kvh) * D;
    float kf[256];
    load_row(k, kf, D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf.data() + g * D;
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
      scores[g * len + t] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * len;
    float m = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
    for (int64_t t = 0; t < len; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
    float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
  }
  for (int64_t t = 0; t < len; ++t) {
    const T* v = vc + ((table[t / bs] * bs + t % bs) * hkv + kvh) * D;
    float vf[256];
    load_row(v, vf, D);
    for (int64_t g = 0; g < G; ++g) {
      float p = scores[g * len + t];
      float* a = acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<T>(acc[i]);
}

// q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, W]; lens [B].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor lens, double scale) {
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(q.size(2) <= 256, "head_dim above 256 is not supported");
  auto bt = block_tables.to(torch::kLong).contiguous();
  auto ln = lens.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), hkv = k_cache.size(2), W = bt.size(1), G = Hq / hkv;
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* btp = bt.data_ptr<int64_t>();
    const int64_t* lp = ln.data_ptr<int64_t>();
    at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, qf, acc;
      for (int64_t i = begin; i < end; ++i) {
        int64_t b = i / hkv, h = i % hkv;
        decode_one<scalar_t>(qp + (b * Hq + h * G) * D, kp, vp, btp + b * W, lp[b], bs, hkv, h, G, D,
                             static_cast<float>(scale), op + (b * Hq + h * G) * D, scores, qf, acc);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
