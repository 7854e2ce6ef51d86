// tempsoft._C: the op schemas (one place) and a few build facts for tempsoft.backends().
// The CUDA kernels register with TORCH_LIBRARY_IMPL in csrc/cuda/bindings.cpp; the CPU
// kernels live in one module per SIMD level (csrc/cpu/level.cpp), of which tempsoft/_dispatch.py
// registers one at run time. Python reaches them as torch.ops.tempsoft_C.*.
// This file is compiled without SIMD flags: it must load on any CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

TORCH_LIBRARY(tempsoft_C, m) {
  // Fused temperature cross-entropy over rows; contract in tempsoft/kernels/reference.py.
  m.def(
      "ce_rows(Tensor x, Tensor target, Tensor inv_t, Tensor? weight, int ignore_index, "
      "float label_smoothing, Tensor grad_scale, int grad_mode, Tensor(a!)? grad_out) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // One PGD step in place: ascent, projection onto the eps-ball, clamp. norm: 0 = Linf, 2 = L2.
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor eps, Tensor alpha, "
      "Tensor? active, int norm, float lower, float upper) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", []() {
#ifdef TEMPSOFT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this extension.");
  m.def("parallel_info", []() { return at::get_parallel_info(); },
        "ATen's parallel backend, as the C++ kernels see it (OpenMP and thread count).");
}
