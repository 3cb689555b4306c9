// Paged decode attention for the CPU: one query token per request against its paged KV.
// Reads each K and V row exactly once (no gather copy); float32 accumulation; parallel over requests
// (or (request, kv head) when there are few) with ATen's thread pool so it honours torch.set_num_threads.
// bf16 with head_dim 64 or 128 takes an AVX512-BF16 path (dot products with vdpbf16ps, whose bf16
// products are exact in float32), float32 with head_dim 64 or 128 an AVX2+FMA path (decode_f32.h: rows or
// packed pages); everything else takes the portable loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <type_traits>
#include <vector>
#include "claimed_runs.h"
#include "decode_bf16.h"
#include "decode_common.h"
#include "decode_f32.h"

namespace {

using namespace nanoflow_decode;

template <typename T>
void decode_portable(const T* q, const T* kc, const T* vc, const DecodeArgs& a, T* out,
                     std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t G = a.G, D = a.D, len = a.len;
  scores.resize(G * len);
  acc.assign(G * D, 0.f);
  for_each_row(a, [&](int64_t t, int64_t off) {
    const T* k = kc + off;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += to_f32(q[g * D + d]) * to_f32(k[d]);
      scores[g * len + t] = s * a.scale;
    }
  });
  softmax_rows(scores.data(), G, len);
  for_each_row(a, [&](int64_t t, int64_t off) {
    const T* v = vc + off;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * len + t];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * to_f32(v[d]);
    }
  });
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<T>(acc[i]);
}

// kv heads [a.kvh, a.kvh + nkv) of one request; the portable path takes one kv head at a time.
template <typename T>
void decode_item(const T* q, const T* kc, const T* vc, DecodeArgs a, int64_t nkv, T* out,
                 std::vector<float>& scores, std::vector<float>& acc) {
#ifdef NANOFLOW_AVX512BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (a.D == 64 && decode_bf16_g<4>(q, kc, vc, a, nkv, out, scores, acc)) return;
    if (a.D == 128 && decode_bf16_g<8>(q, kc, vc, a, nkv, out, scores, acc)) return;
  }
#endif
#ifdef NANOFLOW_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (a.kv_packed && a.D == 64) return decode_f32_packed<8>(q, kc, vc, a, nkv, out, scores);
    if (a.kv_packed && a.D == 128) return decode_f32_packed<16>(q, kc, vc, a, nkv, out, scores);
    if (a.D == 64) return decode_f32_avx2<8>(q, kc, vc, a, nkv, out, scores);
    if (a.D == 128) return decode_f32_avx2<16>(q, kc, vc, a, nkv, out, scores);
  }
#endif
  for (int64_t h = 0; h < nkv; ++h, ++a.kvh, q += a.G * a.D, out += a.G * a.D)
    decode_portable(q, kc, vc, a, out, scores, acc);
}

// paged_decode's new_kv, checked: this step's K and V rows and their slots (none: slots == nullptr).
struct NewTokens {
  const void *k = nullptr, *v = nullptr;  // (the cache's element type)
  int64_t k_row = 0, v_row = 0;
  const int64_t* slots = nullptr;
  torch::Tensor slot_tensor;  // (keeps slots alive)
};

NewTokens new_tokens(const c10::optional<std::vector<torch::Tensor>>& new_kv, bool kv_packed, at::ScalarType dtype,
                     int64_t B, int64_t hkv, int64_t D) {
  NewTokens t;
  if (!new_kv.has_value()) return t;
  const auto& n = *new_kv;
  TORCH_CHECK(kv_packed && n.size() == 3, "paged_decode: new_kv = (k, v, slots) needs packed pages");
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK(n[i].scalar_type() == dtype && n[i].dim() == 3 && n[i].size(0) == B && n[i].size(1) == hkv &&
                n[i].size(2) == D && n[i].stride(2) == 1 && n[i].stride(1) == D, "paged_decode: new k, v [B, Hkv, D]");
  t.slot_tensor = n[2].to(torch::kLong).contiguous();
  TORCH_CHECK(t.slot_tensor.numel() == B, "paged_decode: a slot per request");
  t.k = n[0].data_ptr();
  t.v = n[1].data_ptr();
  t.k_row = n[0].stride(0), t.v_row = n[1].stride(0), t.slots = t.slot_tensor.data_ptr<int64_t>();
  return t;
}

}  // namespace

// q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, W]; lens [B].
// Whether paged_decode reads packed pages of this shape and element size (2: bf16, 4: float32).
bool packed_kv_supported(int64_t head_dim, int64_t block_size, int64_t group, int64_t element_size) {
  const bool shape = (head_dim == 64 || head_dim == 128) && block_size % 16 == 0 && group >= 1;
#ifdef NANOFLOW_AVX512BF16
  if (element_size == 2) return shape && group <= 8;
#endif
#ifdef NANOFLOW_AVX2
  if (element_size == 4) return shape;
#endif
  return false;
}

// new_kv: this step's K and V rows ([B, Hkv, D] each, heads dense) and their slots, written into the packed pages
// by each work item just before it reads them (layer_stack: the lines are read right after anyway; written on
// their own, ahead of the kernel, their reads for ownership were a latency-bound pass of their own).
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor lens, double scale, bool kv_packed,
                           c10::optional<std::vector<torch::Tensor>> new_kv) {
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  auto bt = block_tables.to(torch::kLong).contiguous();
  auto ln = lens.to(torch::kLong).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), hkv = k_cache.size(2), W = bt.size(1), G = Hq / hkv;
  // A work item is a request (all its kv heads: whole K/V rows, streamed in order) when there are enough
  // requests to keep every thread busy, else one (request, kv head).
  TORCH_CHECK(!kv_packed || ((q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat) &&
                             packed_kv_supported(D, bs, G, q.element_size())),
              "packed KV pages need bf16 (an AVX512-BF16 build) or float32 (AVX2), head_dim 64/128 and a block size "
              "multiple of 16");
  const int64_t nkv = B >= 4 * at::get_num_threads() ? hkv : 1, per_req = hkv / nkv;
  const NewTokens fresh = new_tokens(new_kv, kv_packed, q.scalar_type(), B, hkv, D);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    using U = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;  // (packed: bf16 or float32 bits)
    auto* k_pages = reinterpret_cast<U*>(k_cache.data_ptr());  // (written through when fresh has slots)
    auto* v_pages = reinterpret_cast<U*>(v_cache.data_ptr());
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* btp = bt.data_ptr<int64_t>();
    const int64_t* lp = ln.data_ptr<int64_t>();
    // Runs of a few items claimed by whichever thread is free (claimed_runs.h; with mixed context lengths, or one
    // core slowed by the shared host, equal shares left one thread waiting on the other). ~32 runs per thread
    // keep the last run's wait short.
    const int64_t items = B * per_req;
    const int64_t run = std::max<int64_t>(1, items / (32 * std::min<int64_t>(items, at::get_num_threads())));
    std::vector<std::vector<float>> scores(at::get_num_threads()), acc(at::get_num_threads());
    nanoflow_work::for_each_claimed_run(items, run, [&](int64_t part, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / per_req, h = (i % per_req) * nkv;
        DecodeArgs a{lp[b], bs, hkv, h, G, D, btp + b * W, static_cast<float>(scale)};
        a.kv_packed = kv_packed;
        if (i + 1 < items) {  // (likely this thread's next; nkv == hkv whenever i + 1 is another request)
          a.next_table = btp + ((i + 1) / per_req) * W;
          a.next_len = nkv == hkv ? lp[(i + 1) / per_req] : 0;
        }
        if (fresh.slots != nullptr)
          write_packed_token(k_pages, v_pages, static_cast<const U*>(fresh.k) + b * fresh.k_row,
                             static_cast<const U*>(fresh.v) + b * fresh.v_row, fresh.slots[b], bs, hkv, D, h, h + nkv);
        decode_item<scalar_t>(qp + (b * Hq + h * G) * D, kp, vp, a, nkv, op + (b * Hq + h * G) * D, scores[part],
                              acc[part]);
      }
    });
  });
  return out;
}
