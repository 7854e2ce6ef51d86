// What the CPU and CUDA implementations of the tempsoft_C ops share: the grad_mode values of
// ce_rows and the argument checks of pgd_step_ (one contract, one set of checks; the device
// checks stay with each implementation). ATen only, no CUDA: both sides include it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace tempsoft {

// ce_rows' grad_mode (tempsoft/kernels/reference.py). 0 and 1 keep the meaning of the boolean
// compute_grad this argument replaced.
enum GradMode : int64_t {
  kGradNone = 0,  // loss and lse
  kGradFull = 1,  // and zdot and the gradient
  kGradZdot = 2,  // and zdot, without the (rows, classes) gradient
  // Not a value of the contract (check_grad_mode refuses it): the CPU kernel's mode for
  // callers whose T needs no gradient (cpu::ce_forward_no_zdot), the gradient without zdot.
  kGradNoZdot = 3,
};

inline void check_grad_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode == kGradNone || mode == kGradFull || mode == kGradZdot,
                    "ce_rows: grad_mode must be 0 (none), 1 (full) or 2 (zdot), got ", mode);
}

// pgd_step_: shapes, dtypes, contiguity, and no aliasing -- the L2 kernels write x_adv
// before their last read of grad and x_nat, so those must be other memory.
inline void check_pgd_args(const at::Tensor& x_adv, const at::Tensor& grad,
                           const at::Tensor& x_nat, const at::Tensor& eps,
                           const at::Tensor& alpha, const std::optional<at::Tensor>& active,
                           int64_t norm) {
  TORCH_CHECK_VALUE(norm == 0 || norm == 2, "pgd_step_: norm must be 0 (Linf) or 2 (L2), got ",
                    norm);
  TORCH_CHECK_VALUE(x_adv.dim() >= 1, "pgd_step_: x_adv needs a batch dimension, got shape ",
                    x_adv.sizes());
  TORCH_CHECK_VALUE(x_adv.is_contiguous() && grad.is_contiguous() && x_nat.is_contiguous(),
                    "pgd_step_: x_adv, grad and x_nat must be contiguous");
  TORCH_CHECK_VALUE(!x_adv.is_alias_of(grad) && !x_adv.is_alias_of(x_nat),
                    "pgd_step_: grad and x_nat must not share memory with x_adv (pass copies)");
  TORCH_CHECK_VALUE(grad.sizes() == x_adv.sizes() && x_nat.sizes() == x_adv.sizes(),
                    "pgd_step_: shapes differ: x_adv ", x_adv.sizes(), ", grad ", grad.sizes(),
                    ", x_nat ", x_nat.sizes());
  const at::ScalarType st = x_adv.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble,
                   "pgd_step_: expected float32 or float64, got ", st);
  TORCH_CHECK_TYPE(grad.scalar_type() == st && x_nat.scalar_type() == st &&
                       eps.scalar_type() == st && alpha.scalar_type() == st,
                   "pgd_step_: x_adv, grad, x_nat, eps and alpha must share one dtype, got ", st,
                   ", ", grad.scalar_type(), ", ", x_nat.scalar_type(), ", ", eps.scalar_type(),
                   ", ", alpha.scalar_type());
  const int64_t b = x_adv.size(0);
  TORCH_CHECK_VALUE(eps.dim() == 1 && eps.size(0) == b && eps.is_contiguous(),
                    "pgd_step_: eps must be a contiguous (", b, ",) tensor, got shape ",
                    eps.sizes());
  TORCH_CHECK_VALUE(alpha.dim() == 1 && alpha.size(0) == b && alpha.is_contiguous(),
                    "pgd_step_: alpha must be a contiguous (", b, ",) tensor, got shape ",
                    alpha.sizes());
  for (const at::Tensor* t : {&grad, &x_nat, &eps, &alpha}) {
    TORCH_CHECK(t->device() == x_adv.device(), "pgd_step_: all tensors must be on ",
                x_adv.device(), ", got one on ", t->device());
  }
  if (active.has_value()) {
    TORCH_CHECK_TYPE(active->scalar_type() == at::kBool, "pgd_step_: active must be bool, got ",
                     active->scalar_type());
    TORCH_CHECK_VALUE(active->dim() == 1 && active->size(0) == b && active->is_contiguous(),
                      "pgd_step_: active must be a contiguous (", b, ",) tensor, got shape ",
                      active->sizes());
    TORCH_CHECK(active->device() == x_adv.device(), "pgd_step_: active is on ",
                active->device(), " but x_adv is on ", x_adv.device());
  }
}

}  // namespace tempsoft
