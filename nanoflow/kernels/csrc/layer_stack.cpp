// A step's layer stack in one call: the same kernels, in the same order and on the same shapes, that the Python
// forward (nanoflow/flow/ops.py) calls for a step whose rows all read the cache through the paged kernel (decode
// rows, and prefill rows of short contexts, each a query over its own context), without ~270 trips through Python
// per step (6 ms of a 95 ms step at 64 requests). The CPU's counterpart of replaying a captured CUDA graph;
// nanoflow/flow/cpp_stack.py decides when a step takes it.
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor lens, double scale, bool kv_packed,
                           c10::optional<std::vector<torch::Tensor>> new_kv);
void write_kv_packed(torch::Tensor kv_cache, torch::Tensor k, torch::Tensor v, torch::Tensor slot_mapping);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
void rope_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin, int64_t num_heads,
                  int64_t head_dim);
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> out, bool glu);
torch::Tensor gemm_f32(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                       c10::optional<torch::Tensor> out, bool glu);

namespace {
constexpr int64_t kPerLayer = 7;  // attn norm, qkv panels, qkv bias (empty: none), o, ffn norm, gate/up (GLU), down

// Each kernel as a labelled range for the torch profiler, under the names the Python wrappers give them
// (cpu_ext._Labelled), so a profile groups them the same way; a flag test when no profiler runs.
#define LABELLED(name, call) { RECORD_FUNCTION("nanoflow::" name " (C++)", std::vector<c10::IValue>()); call; }

c10::optional<torch::Tensor> maybe(const torch::Tensor& t) {
  return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}

// The panel GEMM of the step's dtype (gemm_f32.cpp or gemm_bf16.cpp), labelled as the Python wrapper labels it.
torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& w, int64_t N, const torch::Tensor* bias, bool glu) {
  const c10::optional<torch::Tensor> b = bias != nullptr ? maybe(*bias) : c10::nullopt;
  if (x.scalar_type() == at::kFloat) {
    RECORD_FUNCTION("nanoflow::gemm_f32 (C++)", std::vector<c10::IValue>());
    return gemm_f32(x, w, N, b, c10::nullopt, glu);
  }
  RECORD_FUNCTION("nanoflow::gemm_bf16 (C++)", std::vector<c10::IValue>());
  return gemm_bf16(x, w, N, b, c10::nullopt, glu);
}

// The first layer's norm, as RMSNorm.forward computes it without a residual: float32 in HF's op order (the
// weight applied after the normalisation, bit-identical to the reference), bf16 in one fused pass.
torch::Tensor first_norm(const torch::Tensor& x, const torch::Tensor& weight, int64_t H, double eps) {
  if (x.scalar_type() == at::kFloat) return at::rms_norm(x, {H}, c10::nullopt, eps) * weight;
  return at::rms_norm(x, {H}, weight, eps);
}
// The step's K and V into the cache as attention.write_kv writes them: packed pages by the C++ kernel, rows by
// index_copy_.
void write_kv(const torch::Tensor& cache, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& slots,
              bool kv_packed) {
  if (kv_packed) {
    LABELLED("write_kv_packed", write_kv_packed(cache, k, v, slots));
    return;
  }
  const int64_t n = cache.size(1) * cache.size(2);
  cache[0].view({n, k.size(1), k.size(2)}).index_copy_(0, slots, k);
  cache[1].view({n, v.size(1), v.size(2)}).index_copy_(0, slots, v);
}
}  // namespace

// x [B, H]: the step's embeddings, bf16 or float32; layers: kPerLayer tensors per layer (above); kv_caches: one
// [2, blocks, bs, Hkv, D] per layer, packed pages when kv_packed, else rows (attention.py's layouts);
// block_tables, lens: every row's pages and context length (its own position + 1);
// dims = {num_heads, num_kv_heads, head_dim, hidden, intermediate}. fuse_kv_write (packed pages): each row's K and
// V written by the attention kernel just before it reads that row's pages - only when no row reads another row's
// new K/V (all rows decode); else the step's K and V are written first, as the Python forward writes them.
// Returns (hidden, residual) after the last layer, before the final norm, as ops.py leaves them.
std::vector<torch::Tensor> layer_stack(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin,
                                       torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor lens,
                                       std::vector<torch::Tensor> layers, std::vector<torch::Tensor> kv_caches,
                                       std::vector<int64_t> dims, double scale, double eps, bool kv_packed,
                                       bool fuse_kv_write) {
  TORCH_CHECK(dims.size() == 5 && layers.size() == kv_caches.size() * kPerLayer, "layer_stack: bad arguments");
  const int64_t Hq = dims[0], Hkv = dims[1], D = dims[2], H = dims[3], I = dims[4];
  const int64_t B = x.size(0), q_size = Hq * D, kv_size = Hkv * D;
  torch::Tensor residual, qkv, attn, act;
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const torch::Tensor* w = layers.data() + l * kPerLayer;
    if (l == 0) {  // the first layer's residual is its input (DecoderLayer.attn_norm)
      residual = x;
      x = first_norm(x, w[0], H, eps);
    } else {
      LABELLED("fused_add_rms_norm", fused_add_rms_norm(x, residual, w[0], eps));
    }
    qkv = gemm(x, w[1], q_size + 2 * kv_size, &w[2], false);
    LABELLED("rope_inplace", rope_inplace(qkv, positions, cos_sin, Hq + Hkv, D));
    const torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({B, Hkv, D});
    const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({B, Hkv, D});
    const torch::Tensor q = qkv.narrow(1, 0, q_size).view({B, Hq, D});
    c10::optional<std::vector<torch::Tensor>> new_kv;  // (fused: written by the attention kernel)
    if (kv_packed && fuse_kv_write) new_kv = std::vector<torch::Tensor>{k, v, slot_mapping};
    else write_kv(kv_caches[l], k, v, slot_mapping, kv_packed);
    LABELLED("paged_decode", attn = paged_decode(q, kv_caches[l][0], kv_caches[l][1], block_tables, lens, scale,
                                                 kv_packed, new_kv));
    x = gemm(attn.view({B, q_size}), w[3], H, nullptr, false);
    LABELLED("fused_add_rms_norm", fused_add_rms_norm(x, residual, w[4], eps));
    act = gemm(x, w[5], I, nullptr, true);
    x = gemm(act, w[6], H, nullptr, false);
  }
  return {x, residual};
}
