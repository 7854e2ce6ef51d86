// One fused PGD step on the CPU, in place: ascent step, projection onto the eps-ball around
// x_nat, clamp to [lower, upper]. The contract and the exact arithmetic order are written in
// tempsoft/kernels/reference.py (pgd_step); this file reproduces that order, so fp32 results
// equal the reference's (fp64: Linf equal, L2 within a few ulps, the sums being fp64 too).
//
// Linf is one elementwise pass (read x_adv, grad, x_nat; write x_adv), parallel over the
// flattened (sample, element) range. L2 needs two per-sample norms, so each sample runs
// three passes inside one thread (its rows stay in cache between passes):
//   1. G = sum g^2                                       (fp64)
//   2. d = x_adv + g*scale - x_nat, stored into x_adv;  D = sum d^2 (fp64),
//      scale = alpha / sqrt(G), or no step when G is 0 or not finite or the scale overflows
//   3. write clamp(x_nat + d * f), f = min(1, eps / sqrt(D))
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "../op_args.h"
#include "kernels.h"

namespace {

using at::vec::Vectorized;

// Elements per parallel task: below this, thread start-up costs more than the work.
constexpr int64_t kGrainElements = 1 << 15;

// The reference rounds a product before adding it. With -ffp-contract=fast (GCC's default for
// C++; setup.py turns it off, a build with other flags may not) and FMA available, the
// compiler may fuse `a + b * c` into one FMA and change the last bit; an empty asm that "may
// modify" the product forbids that fusion. On x86 the value stays in its register;
// elsewhere it takes a trip through memory.
#if (defined(__GNUC__) || defined(__clang__)) && defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> rounded(Vectorized<float> v) {
  __m512 r = v;
  asm volatile("" : "+v"(r));
  return Vectorized<float>(r);
}
inline Vectorized<double> rounded(Vectorized<double> v) {
  __m512d r = v;
  asm volatile("" : "+v"(r));
  return Vectorized<double>(r);
}
#elif (defined(__GNUC__) || defined(__clang__)) && defined(CPU_CAPABILITY_AVX2)
inline Vectorized<float> rounded(Vectorized<float> v) {
  __m256 r = v;
  asm volatile("" : "+x"(r));
  return Vectorized<float>(r);
}
inline Vectorized<double> rounded(Vectorized<double> v) {
  __m256d r = v;
  asm volatile("" : "+x"(r));
  return Vectorized<double>(r);
}
#else
template <typename V>
inline V rounded(V v) {
#if (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA))
  asm volatile("" : "+m"(v));
#endif
  return v;
}
#endif

template <typename T>
inline Vectorized<T> clamp_vec(Vectorized<T> v, Vectorized<T> lo, Vectorized<T> hi) {
  return at::vec::minimum(at::vec::maximum(v, lo), hi);
}

// Linf on elements [i0, i1) of one sample: sign step, clamp of the offset to [-eps, eps],
// clamp to the box.
template <typename T>
void linf_span(T* x, const T* g, const T* x0, int64_t i0, int64_t i1, T eps, T alpha, T lo,
               T hi) {
  using V = Vectorized<T>;
  const V zero(T(0)), v_alpha(alpha), v_eps(eps), v_neg_eps(-eps), v_lo(lo), v_hi(hi);
  for (int64_t i = i0; i < i1; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), i1 - i);
    const V gv = V::loadu(g + i, m);
    const V x0v = V::loadu(x0 + i, m);
    const V s = gv.gt(zero) - gv.lt(zero);  // 1, -1 or 0; NaN compares false both ways
    const V a = V::loadu(x + i, m) + v_alpha * s;  // alpha * s is exact
    const V d = clamp_vec(a - x0v, v_neg_eps, v_eps);
    clamp_vec(x0v + d, v_lo, v_hi).store(x + i, m);
  }
}

// The two fp64 halves of an fp32 vector (Vectorized<float> holds twice as many lanes as
// Vectorized<double> at every capability level).
using VF = Vectorized<float>;
using VD = Vectorized<double>;
static_assert(VF::size() == 2 * VD::size(), "expected two double vectors per float vector");

inline std::pair<VD, VD> to_double(VF v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = v;
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1));
  return {VD(_mm512_cvtps_pd(_mm512_castps512_ps256(r))), VD(_mm512_cvtps_pd(hi))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r = v;
  return {VD(_mm256_cvtps_pd(_mm256_castps256_ps128(r))),
          VD(_mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)))};
#else
  alignas(64) float f[VF::size()];
  alignas(64) double d[VF::size()];
  v.store(f);
  for (int64_t k = 0; k < VF::size(); ++k) d[k] = static_cast<double>(f[k]);
  return {VD::loadu(d), VD::loadu(d + VD::size())};
#endif
}

// Sum of squares in fp64, fed one vector at a time (lanes past the end of a row are loaded
// as zeros and add nothing). Each lane accumulates separately and the lanes are summed in
// a fixed order at the end, so the result depends only on the row, never on threads. Each
// term is one explicit FMA (for fp32 data every square is exact in fp64, so the FMA changes
// nothing there; for fp64 data it rounds once per term).
template <typename T>
struct SumSq;

template <>
struct SumSq<float> {
  VD acc0 = VD(0.0), acc1 = VD(0.0);
  inline void add(VF v) {
    const auto [lo, hi] = to_double(v);
    acc0 = at::vec::fmadd(lo, lo, acc0);
    acc1 = at::vec::fmadd(hi, hi, acc1);
  }
  double total() const { return lane_sum(acc0 + acc1); }
  static double lane_sum(VD v) {
    alignas(64) double lanes[VD::size()];
    v.store(lanes);
    double s = 0.0;
    for (int64_t k = 0; k < VD::size(); ++k) s += lanes[k];
    return s;
  }
};

template <>
struct SumSq<double> {
  VD acc = VD(0.0);
  inline void add(VD v) { acc = at::vec::fmadd(v, v, acc); }
  double total() const { return SumSq<float>::lane_sum(acc); }
};

// The pre-projection offset a - x_nat = (x_adv + g * scale) - x_nat, for elements [i, i + m).
template <typename T>
inline Vectorized<T> l2_offset(const T* x, const T* g, const T* x0, int64_t i, int64_t m,
                               Vectorized<T> v_scale, bool step) {
  using V = Vectorized<T>;
  V a = V::loadu(x + i, m);
  if (step) a = a + rounded(V::loadu(g + i, m) * v_scale);
  else a = a + V(T(0));  // the reference adds a zero step; keep its -0 -> +0 behaviour
  return a - V::loadu(x0 + i, m);
}

template <typename T>
void l2_row(T* x, const T* g, const T* x0, int64_t n, T eps, T alpha, T lo, T hi) {
  using V = Vectorized<T>;
  constexpr double kInf = std::numeric_limits<double>::infinity();

  // 1. gradient norm -> step scale
  SumSq<T> g_sq;
  for (int64_t i = 0; i < n; i += V::size()) {
    g_sq.add(V::loadu(g + i, std::min<int64_t>(V::size(), n - i)));  // zeros past the end
  }
  const double G = g_sq.total();
  // A gradient too small to normalise (alpha / ||g|| overflows T) is no step, like a zero one.
  const T s = static_cast<T>(static_cast<double>(alpha) / std::sqrt(G));
  const bool step = G > 0 && G < kInf && std::isfinite(s);
  const T scale = step ? s : T(0);
  const V v_scale(scale);

  // 2. norm of the stepped offset -> projection factor. The offset overwrites x (its
  //    old value is no longer needed), so pass 3 reads it back instead of recomputing it.
  SumSq<T> d_sq;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    const V d = l2_offset(x, g, x0, i, m, v_scale, step);  // lanes past m are 0 - 0
    d.store(x + i, m);
    d_sq.add(d);
  }
  const double norm = std::sqrt(d_sq.total());
  const double eps64 = static_cast<double>(eps);
  const T f = norm > eps64 ? static_cast<T>(eps64 / norm) : T(1);
  const V v_f(f), v_lo(lo), v_hi(hi);

  // 3. write clamp(x_nat + d * f)
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    const V d = rounded(V::loadu(x + i, m) * v_f);
    clamp_vec(V::loadu(x0 + i, m) + d, v_lo, v_hi).store(x + i, m);
  }
}

}  // namespace

void tempsoft::cpu::pgd_step_(at::Tensor x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                             const at::Tensor& eps, const at::Tensor& alpha,
                             const std::optional<at::Tensor>& active, int64_t norm,
                             double lower, double upper) {
  TORCH_CHECK(x_adv.device().is_cpu(), "pgd_step_ (CPU): x_adv must be a CPU tensor, got ",
              x_adv.device());
  tempsoft::check_pgd_args(x_adv, grad, x_nat, eps, alpha, active, norm);
  const int64_t b = x_adv.size(0);
  if (b == 0 || x_adv.numel() == 0) return;
  const int64_t n = x_adv.numel() / b;
  const bool* act = active.has_value() ? active->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "pgd_step_cpu", [&] {
    scalar_t* x = x_adv.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* x0 = x_nat.data_ptr<scalar_t>();
    const scalar_t* ep = eps.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t lo = static_cast<scalar_t>(lower), hi = static_cast<scalar_t>(upper);
    if (norm == 0) {
      // Split the flat (sample, element) range; a task may cross sample boundaries.
      at::parallel_for(0, b * n, kGrainElements, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end;) {
          const int64_t row = i / n;
          const int64_t stop = std::min(end, (row + 1) * n);
          if (act == nullptr || act[row]) {
            const int64_t off = row * n;
            linf_span(x + off, g + off, x0 + off, i - off, stop - off, ep[row], al[row], lo,
                      hi);
          }
          i = stop;
        }
      });
    } else {
      // One sample per task-step, so a sample's sums never depend on the thread count.
      const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
      at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          if (act != nullptr && !act[row]) continue;
          const int64_t off = row * n;
          l2_row(x + off, g + off, x0 + off, n, ep[row], al[row], lo, hi);
        }
      });
    }
  });
}
