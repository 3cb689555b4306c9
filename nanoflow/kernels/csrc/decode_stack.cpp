// A decode step's layer stack in one call: the same kernels, in the same order and on the same shapes, that the
// Python forward (nanoflow/flow/ops.py) calls for a step whose rows are all decode rows, without ~270 trips
// through Python per step (6 ms of a 95 ms step at 64 requests). The CPU's counterpart of replaying a captured
// CUDA graph; nanoflow/flow/cpp_stack.py decides when a step takes it.
#include <torch/extension.h>
#include <ATen/record_function.h>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor lens, double scale, bool kv_packed,
                           c10::optional<std::vector<torch::Tensor>> new_kv);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
void rope_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin, int64_t num_heads,
                  int64_t head_dim);
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> out, bool glu);

namespace {
constexpr int64_t kPerLayer = 7;  // attn norm, qkv panels, qkv bias (empty: none), o, ffn norm, gate/up (GLU), down

// Each kernel as a labelled range for the torch profiler, under the names the Python wrappers give them
// (cpu_ext._Labelled), so a profile groups them the same way; a flag test when no profiler runs.
#define LABELLED(name, call) { RECORD_FUNCTION("nanoflow::" name " (C++)", std::vector<c10::IValue>()); call; }

c10::optional<torch::Tensor> maybe(const torch::Tensor& t) {
  return t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}
}  // namespace

// x [B, H]: the step's embeddings; layers: kPerLayer tensors per layer (above); kv_caches: one [2, blocks, bs,
// Hkv, D] per layer, K packed; dims = {num_heads, num_kv_heads, head_dim, hidden, intermediate}.
// Returns (hidden, residual) after the last layer, before the final norm, as ops.py leaves them.
std::vector<torch::Tensor> decode_stack(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin,
                                        torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor lens,
                                        std::vector<torch::Tensor> layers, std::vector<torch::Tensor> kv_caches,
                                        std::vector<int64_t> dims, double scale, double eps) {
  TORCH_CHECK(dims.size() == 5 && layers.size() == kv_caches.size() * kPerLayer, "decode_stack: bad arguments");
  const int64_t Hq = dims[0], Hkv = dims[1], D = dims[2], H = dims[3], I = dims[4];
  const int64_t B = x.size(0), q_size = Hq * D, kv_size = Hkv * D;
  torch::Tensor residual, qkv, attn, act;
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const torch::Tensor* w = layers.data() + l * kPerLayer;
    if (l == 0) {  // the first layer's residual is its input (DecoderLayer.attn_norm)
      residual = x;
      x = at::rms_norm(x, {H}, w[0], eps);
    } else {
      LABELLED("fused_add_rms_norm", fused_add_rms_norm(x, residual, w[0], eps));
    }
    LABELLED("gemm_bf16", qkv = gemm_bf16(x, w[1], q_size + 2 * kv_size, maybe(w[2]), c10::nullopt, false));
    LABELLED("rope_inplace", rope_inplace(qkv, positions, cos_sin, Hq + Hkv, D));
    const torch::Tensor k = qkv.narrow(1, q_size, kv_size).view({B, Hkv, D});
    const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({B, Hkv, D});
    const torch::Tensor q = qkv.narrow(1, 0, q_size).view({B, Hq, D});
    // (the step's K and V written into the pages by the attention kernel, each just before it reads that page)
    LABELLED("paged_decode", attn = paged_decode(q, kv_caches[l][0], kv_caches[l][1], block_tables, lens, scale,
                                                 true, std::vector<torch::Tensor>{k, v, slot_mapping}));
    LABELLED("gemm_bf16", x = gemm_bf16(attn.view({B, q_size}), w[3], H, c10::nullopt, c10::nullopt, false));
    LABELLED("fused_add_rms_norm", fused_add_rms_norm(x, residual, w[4], eps));
    LABELLED("gemm_bf16", act = gemm_bf16(x, w[5], I, c10::nullopt, c10::nullopt, true));
    LABELLED("gemm_bf16", x = gemm_bf16(act, w[6], H, c10::nullopt, c10::nullopt, false));
  }
  return {x, residual};
}
