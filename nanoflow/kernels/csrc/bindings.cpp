// Python bindings of the C++ CPU kernels (one extension module, several sources).
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor lens, double scale);
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void rope_inplace(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin, int64_t num_heads,
                  int64_t head_dim);
torch::Tensor argmax_rows(torch::Tensor logits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs (tensors only, no Python objects): with async scheduling the
  // engine thread schedules the next step meanwhile.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode", &paged_decode, "paged decode attention", nogil());
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = rms_norm(residual) * w (in place)", nogil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", nogil());
  m.def("argmax_rows", &argmax_rows, "row-wise argmax (first maximum)", nogil());
  m.def("rope_inplace", &rope_inplace, "rotate-half RoPE in place on q and k heads", nogil());
}
