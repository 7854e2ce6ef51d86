// Raw-pointer launchers of tempsoft's CUDA kernels.
//
// The .cu files that implement these include no ATen/torch header, so `nvcc -c` alone
// compile-checks them (tools/check_cuda.sh); csrc/cuda/bindings.cpp turns tensors into these
// argument structs and registers the launchers as the CUDA kernels of the torch.library ops
// tempsoft_C::ce_rows and tempsoft_C::pgd_step_ (schemas in csrc/module.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tempsoft {
namespace cuda {

// Element types of the logits / images. The accumulation type is fp64 for kFloat64 and fp32
// for everything else, as in tempsoft/kernels/reference.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Where a kernel reports the first bad class index it meets, instead of a device assert
// (which would poison the CUDA context and kill the process).
//   flag    device word, 0 until the first report; an atomicCAS on it elects one reporter.
//   record  device-visible alias of page-locked, host-mapped memory: {set, target value,
//           row, number of classes}. The reporter writes entries 1..3, fences, then sets
//           entry 0, so the host may read it at any time without synchronizing.
// Either pointer may be null (no report of that kind).
struct ErrorSink {
  unsigned long long* flag = nullptr;
  long long* record = nullptr;
};

// Fused temperature cross-entropy over rows: forward and gradient in one kernel.
// Contract: tempsoft/kernels/reference.py (ce_rows). All pointers are device pointers; acc
// means float (double for kFloat64).
struct CeArgs {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;           // (rows, cols) logits, contiguous
  const void* target = nullptr;      // (rows,) int64 class indices, or (rows, cols) of dtype
  bool prob_target = false;          // target holds class probabilities
  const void* inv_t = nullptr;       // acc, one value per row, or one for all (stride 0)
  int64_t inv_t_stride = 1;          // 1 or 0
  const void* weight = nullptr;      // (cols,) acc, or null (all ones)
  const void* grad_scale = nullptr;  // acc, per row or one for all
  int64_t grad_scale_stride = 1;     // 1 or 0
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  bool compute_grad = true;          // zdot (grad_mode full or zdot)
  void* grad = nullptr;              // (rows, cols) of dtype; may equal x; null: no gradient
                                     // is written (grad_mode zdot or none)
  void* loss = nullptr;              // (rows,) acc
  void* lse = nullptr;               // (rows,) acc
  void* zdot = nullptr;              // (rows,) acc; null if !compute_grad
  int64_t rows = 0;
  int64_t cols = 0;                  // 1 <= cols < 2^31
  ErrorSink errors;
};

// How a row is laid on the chip. kAuto lets ce_choose_plan decide; the other values force a
// strategy (benchmarks use them to measure the alternatives).
enum class CeMode : int {
  kAuto = 0,
  kWarp = 1,   // one warp per row, several rows per block; small rows
  kSmem = 2,   // a block (or a cluster of blocks) per row, the row kept in shared memory
               // between the statistics pass and the gradient pass
  kL2 = 3,     // a block (or cluster) per row, the gradient pass re-reads the row from L2
};

struct CeTuning {
  CeMode mode = CeMode::kAuto;
  int cluster = 0;  // blocks per row (1, 2, 4, 8; sm_90+ only); 0 = choose
};

// The launch a call will use; chosen in one place (ce_choose_plan) from the row size and the
// device's shared memory, multiprocessor count and compute capability.
struct CePlan {
  CeMode mode = CeMode::kWarp;
  int threads = 256;      // threads per block
  int cluster = 1;        // blocks per row (cluster size; 1 = no cluster)
  size_t smem_bytes = 0;  // dynamic shared memory per block (the cached row chunk)
};

// Chooses the plan for `a` on `device` (tuning may force a mode or a cluster size; a forced
// choice that cannot run is moved to the nearest one that can).
cudaError_t ce_choose_plan(const CeArgs& a, const CeTuning& tuning, int device, CePlan* plan);

// Launches the fused kernel on `stream` (no synchronization). Returns the launch error, if any.
cudaError_t ce_rows(const CeArgs& a, const CeTuning& tuning, cudaStream_t stream);

// One PGD step in place (contract: tempsoft/kernels/reference.py, pgd_step):
//   Linf: x_adv <- clamp(x_nat + clamp(x_adv + alpha*sign(g) - x_nat, -eps, eps), lo, hi)
//   L2:   x_adv <- clamp(x_nat + d * min(1, eps/||d||), lo, hi),
//         d = x_adv + alpha*g/||g|| - x_nat, norms per sample, sums in fp64
// Samples whose `active` entry is false are left untouched.
struct PgdArgs {
  DType dtype = DType::kFloat32;   // kFloat32 or kFloat64
  void* x_adv = nullptr;           // (batch, per_sample), contiguous, updated in place
  const void* grad = nullptr;      // same shape and dtype
  const void* x_nat = nullptr;     // same shape and dtype
  const void* eps = nullptr;       // (batch,) of dtype
  const void* alpha = nullptr;     // (batch,) of dtype
  const bool* active = nullptr;    // (batch,) or null (all active)
  int64_t batch = 0;
  int64_t per_sample = 0;          // elements per sample
  int norm = 0;                    // 0 = Linf, 2 = L2
  double lower = 0.0;
  double upper = 1.0;
};

cudaError_t pgd_step(const PgdArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace tempsoft
