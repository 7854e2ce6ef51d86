// One SIMD capability level of the C++ CPU kernels, as the module tempsoft._cpu_<level>.
//
// setup.py compiles csrc/cpu/*.cpp once per level (default, avx2, avx512 on x86), each with
// that level's compiler flags, into its own shared library, so no instruction of a higher
// level can leak into code that a lower level runs. Importing a module executes code built
// for its level, so tempsoft/_dispatch.py imports only levels this CPU supports, picks one
// (the best, or TEMPSOFT_CPU_CAPABILITY), and calls its register_kernels() to make its
// kernels the CPU implementations of tempsoft_C::ce_rows and tempsoft_C::pgd_step_. The
// kernels are also callable directly, which is how tests compare the levels in one process.
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>

#include "kernels.h"

namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kLevel = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kLevel = "avx2";
#else
constexpr const char* kLevel = "default";
#endif

void register_kernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Registrations last as long as their Library object: this one is never destroyed.
    auto* lib = new torch::Library(torch::Library::IMPL, "tempsoft_C", c10::DispatchKey::CPU,
                                   __FILE__, __LINE__);
    lib->impl("ce_rows", &tempsoft::cpu::ce_rows);
    lib->impl("pgd_step_", &tempsoft::cpu::pgd_step_);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("level") = kLevel;
  m.def("register_kernels", &register_kernels,
        "Make this level's kernels the CPU kernels of the tempsoft_C ops (once per process; "
        "a process registers one level).");
  m.def("ce_rows", &tempsoft::cpu::ce_rows, "tempsoft_C::ce_rows, this level's CPU kernel.");
  m.def("ce_forward", &tempsoft::cpu::ce_forward, pybind11::arg("x"), pybind11::arg("target"),
        pybind11::arg("inv_t"), pybind11::arg("weight"), pybind11::arg("ignore_index"),
        pybind11::arg("label_smoothing"), pybind11::arg("reduction"),
        pybind11::arg("grad_mode"), pybind11::arg("grad_out") = pybind11::none(),
        "The CPU op's forward: ce_rows' checks and kernel plus the reduction, in one call "
        "(csrc/cpu/kernels.h).");
  m.def("ce_loss", &tempsoft::cpu::ce_loss,
        "The CPU op's common case: the loss, with a C++ autograd node when x needs a "
        "gradient (csrc/cpu/autograd.cpp). Positional: x, target, inv_t, weight, "
        "ignore_index, label_smoothing, reduction.");
  m.def("pgd_step_", &tempsoft::cpu::pgd_step_,
        "tempsoft_C::pgd_step_, this level's CPU kernel.");
  m.def("grad_cache_stats", [] {
    const auto s = tempsoft::cpu::grad_cache_stats();
    pybind11::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["blocks"] = s.blocks;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["limit_bytes"] = s.limit;
    return d;
  }, "This level's cache of gradient buffers: cached_bytes, blocks, hits, misses, limit_bytes.");
  m.def("grad_cache_set_limit", &tempsoft::cpu::grad_cache_set_limit, pybind11::arg("bytes"),
        "The most bytes the cache keeps (0: keep none), freeing buffers beyond it.");
  m.def("grad_cache_empty", &tempsoft::cpu::grad_cache_empty,
        "Free every buffer the cache holds (tensors in use are untouched).");
}
