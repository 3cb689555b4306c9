// Python bindings of the C++ CPU kernels (one extension module, several sources).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor lens, double scale, bool kv_packed,
                           c10::optional<std::vector<torch::Tensor>> new_kv);
bool packed_kv_supported(int64_t head_dim, int64_t block_size, int64_t group, int64_t element_size);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void rope_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin, int64_t num_heads,
                  int64_t head_dim);
torch::Tensor argmax_rows(torch::Tensor logits);
bool gemm_bf16_supported();
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> out, bool glu);
torch::Tensor gemm_bf16_argmax(torch::Tensor x, torch::Tensor w_packed, int64_t N);
bool gemm_f32_supported();
torch::Tensor gemm_f32(torch::Tensor x, torch::Tensor w_packed, int64_t N, c10::optional<torch::Tensor> bias,
                       c10::optional<torch::Tensor> out, bool glu);
torch::Tensor gemm_f32_argmax(torch::Tensor x, torch::Tensor w_packed, int64_t N);
void write_kv_packed(torch::Tensor kv_cache, torch::Tensor k, torch::Tensor v, torch::Tensor slot_mapping);
std::vector<torch::Tensor> layer_stack(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin,
                                       torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor lens,
                                       std::vector<torch::Tensor> layers, std::vector<torch::Tensor> kv_caches,
                                       std::vector<int64_t> dims, double scale, double eps, bool kv_packed,
                                       bool fuse_kv_write);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs (tensors only, no Python objects): with async scheduling the
  // engine thread schedules the next step meanwhile.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode", &paged_decode, "paged decode attention", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("lens"), py::arg("scale"), py::arg("kv_packed") = false,
        py::arg("new_kv") = py::none(), nogil());
  m.def("packed_kv_supported", &packed_kv_supported,
        "whether paged_decode takes packed KV pages of this shape and element size (2: bf16, 4: float32)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = rms_norm(residual) * w (in place)", nogil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", nogil());
  m.def("write_kv_packed", &write_kv_packed, "K and V into packed pages", nogil());
  m.def("argmax_rows", &argmax_rows, "row-wise argmax (first maximum)", nogil());
  m.def("gemm_bf16_supported", &gemm_bf16_supported, "whether gemm_bf16 is built (AVX512-BF16)");
  m.def("gemm_bf16", &gemm_bf16, "x W^T (+ b) against weights packed in 64-column panels", py::arg("x"),
        py::arg("w_packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
        py::arg("glu") = false, nogil());
  m.def("layer_stack", &layer_stack, "a step's layer stack (flow/cpp_stack.py)", nogil());
  m.def("gemm_bf16_argmax", &gemm_bf16_argmax, "row-wise argmax of x W^T (bf16-rounded) against 64-column panels",
        nogil());
  m.def("gemm_f32_supported", &gemm_f32_supported,
        "whether gemm_f32 is built (AVX2+FMA; its AVX-512 tile where the build has AVX-512)");
  m.def("gemm_f32", &gemm_f32, "x W^T (+ b) against float32 weights packed in 16-column panels", py::arg("x"),
        py::arg("w_packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
        py::arg("glu") = false, nogil());
  m.def("gemm_f32_argmax", &gemm_f32_argmax, "row-wise argmax of x W^T against float32 16-column panels", nogil());
  m.def("rope_inplace", &rope_inplace, "rotate-half RoPE in place on q and k heads", nogil());
}
