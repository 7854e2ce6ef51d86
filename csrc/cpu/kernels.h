// The C++ CPU kernels of the tempsoft_C ops. csrc/cpu/level.cpp compiles them once per SIMD
// capability level into its own module (tempsoft._cpu_<level>), and registers one level's as
// the ops' CPU kernels at run time (tempsoft/_dispatch.py chooses which).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace tempsoft {
namespace cpu {

// Contract: tempsoft/kernels/reference.py, ce_rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_rows(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    const at::Tensor& grad_scale, int64_t grad_mode, const std::optional<at::Tensor>& grad_out);

// The CPU op's whole forward in one call (tempsoft/ops/cross_entropy.py calls it directly,
// without the dispatcher): ce_rows' checks and kernel with the reduction's scale, which it
// derives from the targets while checking them, and the reduction itself. reduction: 0 none,
// 1 mean, 2 sum. Returns (loss: the reduced 0-d loss or the per-row losses, lse, grad, zdot,
// scale: the (1,) factor folded into the gradient, 1/denominator for the mean, else 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction, int64_t grad_mode, const std::optional<at::Tensor>& grad_out);

// ce_forward(..., grad_mode full) without zdot (returned empty), for callers whose T needs no
// gradient: the kernel then skips zdot's sum, 4% of its time at C = 1000 and 32000 (fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward_no_zdot(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction);

// The common case of the CPU op (csrc/cpu/autograd.cpp): ce_forward's loss, with a C++
// autograd node for the logits' gradient when they need one (only theirs: the targets, T
// and the weight are constants to it).
at::Tensor ce_loss(const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
                   const std::optional<at::Tensor>& weight, int64_t ignore_index,
                   double label_smoothing, int64_t reduction);

// Contract: tempsoft/kernels/reference.py, pgd_step. x_adv by value: every backend of one
// op registers the same C++ signature.
void pgd_step_(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
               const at::Tensor& eps, const at::Tensor& alpha,
               const std::optional<at::Tensor>& active, int64_t norm, double lower,
               double upper);

// The cache of gradient buffers (grad_cache.cpp): an uninitialised contiguous CPU tensor
// whose memory comes from, and returns to, the cache.
at::Tensor empty_grad(at::IntArrayRef sizes, at::ScalarType dtype);

struct GradCacheStats {
  size_t cached_bytes;  // held by the cache, not by any tensor
  int64_t blocks;       // buffers held by the cache
  int64_t hits, misses; // allocations of at least 1 MiB served from the cache / fresh
  size_t limit;         // the most the cache holds, in bytes
};
GradCacheStats grad_cache_stats();
void grad_cache_set_limit(int64_t bytes);
void grad_cache_empty();

}  // namespace cpu
}  // namespace tempsoft
