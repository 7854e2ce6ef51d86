// The CPU op's common case as one C++ call and one C++ autograd node: cpu::ce_loss.
//
// tempsoft/ops/cross_entropy.py sends here the calls whose every argument it can check in a
// few comparisons (2-D fp32/fp64 logits, class-index targets, a number T, no weight that
// needs a gradient, no in-place write; see _cpu_common_case there). For those, the Python
// autograd.Function, its context object and its Python backward cost more than the
// fused kernel of a small batch, and after a large batch (whose 32 MB stream evicted the
// caches) they ran at a fraction of their warm speed: the whole path is C++ here, backward
// included. The formula is the Python path's, for this case:
//   forward:  ce_forward_no_zdot (T is a constant here): the loss, and the gradient with the
//             reduction's 1/denominator folded in, saved;
//   backward: the saved gradient itself for a grad_output of 1 (a reduced loss), else the
//             saved gradient times grad_output (per row for reduction "none").
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "../op_args.h"
#include "kernels.h"

namespace tempsoft {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CrossEntropyCpu : public torch::autograd::Function<CrossEntropyCpu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& target,
                            const at::Tensor& inv_t, const std::optional<at::Tensor>& weight,
                            int64_t ignore_index, double label_smoothing, int64_t reduction) {
    auto [loss, lse, grad, zdot, scale] =
        ce_forward_no_zdot(x, target, inv_t, weight, ignore_index, label_smoothing, reduction);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The saved gradient is a constant here, so a second derivative would silently miss
    // terms (the Python path refuses with the same words).
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "tempsoft.cross_entropy does not support double backward (create_graph=True); "
                "use F.cross_entropy(input / T, ...) where second derivatives are needed");
    const at::Tensor& g = grad_outputs[0];
    at::Tensor dx;
    if (g.defined()) {
      const at::Tensor grad = ctx->get_saved_variables()[0];
      if (g.dim() == 1) {  // reduction "none": one grad_output per row (else a 0-d one)
        dx = grad * g.to(grad.scalar_type()).unsqueeze(1);
      } else if (g.item<double>() == 1.0) {
        dx = grad;  // never modified, so every backward of a retained graph sees it whole
      } else {
        dx = grad * g.to(grad.scalar_type());
      }
    }
    // One entry per forward argument: only the logits have a gradient.
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

at::Tensor ce_loss(const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
                   const std::optional<at::Tensor>& weight, int64_t ignore_index,
                   double label_smoothing, int64_t reduction) {
  // Outside the node, so that a copy made here is part of the graph (as in Python).
  const at::Tensor xc = x.contiguous();
  if (at::GradMode::is_enabled() && xc.requires_grad()) {
    return CrossEntropyCpu::apply(xc, target, inv_t, weight, ignore_index, label_smoothing,
                                  reduction);
  }
  return std::get<0>(ce_forward(xc, target, inv_t, weight, ignore_index, label_smoothing,
                                reduction, kGradNone, std::nullopt));
}

}  // namespace cpu
}  // namespace tempsoft
