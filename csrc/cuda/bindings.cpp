// CUDA implementations of the tempsoft_C ops (schemas in csrc/module.cpp): checks the
// tensors, turns them into the raw-pointer argument structs of launch.h, launches on the
// current stream. Also the bad-target report: see "Bad targets" below.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "../op_args.h"
#include "launch.h"

namespace {

namespace tc = tempsoft::cuda;

tc::DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return tc::DType::kFloat32;
    case at::kHalf: return tc::DType::kFloat16;
    case at::kBFloat16: return tc::DType::kBFloat16;
    case at::kDouble: return tc::DType::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": expected float32, float16, bfloat16 or float64, got ", t);
  return tc::DType::kFloat32;  // not reached
}

void check_launch(cudaError_t e, const char* op) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // a refused launch must not surface in someone else's check
  TORCH_CHECK(false, op, ": CUDA launch failed: ", cudaGetErrorString(e));
}

void check_cuda_call(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "tempsoft CUDA: ", what, " failed: ", cudaGetErrorString(e));
}

// ------------------------------------------------------------------------------------------
// Bad targets
//
// A device assert would poison the CUDA context and kill the process, so the kernel never
// dereferences a bad class index: it writes a NaN loss and a zero gradient for that row and
// records the first bad value in a per-device ErrorSink (a device flag that elects one
// reporter, and a record in page-locked host memory mapped into the device's address space).
// The host reads the record with a plain load: no copy, no synchronization.
//   * every ce_rows call on CUDA first looks at the record (free) and raises IndexError for a
//     report left by an earlier, finished launch;
//   * tempsoft_C::check_errors(synchronize=True) waits for the current stream, then raises
//     IndexError if any launch so far met a bad target. Callers that must report in the
//     same call (tests, a "strict" mode) use it; the common path never needs to.
// Raising clears the record and re-arms the flag.
// ------------------------------------------------------------------------------------------
struct ErrorState {
  unsigned long long* flag = nullptr;  // device memory
  long long* host = nullptr;           // mapped host memory: {set, value, row, classes}
  long long* mapped = nullptr;         // the device's pointer to `host`
};

constexpr int kMaxDevices = 64;
std::mutex g_error_mu;
ErrorState g_errors[kMaxDevices];

// The device's ErrorSink, allocated on first use (never freed: it lives as long as the
// process, like the CUDA context).
ErrorState& error_state(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "tempsoft CUDA: device index ", device,
              " out of range");
  std::lock_guard<std::mutex> lock(g_error_mu);
  ErrorState& s = g_errors[device];
  if (s.flag == nullptr) {
    // cudaMalloc / cudaMemset / cudaHostAlloc are not allowed while a stream captures a
    // CUDA graph: the first call on a device must come before capture (the usual warm-up).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(
        static_cast<c10::DeviceIndex>(device)).stream();
    check_cuda_call(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "tempsoft: the first CUDA cross-entropy call on device ", device,
                " allocates its bad-target record; make one call on this device before CUDA "
                "graph capture");
    void* flag = nullptr;
    void* host = nullptr;
    void* mapped = nullptr;
    check_cuda_call(cudaMalloc(&flag, sizeof(unsigned long long)), "cudaMalloc(error flag)");
    check_cuda_call(cudaMemset(flag, 0, sizeof(unsigned long long)), "cudaMemset(error flag)");
    check_cuda_call(cudaHostAlloc(&host, 4 * sizeof(long long),
                                  cudaHostAllocMapped | cudaHostAllocPortable),
                    "cudaHostAlloc(error record)");
    std::memset(host, 0, 4 * sizeof(long long));
    check_cuda_call(cudaHostGetDevicePointer(&mapped, host, 0), "cudaHostGetDevicePointer");
    s.flag = static_cast<unsigned long long*>(flag);
    s.host = static_cast<long long*>(host);
    s.mapped = static_cast<long long*>(mapped);
  }
  return s;
}

// Raises IndexError if `device`'s record holds a report; clears and re-arms it first.
void raise_pending(int device, cudaStream_t stream) {
  if (device < 0 || device >= kMaxDevices) return;
  long long value = 0, row = 0, classes = 0;
  {
    std::lock_guard<std::mutex> lock(g_error_mu);
    ErrorState& s = g_errors[device];
    if (s.host == nullptr) return;
    volatile long long* rec = s.host;
    if (rec[0] == 0) return;
    value = rec[1];
    row = rec[2];
    classes = rec[3];
    rec[0] = 0;
    check_cuda_call(cudaMemsetAsync(s.flag, 0, sizeof(unsigned long long), stream),
                    "cudaMemsetAsync(error flag)");
  }
  TORCH_CHECK_INDEX(false, "Target ", value, " is out of bounds: expected 0 <= target < ",
                    classes, " (the number of classes) or target == ignore_index (found by the "
                    "CUDA cross-entropy kernel in row ", row, "; that row's loss is NaN)");
}

// Only devices that ran a cross-entropy launch have a record, so this touches no CUDA API
// (and works without a driver) when there is nothing to report.
void check_errors(bool synchronize) {
  for (int d = 0; d < kMaxDevices; ++d) {
    {
      std::lock_guard<std::mutex> lock(g_error_mu);
      if (g_errors[d].host == nullptr) continue;
    }
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
    const auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(d));
    if (synchronize) stream.synchronize();
    raise_pending(d, stream.stream());
  }
}

// ------------------------------------------------------------------------------------------
// ce_rows
// ------------------------------------------------------------------------------------------
// TEMPSOFT_CE_MODE (auto|warp|smem|l2) and TEMPSOFT_CE_CLUSTER (0|1|2|4|8) force a launch
// plan; benchmarks use them to measure the alternatives. Read per call (a getenv is cheap).
tc::CeTuning tuning_from_env() {
  tc::CeTuning t;
  if (const char* m = std::getenv("TEMPSOFT_CE_MODE")) {
    const std::string s(m);
    if (s.empty() || s == "auto") t.mode = tc::CeMode::kAuto;
    else if (s == "warp") t.mode = tc::CeMode::kWarp;
    else if (s == "smem") t.mode = tc::CeMode::kSmem;
    else if (s == "l2") t.mode = tc::CeMode::kL2;
    else TORCH_CHECK_VALUE(false, "TEMPSOFT_CE_MODE must be auto, warp, smem or l2, got '", s, "'");
  }
  if (const char* c = std::getenv("TEMPSOFT_CE_CLUSTER")) {
    const int v = std::atoi(c);
    TORCH_CHECK_VALUE(v >= 0 && v <= 8, "TEMPSOFT_CE_CLUSTER must be 0..8, got '", c, "'");
    t.cluster = v;
  }
  return t;
}

uintptr_t misalign(const void* p) { return reinterpret_cast<uintptr_t>(p) & 15; }

// An uninitialized (rows, cols) tensor like x whose address is congruent to x's modulo 16
// bytes, so the kernel's 16-byte accesses line up in both.
at::Tensor congruent_empty(const at::Tensor& x) {
  const int64_t elem = x.element_size();
  const int64_t shift = static_cast<int64_t>(misalign(x.data_ptr())) / elem;
  if (shift == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor buf = at::empty({x.numel() + 16 / elem}, x.options());
  at::Tensor out = buf.narrow(0, shift, x.numel()).view(x.sizes());
  TORCH_INTERNAL_ASSERT(misalign(out.data_ptr()) == misalign(x.data_ptr()));
  return out;
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "ce_rows: ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

void check_acc_vector(const at::Tensor& t, const at::Tensor& x, at::ScalarType acc,
                      int64_t rows, const char* name) {
  check_same_device(t, x, name);
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "ce_rows: ", name, " must be ", acc, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && (t.numel() == rows || t.numel() == 1),
                    "ce_rows: ", name, " must be contiguous with ", rows,
                    " or 1 elements, got shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_rows_cuda(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    const at::Tensor& grad_scale, int64_t grad_mode, const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK(x.is_cuda(), "ce_rows (CUDA): x must be a CUDA tensor, got ", x.device());
  tempsoft::check_grad_mode(grad_mode);
  const bool compute_grad = grad_mode != tempsoft::kGradNone;  // zdot
  const bool write_grad = grad_mode == tempsoft::kGradFull;
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(),
                    "ce_rows: x must be a contiguous (rows, classes) tensor, got shape ",
                    x.sizes());
  const tc::DType dt = dtype_of(x.scalar_type(), "ce_rows");
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK_VALUE(cols >= 1 && cols <= INT32_MAX, "ce_rows: the number of classes must be in "
                    "[1, 2^31), got ", cols);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "ce_rows: label_smoothing must be in [0, 1], got ", label_smoothing);
  check_same_device(target, x, "target");
  const bool prob = target.is_floating_point();
  if (prob) {
    TORCH_CHECK_TYPE(target.scalar_type() == x.scalar_type(), "ce_rows: probability targets "
                     "must have x's dtype ", x.scalar_type(), ", got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.sizes() == x.sizes() && target.is_contiguous(),
                      "ce_rows: probability targets must be contiguous with x's shape ",
                      x.sizes(), ", got ", target.sizes());
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "ce_rows: class-index targets must be "
                     "int64, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == rows && target.is_contiguous(),
                      "ce_rows: class-index targets must be contiguous of shape (", rows,
                      ",), got ", target.sizes());
  }
  check_acc_vector(inv_t, x, acc, rows, "inv_t");
  check_acc_vector(grad_scale, x, acc, rows, "grad_scale");
  if (weight.has_value()) {
    check_same_device(*weight, x, "weight");
    TORCH_CHECK_TYPE(weight->scalar_type() == acc, "ce_rows: weight must be ", acc, ", got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == cols && weight->is_contiguous(),
                      "ce_rows: weight must be contiguous of shape (", cols, ",), got ",
                      weight->sizes());
  }
  if (write_grad && grad_out.has_value()) {
    check_same_device(*grad_out, x, "grad_out");
    TORCH_CHECK_TYPE(grad_out->scalar_type() == x.scalar_type(), "ce_rows: grad_out must have "
                     "x's dtype ", x.scalar_type(), ", got ", grad_out->scalar_type());
    TORCH_CHECK_VALUE(grad_out->sizes() == x.sizes() && grad_out->is_contiguous(),
                      "ce_rows: grad_out must be contiguous with x's shape ", x.sizes(),
                      ", got ", grad_out->sizes());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  raise_pending(device, stream);

  auto acc_opts = x.options().dtype(acc);
  at::Tensor loss = at::empty({rows}, acc_opts);
  at::Tensor lse = at::empty({rows}, acc_opts);
  at::Tensor zdot = compute_grad ? at::empty({rows}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor grad = at::empty({0}, x.options());
  at::Tensor grad_dst;      // where the kernel writes the gradient
  at::Tensor copy_back_to;  // grad_out, when it could not be written directly
  if (write_grad) {
    if (!grad_out.has_value()) {
      grad = rows == 0 ? at::empty({0, cols}, x.options()) : congruent_empty(x);
      grad_dst = grad;
    } else if (misalign(grad_out->data_ptr()) == misalign(x.data_ptr())) {
      grad_dst = *grad_out;
    } else {
      grad_dst = congruent_empty(x);
      copy_back_to = *grad_out;
    }
  }
  if (rows == 0) return {loss, lse, grad, zdot};

  at::Tensor q = target;
  if (prob && misalign(target.data_ptr()) != misalign(x.data_ptr())) {
    q = congruent_empty(x);
    q.copy_(target);
  }

  tc::CeArgs a;
  a.dtype = dt;
  a.x = x.data_ptr();
  a.target = q.data_ptr();
  a.prob_target = prob;
  a.inv_t = inv_t.data_ptr();
  a.inv_t_stride = inv_t.numel() == 1 ? 0 : 1;
  a.weight = weight.has_value() ? weight->data_ptr() : nullptr;
  a.grad_scale = grad_scale.data_ptr();
  a.grad_scale_stride = grad_scale.numel() == 1 ? 0 : 1;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.compute_grad = compute_grad;
  a.grad = write_grad ? grad_dst.data_ptr() : nullptr;
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  a.zdot = compute_grad ? zdot.data_ptr() : nullptr;
  a.rows = rows;
  a.cols = cols;
  if (!prob) {
    const ErrorState& es = error_state(device);
    a.errors.flag = es.flag;
    a.errors.record = es.mapped;
  }
  check_launch(tc::ce_rows(a, tuning_from_env(), stream), "ce_rows");
  if (copy_back_to.defined()) copy_back_to.copy_(grad_dst);
  return {loss, lse, grad, zdot};
}

// ------------------------------------------------------------------------------------------
// pgd_step_
// ------------------------------------------------------------------------------------------
// x_adv by value: every backend of one op must register the same C++ signature, and
// csrc/cpu/pgd_step.cpp takes it so.
void pgd_step_cuda(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                   const at::Tensor& eps, const at::Tensor& alpha,
                   const std::optional<at::Tensor>& active, int64_t norm, double lower,
                   double upper) {
  TORCH_CHECK(x_adv.is_cuda(), "pgd_step_ (CUDA): x_adv must be a CUDA tensor, got ",
              x_adv.device());
  tempsoft::check_pgd_args(x_adv, grad, x_nat, eps, alpha, active, norm);
  const at::ScalarType st = x_adv.scalar_type();
  const int64_t b = x_adv.size(0);
  if (b == 0 || x_adv.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(x_adv.device());
  tc::PgdArgs a;
  a.dtype = st == at::kDouble ? tc::DType::kFloat64 : tc::DType::kFloat32;
  a.x_adv = x_adv.data_ptr();
  a.grad = grad.data_ptr();
  a.x_nat = x_nat.data_ptr();
  a.eps = eps.data_ptr();
  a.alpha = alpha.data_ptr();
  a.active = active.has_value() ? active->data_ptr<bool>() : nullptr;
  a.batch = b;
  a.per_sample = x_adv.numel() / b;
  a.norm = static_cast<int>(norm);
  a.lower = lower;
  a.upper = upper;
  check_launch(tc::pgd_step(a, c10::cuda::getCurrentCUDAStream(x_adv.get_device()).stream()),
               "pgd_step_");
}

}  // namespace

TORCH_LIBRARY_IMPL(tempsoft_C, CUDA, m) {
  m.impl("ce_rows", &ce_rows_cuda);
  m.impl("pgd_step_", &pgd_step_cuda);
}

// CUDA-only helper op (no tensor argument, so it has one catch-all kernel): raise the
// IndexError for a bad target that a CUDA cross-entropy launch reported; with
// synchronize=True, first wait for the current stream so that every launch so far counts.
TORCH_LIBRARY_FRAGMENT(tempsoft_C, m) {
  m.def("check_errors(bool synchronize=True) -> ()", &check_errors);
}
