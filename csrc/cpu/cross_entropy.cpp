// Fused temperature-scaled softmax cross-entropy over rows, CPU: tempsoft_C::ce_rows.
//
// The contract (shapes, dtypes, math) is the docstring of tempsoft/kernels/reference.py;
// this file implements it with at::parallel_for over rows and at::vec SIMD within a row.
//
// Notation for one row: x (C logits), t = inv_t, m = max_c x_c (or a guess of at most
// that, see pass 0), shifted scaled logits d_c = (x_c - m) * t (= z_c - max z; never
// overflows, even for x = 1e4 and T = 1e-3), s = sum_c exp(d_c), log p_c = d_c - log s,
// lse = log s + m * t.
// Weights w (ones when absent), W = sum_c w_c, eps = label smoothing.
//
// Per row, three passes:
//   0. m, the row's max (NaN-propagating).  A row whose max is not finite (a NaN, a +inf,
//      or every logit -inf) takes a scalar path that mirrors the reference step by step, so
//      NaN logits give a NaN loss and infinities match it too.  One-block fp32 / fp64 rows
//      of 256 columns or more skip this pass: pass 1 starts from a guess (a logit of the
//      row, so at most its max), and where its sums show the guess too far from the max
//      (or a NaN or an infinity), they take pass 0 and pass 1 again (guess_shift).
//   1. Blocks of kConfig.block_cols columns, relative to m:
//        s   = sum exp(d_c)                                (every row)
//        sed = sum exp(d_c) d_c                            (zdot; only with compute_grad)
//        lin = sum a_c d_c, asum = sum a_c                 (a_c = w_c for an index target
//              with smoothing, a_c = w_c q'_c for a probability target)
//      A one-block row is read by pass 0 and again here while it sits in L1; a wider row is
//      read once more from L2.  (Before 2026-11-30 a wide row took its max block by block,
//      rescaling the sums as the max grew; a row max first is what lets the gradient row
//      keep the exponentials below.)
//   2. The gradient, one block at a time (formulas there), from exp(d_c).  Where pass 1
//      keeps the exponentials (ExpStore):
//      - a row of at most one block: in a per-thread scratch row (L1-resident);
//      - a wider fp32 / fp64 row: in its gradient row, which pass 2 then rewrites in place
//        without computing an exponential;
//      - a wider half-precision row: nowhere; pass 2 recomputes them from x, still in L2.
//      (Measured on a 2-core AMD EPYC (Zen 5), fp32, 1 thread: keeping them in the scratch
//      row is ~20% faster at C = 512 and 1000, the same at 2048; a separate scratch row
//      spilled out of L1 was 10-20% slower than recomputing at C = 4096 ... 128000, and the
//      gradient row, which pass 2 writes anyway, is ~30% faster than recomputing at
//      C = 32000.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "kernels.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "ATen uses OpenMP but this file is built without -fopenmp: at::parallel_for would run serially"
#endif

namespace tempsoft {
namespace {

using at::vec::Vectorized;

// ------------------------------------------------------------------------------------
// Tuning
// ------------------------------------------------------------------------------------
struct CeCpuConfig {
  // Columns per block.  A row of at most one block is read by pass 0 and pass 1 while it
  // sits in L1, and keeps its exponentials there for pass 2: 2048 fp32 columns = 8 KiB of
  // logits + 8 KiB of exponentials, inside even a 32 KiB L1d.  (4096 was no faster at
  // C = 1000 and 5% slower at C = 4096, 2 threads.)
  int64_t block_cols;
  // Logits per parallel task: below this a row range stays on one thread, since waking
  // the OpenMP team costs more than it saves.
  int64_t min_elems_per_task;
  // Gradients of at least this many bytes are written with streaming stores where their
  // rows are one block (pass 2 from the scratch row). A plainly stored gradient this large
  // (a quarter of the 32 MiB L3 we measured on) mostly leaves the cache before anyone reads
  // it, and on the way evicts everything else -- glibc's memcpy streams large copies for
  // the same reason. Measured: the Python and autograd code that runs right after a 32 MB
  // stream costs 4-6x its warm time, and streaming made the kernel 16-24% faster at
  // 4096 x 1000 (benchmarks/RESULTS.md, 2026-11-30).
  int64_t stream_min_bytes;
};
constexpr CeCpuConfig kConfig{2048, 1 << 15, int64_t(8) << 20};

int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kConfig.min_elems_per_task / std::max<int64_t>(cols, 1));
}

// ------------------------------------------------------------------------------------
// Small vector helpers
// ------------------------------------------------------------------------------------
// The exponentials of a row, exp(d) with d = (x - m) t <= 0 (x = -inf gives 0), which are
// most of the kernel's arithmetic.  fp64: Sleef.  fp32: Sleef's 1-ulp expf made the forward
// pass 1.26x as long as ATen's exp_u20 (4096 x 1000, 1 thread); on AVX-512, RowExp<float>
// below takes 12 vector operations per vector of logits, x - m included (13 with u), where
// the Cody-Waite e^d it replaced took 16 (512 x 1000, 1 thread: 0.199 -> 0.177 ms), and is
// more accurate.  For AVX2 a polynomial with the exponent built in integer bits (no vscalefps)
// was no faster than exp_u20.
//
// eval(x, u) returns exp(d) and sets u = d * kScale, made finite where x = -inf (there
// exp(d) = 0, so e * u is 0, as the reference's where(dz == 0) in zdot's sum).
// PerT: what depends on t alone, computed once for a run of rows with the same t (per()).
template <typename acc_t>
struct RowExp {
  using Vec = Vectorized<acc_t>;
  static constexpr double kScale = 1.0, kInvScale = 1.0;
  struct PerT {
    acc_t t;
  };
  static PerT per(acc_t t) { return {t}; }

  RowExp(acc_t m, const PerT& c) : m_(m), t_(c.t) {}

  Vec eval(const Vec& x, Vec& u) const {
    const Vec d = (x - m_) * t_;
    u = at::vec::clamp_min(d, Vec(std::numeric_limits<acc_t>::lowest()));
    if constexpr (std::is_same_v<acc_t, float>) {
      return d.exp_u20();
    } else {
      return d.exp();
    }
  }
  // eval of N vectors (the AVX-512 fp32 exponential interleaves them; here, one by one).
  template <int N>
  void eval_n(const Vec (&x)[N], Vec (&e)[N], Vec (&u)[N]) const {
    for (int j = 0; j < N; ++j) e[j] = eval(x[j], u[j]);
  }

 private:
  Vec m_, t_;
};

#if defined(CPU_CAPABILITY_AVX512)
// exp(d) = 2^u with u = (x - m) t log2(e), t log2(e) held as hi + lo (float each, their sum
// exact to ~2^-48).  n = u rounded to a multiple of 1/16, as n = k - S with
// k = (x - m) hi + S by one fma: S = 1.5 * 2^19 puts k's float grid at 1/16, so k's low 4
// mantissa bits are j = 16 n mod 16 (for |u| < 2^18; u is >= -160, and a larger u, which
// only a guessed shift can give, overflows to inf whatever j).  r = (x - m) hi - n +
// (x - m) lo by two fmas, so that r carries the rounding of x - m alone (d itself is never
// rounded).  Then 2^u = 2^floor(n) 2^(j/16) 2^r: 2^(j/16) from a 16-entry table by one
// vpermps indexed by k's bits, 2^r on [-1/32, 1/32] by a degree-3 Taylor polynomial
// (truncation 9e-9), folded in as T + (T r) q, and 2^floor(n) by vscalefps, which rounds
// into the subnormals and underflows to 0 as exp does.  Relative error <= 1.2e-7 where
// exp(d) is a normal float (x - m over [-87, 0] on a grid of 2e7, emulated in float
// arithmetic against exp in double), plus x - m's rounding.  It replaced, on 2026-12-01, a
// degree-5 polynomial on [-1/2, 1/2] with n an integer (<= 1.8e-7): one multiply-add fewer
// per vector on the FMA side, 0-5% less time at C = 64 ... 32000, 5% more at C = 10 (one
// masked vector per row; under 3 ns a row).  The Cody-Waite e^d before 2026-11-30 had
// <= 2.3e-7 plus d's rounding (exp_u20: <= 3.8e-7).  x - m is clamped at u = -160 (2^-160
// rounds to 0), which keeps -inf (-inf - -inf = NaN) out of r and makes u finite.
template <>
struct RowExp<float> {
  using Vec = Vectorized<float>;
  static constexpr double kScale = 1.4426950408889634;     // log2(e)
  static constexpr double kInvScale = 0.69314718055994531;  // ln(2)

  struct PerT {
    float hi, lo, floor;
  };
  static PerT per(float t) {
    const double tl = double(t) * kScale;
    const float hi = float(tl), lo = float(tl - double(hi));
    const float floor = -160.0f / hi;  // t > 0 (checked); a subnormal t gives -inf
    return {hi, lo, std::isfinite(floor) ? floor : std::numeric_limits<float>::lowest()};
  }

  RowExp(float m, const PerT& c)
      : m_(_mm512_set1_ps(m)), hi_(_mm512_set1_ps(c.hi)), lo_(_mm512_set1_ps(c.lo)),
        floor_(_mm512_set1_ps(c.floor)) {}

  Vec eval(const Vec& x, Vec& u) const {
    Vec e[1], uu[1];
    eval_n<1>({x}, e, uu);
    u = uu[0];
    return e[0];
  }

  // eval of N vectors in lockstep, each step over all N before the next: one exponential
  // is a chain of some 45 cycles of latency, and GCC keeps the chains in source order.
  // (Pass 1 with four in lockstep against two written one after the other: 3% less time
  // at 512 x 1000, 1 thread.)
  template <int N>
  void eval_n(const Vec (&x)[N], Vec (&e)[N], Vec (&u)[N]) const {
    // 2^(j/16), j = 0..15, each rounded to float
    alignas(64) static constexpr float kTable[16] = {
        0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f,
        0x1.306fe0p+0f, 0x1.3dea64p+0f, 0x1.4bfdaep+0f, 0x1.5ab07ep+0f,
        0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
        0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};
    // 2^r = 1 + r q, q = c1 + r (c2 + r c3): ln 2, ln^2 2 / 2, ln^3 2 / 6
    const __m512 c1 = _mm512_set1_ps(0x1.62e430p-1f), c2 = _mm512_set1_ps(0x1.ebfbe0p-3f),
                 c3 = _mm512_set1_ps(0x1.c6b08ep-5f);
    const __m512 shifter = _mm512_set1_ps(0x1.8p19f);
    const __m512 table = _mm512_load_ps(kTable);
    __m512 xm[N], k[N], n[N], r[N], q[N], tj[N], tr[N];
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      // floor_ first: vmaxps returns its second operand where either is NaN, and a NaN
      // logit must give a NaN exponential (a guessed shift finds NaN rows by their sum).
      xm[j] = _mm512_max_ps(floor_, _mm512_sub_ps(x[j], m_));
    }
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) k[j] = _mm512_fmadd_ps(xm[j], hi_, shifter);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) n[j] = _mm512_sub_ps(k[j], shifter);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) tj[j] = _mm512_permutexvar_ps(_mm512_castps_si512(k[j]), table);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) r[j] = _mm512_fmsub_ps(xm[j], hi_, n[j]);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) r[j] = _mm512_fmadd_ps(xm[j], lo_, r[j]);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) u[j] = _mm512_add_ps(n[j], r[j]);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) q[j] = _mm512_fmadd_ps(c3, r[j], c2);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) q[j] = _mm512_fmadd_ps(q[j], r[j], c1);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) tr[j] = _mm512_mul_ps(tj[j], r[j]);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) e[j] = _mm512_fmadd_ps(tr[j], q[j], tj[j]);  // 2^(n - floor(n) + r)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) e[j] = _mm512_scalef_ps(e[j], n[j]);
  }

 private:
  __m512 m_, hi_, lo_, floor_;
};
#endif

template <typename T>
inline T nan_max(T a, T b) {
  return (std::isnan(a) || a > b) ? a : b;
}

#if defined(CPU_CAPABILITY_AVX2)
// hsum's and hmax_finite's tree on AVX2, in registers: op over lanes i and i + 4 (i + 2 for
// double), then i + 2, then i + 1; the result is in lane 0.
template <typename Op>
inline float lane_tree(const __m256 x, Op op) {
  __m128 m = op(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = op(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(op(m, _mm_shuffle_ps(m, m, 1)));
}
template <typename Op>
inline double lane_tree(const __m256d x, Op op) {
  const __m128d m = op(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(op(m, _mm_unpackhi_pd(m, m)));
}
#endif

// Horizontal sum and NaN-propagating max of the lanes.  A row pays for a few of these, so
// they are trees (shuffles where the level has them), not one dependent op per lane.
template <typename acc_t>
double hsum(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_reduce_add_ps(v);
  if constexpr (std::is_same_v<acc_t, double>) return _mm512_reduce_add_pd(v);
#elif defined(CPU_CAPABILITY_AVX2)
  // The tree below, in registers.
  if constexpr (std::is_same_v<acc_t, float>) {
    return lane_tree(__m256(v), [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
  }
  if constexpr (std::is_same_v<acc_t, double>) {
    return lane_tree(__m256d(v), [](__m128d a, __m128d b) { return _mm_add_pd(a, b); });
  }
#endif
  constexpr int64_t V = Vectorized<acc_t>::size();
  alignas(64) acc_t tmp[V];
  v.store(tmp);
  for (int64_t w = V / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) tmp[i] += tmp[i + w];
  }
  return tmp[0];
}

template <typename acc_t>
acc_t hmax(const Vectorized<acc_t>& v) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  alignas(64) acc_t tmp[V];
  v.store(tmp);
  for (int64_t w = V / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) tmp[i] = nan_max(tmp[i], tmp[i + w]);
  }
  return tmp[0];
}

// hmax for lanes known to hold no NaN: the level's own reduction where it has one, in
// registers.  (Every row's max goes through it: rows took 16% less time at C = 10 and 4%
// at C = 1000 with it, AVX-512, 1 thread; 3-7% less on the AVX2 level.)
template <typename acc_t>
acc_t hmax_finite(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_reduce_max_ps(v);
  if constexpr (std::is_same_v<acc_t, double>) return _mm512_reduce_max_pd(v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return lane_tree(__m256(v), [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
  }
  if constexpr (std::is_same_v<acc_t, double>) {
    return lane_tree(__m256d(v), [](__m128d a, __m128d b) { return _mm_max_pd(a, b); });
  }
#endif
  return hmax(v);
}

// Loads `count` lanes; the other lanes get `fill`.
template <typename acc_t>
inline Vectorized<acc_t> load_fill(const acc_t* p, int64_t count, acc_t fill) {
  using Vec = Vectorized<acc_t>;
  if (count == Vec::size()) return Vec::loadu(p);
#if defined(CPU_CAPABILITY_AVX512)
  // One masked load (Vec::set is a jump table over count, and was not even inlined: a
  // visible share of a row at C = 10).
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), __mmask16((1u << count) - 1), p);
  } else {
    return _mm512_mask_loadu_pd(_mm512_set1_pd(fill), __mmask8((1u << count) - 1), p);
  }
#else
  return Vec::set(Vec(fill), Vec::loadu(p, count), count);
#endif
}

// Max of n values, NaN-propagating (a NaN anywhere makes the row take the exact path).
template <typename acc_t>
acc_t block_max_exact(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  Vec m0(ninf), m1(ninf);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + V));
  }
  for (; i < n; i += V) m0 = at::vec::maximum(m0, load_fill(x + i, std::min(V, n - i), ninf));
  return hmax(at::vec::maximum(m0, m1));
}

// block_max_exact's result, faster for blocks of finite values: a plain max (which may drop
// a NaN) while fma(x, 0, probe) stays 0 exactly when every x is finite.  A block with a
// NaN or an infinity (a -inf mask included) is redone by block_max_exact.  (The NaN-aware
// max costs a compare and a mask-to-vector blend per vector: its share of a 512 x 1000
// profile, 1 thread, fell from 9% to 6.5% with this loop.)
template <typename acc_t>
acc_t block_max(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec zero(0);
  Vec m0(ninf), m1(ninf), probe0(0), probe1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec a = Vec::loadu(x + i), b = Vec::loadu(x + i + V);
    m0 = at::vec::clamp_min(a, m0);
    m1 = at::vec::clamp_min(b, m1);
    probe0 = at::vec::fmadd(a, zero, probe0);
    probe1 = at::vec::fmadd(b, zero, probe1);
  }
  for (; i < n; i += V) {
    const int64_t count = std::min(V, n - i);
    const Vec a = load_fill(x + i, count, ninf);
    m0 = at::vec::clamp_min(a, m0);
    probe0 = at::vec::fmadd(Vec::loadu(x + i, count), zero, probe0);  // padding lanes: 0
  }
  if (hsum(probe0 + probe1) != 0) return block_max_exact(x, n);
  return hmax_finite(at::vec::clamp_min(m0, m1));
}

// ------------------------------------------------------------------------------------
// Per-call constants and per-thread scratch
// ------------------------------------------------------------------------------------
// Which per-column term pass 1 accumulates besides s (and sed).
enum class Terms {
  kNone,      // index target without smoothing, or an ignored row
  kWeight,    // index target with smoothing:  a_c = w_c
  kProb,      // probability target:           a_c = w_c q'_c,  q'_c = (1-eps) q_c + eps/C
};

// The modes (op_args.h) that write the (rows, classes) gradient, and those that sum zdot.
bool writes_grad(int64_t mode) { return mode == kGradFull || mode == kGradNoZdot; }
bool has_zdot(int64_t mode) { return mode == kGradFull || mode == kGradZdot; }

template <typename acc_t>
struct Params {
  int64_t C;
  acc_t eps;            // label smoothing
  acc_t eps_c;          // eps / C
  acc_t one_m_eps;      // 1 - eps
  double W;             // sum_c w_c
  const acc_t* w;       // (C,) weights; ones when the caller passed none
  int64_t ignore_index;
  bool prob;            // probability targets
  bool grad;            // grad_mode != none: pass 2's machinery; the gradient is written
                        // where the row's gradient pointer is not null
  bool zdot;            // grad_mode full or zdot: zdot (sed in pass 1)
  bool stream;          // one-block rows write their gradient with streaming stores
};

// Whether pass 2 takes exp(d_c) from pass 1's scratch row (rows of one block).
inline bool keeps_exp(int64_t C) { return C <= kConfig.block_cols; }

// Where pass 1 keeps exp(d_c) for pass 2 (see the file comment).
enum class ExpStore { kNone, kScratch, kGradRow };

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> e;        // (C,) exp(d_c) of a one-block row, from pass 1
  std::vector<acc_t> xs, qs;   // (block,) staged logits / targets of a half-precision input
  std::vector<acc_t> gs;       // (block,) staged gradient of a half-precision output

  Scratch(int64_t C, bool grad, bool staged) {
    const int64_t blk = std::min(C, kConfig.block_cols);
    if (grad && keeps_exp(C)) e.resize(C);
    if (staged) {
      xs.resize(blk);
      qs.resize(blk);
      gs.resize(blk);
    }
  }
};

// Half-precision values to fp32, a vector at a time (at::vec::convert has no vectorized
// half -> float path: with it fp16 rows took 2.4x as long as fp32 ones).
inline std::tuple<Vectorized<float>, Vectorized<float>> to_float(
    const Vectorized<c10::BFloat16>& v) {
  return at::vec::convert_bfloat16_float(v);
}
inline std::tuple<Vectorized<float>, Vectorized<float>> to_float(const Vectorized<c10::Half>& v) {
  return at::vec::convert_half_float(v);
}

template <typename half_t>
void widen(const half_t* src, float* dst, int64_t n) {
  constexpr int64_t H = Vectorized<half_t>::size(), F = Vectorized<float>::size();
  int64_t i = 0;
  for (; i + H <= n; i += H) {
    const auto [lo, hi] = to_float(Vectorized<half_t>::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + F);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// A block of n values of a tensor as acc_t: the data itself, or a staged copy.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* p, int64_t n, std::vector<acc_t>& stage) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    widen(p, stage.data(), n);
    return stage.data();
  }
}

// ------------------------------------------------------------------------------------
// Pass 1: sums over one block, relative to h (the row max m)
// ------------------------------------------------------------------------------------
struct Sums {
  double s = 0, sed = 0, lin = 0, asum = 0;

  void add(const Sums& o) {
    s += o.s;
    sed += o.sed;
    lin += o.lin;
    asum += o.asum;
  }
};

// e: where to keep exp(d_c) for pass 2, or null.  pf: the same columns of the next row
// (pf_size bytes per element), or null: pass 1 prefetches them a cache line per vector, so
// that the next row streams in while this one computes.  (4096 x 1000 fp32, two threads,
// the output preallocated: 1.19-1.28 ms with the prefetch, 1.34-1.39 ms without; no change
// in cache-resident runs with one thread.)
// kGrad: the gradient or zdot follow (e may be set); zdot: sum sed too (with kGrad).  zdot
// is a flag that the compiler hoists out of the loop: as a template parameter it doubled
// the row code's instantiations and made rows of C = 10 12% slower.
template <typename acc_t, bool kGrad, Terms kTerms>
Sums pass1_block(const acc_t* x, const acc_t* w, const acc_t* q, int64_t n, acc_t h, acc_t t,
                 const RowExp<acc_t>& rexp_in, bool zdot, acc_t one_m_eps, acc_t eps_c,
                 acc_t* e, const char* pf, int64_t pf_size) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // A local copy: the stores to e could alias the caller's (float vectors), which would
  // reload its members on every step.
  const RowExp<acc_t> rexp = rexp_in;
  const Vec hv(h), tv(t), zero(0);
  Vec s(0), sed(0), lin(0), asum(0);

  // Two sets of accumulators: two independent dependency chains through the exponential.
  // (With the tree reductions and block_max above: 0.253 -> 0.236 ms at 512 x 1000, fp32,
  // 1 thread.)
  Vec s1(0), sed1(0), lin1(0), asum1(0);

  // Vectors of logits per step of the main loop, their exponentials in lockstep (eval_n).
  constexpr int kLanes = 4;
  auto accumulate = [&](int64_t i, int64_t count, const Vec& xv, const Vec& ex, const Vec& u,
                        Vec& s, Vec& sed, Vec& lin, Vec& asum) {
    s += ex;
    if constexpr (kGrad) {
      if (zdot) sed = at::vec::fmadd(ex, u, sed);
      if (e != nullptr) ex.store(e + i, count);
    }
    if constexpr (kTerms != Terms::kNone) {
      Vec a = Vec::loadu(w + i, count);            // padding lanes: a = 0
      if constexpr (kTerms == Terms::kProb) {
        a = a * at::vec::fmadd(Vec::loadu(q + i, count), Vec(one_m_eps), Vec(eps_c));
      }
      asum += a;
      // A -inf logit gives a * -inf (inf, or NaN for a = 0), as the reference's w * nlp.
      const Vec d = (xv - hv) * tv;
      lin = at::vec::fmadd(a, count == V ? d : Vec::set(zero, d, count), lin);
    }
  };
  int64_t i = 0;
  for (; i + kLanes * V <= n; i += kLanes * V) {
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int j = 0; j < kLanes; ++j) __builtin_prefetch(pf + (i + j * V) * pf_size);
    }
    Vec xv[kLanes], ex[kLanes], u[kLanes];
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) xv[j] = Vec::loadu(x + i + j * V);
    rexp.eval_n(xv, ex, u);
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) {
      if (j % 2 == 0) {
        accumulate(i + j * V, V, xv[j], ex[j], u[j], s, sed, lin, asum);
      } else {
        accumulate(i + j * V, V, xv[j], ex[j], u[j], s1, sed1, lin1, asum1);
      }
    }
  }
  for (; i < n; i += V) {
    const int64_t count = std::min(V, n - i);
    // Padding lanes hold -inf, so their exp is 0 and they add nothing to s or sed.
    const Vec xv = load_fill(x + i, count, ninf);
    Vec u;
    const Vec ex = rexp.eval(xv, u);
    accumulate(i, count, xv, ex, u, s, sed, lin, asum);
  }

  Sums out;
  out.s = hsum(s + s1);
  if (kGrad && zdot) out.sed = hsum(sed + sed1) * RowExp<acc_t>::kInvScale;
  if constexpr (kTerms != Terms::kNone) {
    out.lin = hsum(lin + lin1);
    out.asum = hsum(asum + asum1);
  }
  return out;
}

// ------------------------------------------------------------------------------------
// Pass 2: the gradient of one block, g_c = coef * exp(d_c) - k * (term_c) - [c == y] gst g_y
// ------------------------------------------------------------------------------------
// Streaming (non-temporal) stores write straight to memory: no read of each destination
// line first, and no eviction of what the cache holds. They need vector-aligned addresses:
// a row's lanes up to that alignment, and its tail, use plain stores.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kCanStream = true;
inline void stream_store(float* p, const Vectorized<float>& v) { _mm512_stream_ps(p, v); }
inline void stream_store(double* p, const Vectorized<double>& v) { _mm512_stream_pd(p, v); }
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
inline void stream_store(float* p, const Vectorized<float>& v) { _mm256_stream_ps(p, v); }
inline void stream_store(double* p, const Vectorized<double>& v) { _mm256_stream_pd(p, v); }
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
template <typename acc_t>
inline void stream_store(acc_t* p, const Vectorized<acc_t>& v) { v.store(p); }
inline void stream_fence() {}
#endif

// g - gst * g_y: the target column's extra term, rounded the same way wherever it is applied
// (after a plain store, or in a lane before a streaming one). In double an explicit fma: left
// as written, the compiler fuses it in some places and not in others. In float the product
// is rounded to float first, which leaves nothing to fuse.
template <typename acc_t>
inline acc_t minus_y_term(acc_t g, double gst, double g_y) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return std::fma(-gst, g_y, g);
  } else {
    return g - acc_t(gst * g_y);
  }
}

// kFromX: exp(d_c) = exp((x_c - m) t) recomputed from x (src = x); else read (src = e).
// kStream: y_local, the target's column within this block or -1, whose gradient also loses
// gst * g_y (minus_y_term; in the register where its vector is streamed: a streamed line is
// not read back). The plain path's caller applies it after the store.
// g may be x itself: each vector of x is loaded before the same vector of g is stored.
template <typename acc_t, Terms kTerms, bool kFromX, bool kStream>
void pass2_block(const acc_t* src, const acc_t* w, const acc_t* q, int64_t n,
                 const RowExp<acc_t>& rexp_in, acc_t coef, acc_t k, acc_t one_m_eps,
                 acc_t eps_c, int64_t y_local,
                 double gst, double g_y, acc_t* g) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec cv(coef), nkv(-k);
  const RowExp<acc_t> rexp = rexp_in;  // a local copy, as in pass1_block
  // Every multiply-add is an explicit fmadd and nothing is left for the compiler to fuse:
  // it may fuse a written a * b + c in one inlined copy of this lambda and not in another,
  // and then a streamed row (aligned head, other vector boundaries) would differ in the
  // last bit from the same row stored plainly.
  auto value = [&](int64_t i, int64_t count) {
    Vec ex;
    if constexpr (kFromX) {
      Vec unused;
      ex = rexp.eval(Vec::loadu(src + i, count), unused);
    } else {
      ex = Vec::loadu(src + i, count);
    }
    Vec out = cv * ex;
    if constexpr (kTerms == Terms::kWeight) {
      out = at::vec::fmadd(nkv, Vec::loadu(w + i, count), out);
    } else if constexpr (kTerms == Terms::kProb) {
      const Vec qq = at::vec::fmadd(Vec::loadu(q + i, count), Vec(one_m_eps), Vec(eps_c));
      out = at::vec::fmadd(nkv * Vec::loadu(w + i, count), qq, out);
    }
    return out;
  };
  int64_t i = 0;
  if constexpr (kStream) {
    constexpr int64_t kAlign = V * int64_t(sizeof(acc_t));
    const int64_t off = int64_t(reinterpret_cast<uintptr_t>(g) % kAlign) / int64_t(sizeof(acc_t));
    const int64_t head = std::min(n, off == 0 ? int64_t(0) : V - off);
    if (head > 0) value(0, head).store(g, head);
    for (i = head; i + V <= n; i += V) {
      Vec out = value(i, V);
      if (y_local >= i && y_local < i + V) {  // the same subtraction as below, in a lane
        alignas(64) acc_t lanes[V];
        out.store(lanes);
        lanes[y_local - i] = minus_y_term(lanes[y_local - i], gst, g_y);
        out = Vec::loadu(lanes);
      }
      stream_store(g + i, out);
    }
    if (i < n) value(i, n - i).store(g + i, n - i);
    if (y_local >= 0 && (y_local < head || y_local >= i)) {
      g[y_local] = minus_y_term(g[y_local], gst, g_y);
    }
  } else {
    auto step = [&](int64_t j, int64_t count) { value(j, count).store(g + j, count); };
    for (; i + V <= n; i += V) step(i, V);
    if (i < n) step(i, n - i);
  }
}

// ------------------------------------------------------------------------------------
// One row
// ------------------------------------------------------------------------------------
struct RowOut {
  double loss, lse, zdot;
};

template <typename scalar_t, typename acc_t>
class RowKernel {
 public:
  RowKernel(const Params<acc_t>& p, Scratch<acc_t>& sc) : p_(p), sc_(sc) {}

  // x, g: (C,) row of the logits and of the gradient (g may be x; may be null without grad).
  // q: (C,) probability target row or null; y: index target (unused for probabilities).
  // next: the logits of the row this thread computes next, to prefetch; or null.
  RowOut run(const scalar_t* x, const scalar_t* q, int64_t y, acc_t t, acc_t gscale,
             scalar_t* g, const scalar_t* next) {
    next_ = next;
    const bool ignored = !p_.prob && y == p_.ignore_index;
    if (ignored) return dispatch<Terms::kNone>(x, q, y, t, gscale, g, true);
    if (p_.prob) return dispatch<Terms::kProb>(x, q, y, t, gscale, g, false);
    if (p_.eps > 0) return dispatch<Terms::kWeight>(x, q, y, t, gscale, g, false);
    return dispatch<Terms::kNone>(x, q, y, t, gscale, g, false);
  }

 private:
  template <Terms kTerms>
  RowOut dispatch(const scalar_t* x, const scalar_t* q, int64_t y, acc_t t, acc_t gscale,
                  scalar_t* g, bool ignored) {
    // Streaming and the guessed shift are instantiations of their own: a run-time choice
    // inside the row's code made rows of C = 10-100 8-19% slower (1 thread) for streaming,
    // and C = 10 9% slower for the guess, whether taken or not.
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (keeps_exp(p_.C) && p_.C >= kGuessMinCols) {
        return dispatch_stream<kTerms, true>(x, q, y, t, gscale, g, ignored);
      }
    }
    return dispatch_stream<kTerms, false>(x, q, y, t, gscale, g, ignored);
  }

  template <Terms kTerms, bool kGuess>
  C10_ALWAYS_INLINE RowOut dispatch_stream(const scalar_t* x, const scalar_t* q, int64_t y,
                                           acc_t t, acc_t gscale, scalar_t* g, bool ignored) {
    if (p_.grad && !ignored) {
      if (kCanStream && std::is_same_v<scalar_t, acc_t> && p_.stream && keeps_exp(p_.C)) {
        return finite_row<true, kTerms, true, kGuess>(x, q, y, t, gscale, g, ignored);
      }
      return finite_row<true, kTerms, false, kGuess>(x, q, y, t, gscale, g, ignored);
    }
    return finite_row<false, kTerms, false, kGuess>(x, q, y, t, gscale, g, ignored);
  }

  // Inlined into the row loop: as a call it cost ~8 ns a row at C = 10 (1 thread).
  // kGrad: zdot or the gradient (pass 2's machinery; zdot where p_.zdot).
  // kStream: pass 2 stores the gradient with streaming stores (one-block fp32 / fp64 rows).
  // kGuess: pass 1 starts from guess_shift (one-block fp32 / fp64 rows of kGuessMinCols or
  // more).
  template <bool kGrad, Terms kTerms, bool kStream, bool kGuess>
  C10_ALWAYS_INLINE RowOut finite_row(const scalar_t* x, const scalar_t* q, int64_t y,
                                      acc_t t, acc_t gscale, scalar_t* g, bool ignored) {
    const int64_t C = p_.C, B = kConfig.block_cols;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

    // ---- 0. the shift m: the row's max, or for a one-block fp32 / fp64 row a guess ------
    // x[y] before pass 1, which may write exponentials over x (the in-place gradient).
    const bool has_y = !p_.prob && !ignored;
    const acc_t x_y = has_y ? static_cast<acc_t>(x[y]) : acc_t(0);
    acc_t m = ninf;
    const acc_t* staged = nullptr;  // the last block as acc_t: a one-block row's whole row
    bool guessed = false;
    if constexpr (kGuess) {
      m = guess_shift(x, C, has_y ? x_y : ninf);
      staged = x;
      guessed = std::isfinite(m);
    }
    if (!guessed) {
      // A one-block row's block is read again by pass 1 while in L1; a wider row is read
      // once more (from L2).
      m = ninf;
      for (int64_t c0 = 0; c0 < C; c0 += B) {
        const int64_t n = std::min(B, C - c0);
        staged = as_acc(x + c0, n, sc_.xs);
        m = nan_max(m, block_max(staged, n));
      }
      // NaN, +inf, or every logit -inf: the exact path, before anything is written.
      if (!std::isfinite(m)) return exact_row(x, q, y, t, gscale, g, ignored);
    }

    // ---- 1. sums relative to m, block by block ---------------------------------------
    const ExpStore store = kGrad ? exp_store(g) : ExpStore::kNone;
    if (t != per_t_of_) {  // rows mostly share one t: its constants once (a division)
      per_t_ = RowExp<acc_t>::per(t);
      per_t_of_ = t;
    }
    Sums sums;
    for (;;) {
      const RowExp<acc_t> rexp(m, per_t_);
      for (int64_t c0 = 0; c0 < C; c0 += B) {
        const int64_t n = std::min(B, C - c0);
        const acc_t* xb = C <= B ? staged : as_acc(x + c0, n, sc_.xs);
        const acc_t* qb = nullptr;
        if constexpr (kTerms == Terms::kProb) qb = as_acc(q + c0, n, sc_.qs);
        acc_t* eb = nullptr;
        if (store == ExpStore::kScratch) {
          eb = sc_.e.data();
        } else if (store == ExpStore::kGradRow) {
          if constexpr (std::is_same_v<scalar_t, acc_t>) eb = g + c0;
        }
        const auto* pf = next_ != nullptr ? reinterpret_cast<const char*>(next_ + c0) : nullptr;
        sums.add(pass1_block<acc_t, kGrad, kTerms>(xb, p_.w + c0, qb, n, m, t, rexp, p_.zdot,
                                                   p_.one_m_eps, p_.eps_c, eb, pf,
                                                   sizeof(scalar_t)));
      }
      if (!kGuess || !guessed || guess_holds<kTerms>(sums, y, ignored, gscale, t)) break;
      // The guess was too far below the max (or the row holds a NaN or an infinity): the
      // max, and pass 1 again. (The exponentials went to the scratch row: x is intact.)
      guessed = false;
      m = block_max(staged, C);
      if (!std::isfinite(m)) return exact_row(x, q, y, t, gscale, g, ignored);
      sums = Sums();
    }
    const RowExp<acc_t> rexp(m, per_t_);

    const double log_s = std::log(sums.s);
    RowOut out{0.0, log_s + double(m) * double(t), 0.0};
    if (ignored) {
      // loss 0; dloss/dz = p * 0 - 0 = 0, so zdot 0 and a zero gradient.
      if (g != nullptr) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * C);
      return out;
    }

    // ---- loss, and A (the coefficient of p_c in dloss/dz_c) ---------------------------
    // index:  loss = (1-eps) w_y (log s - d_y) + eps/C (W log s - sum w d),
    //         A = (1-eps) w_y + eps/C W
    // prob:   loss = S log s - sum w q' d,  A = S = sum w q'
    const double A = p_coefficient<kTerms>(sums, y);
    double zdot_rest;  // zdot = A * sed / s - zdot_rest
    int64_t y_fix = -1;
    double g_y_fix = 0;
    if constexpr (kTerms == Terms::kProb) {
      out.loss = sums.asum * log_s - sums.lin;
      zdot_rest = sums.lin;
    } else {
      const double c_y = double(p_.one_m_eps) * double(p_.w[y]);  // (1-eps) w_y
      const acc_t d_y = (x_y - m) * t;                          // same rounding as reference
      // (the term is 0 when c_y is, even for d_y = -inf, as the reference's where(dz == 0))
      const double cd_y = c_y == 0 ? 0.0 : c_y * double(d_y);
      out.loss = c_y == 0 ? 0.0 : c_y * (log_s - double(d_y));
      zdot_rest = cd_y;
      if constexpr (kTerms == Terms::kWeight) {
        const double ec = p_.eps_c;
        out.loss += ec * (p_.W * log_s - sums.lin);
        zdot_rest += ec * sums.lin;
      }
      y_fix = y;
      g_y_fix = c_y;
    }
    if constexpr (!kGrad) return out;

    // zdot = sum_c dloss/dz_c d_c, with dloss/dz_c = p_c A - (the p-free part):
    //      = A sed / s - [(1-eps) w_y d_y + eps/C sum w d]   (index)
    //      = S sed / s - sum w q' d                          (prob)
    if (p_.zdot) out.zdot = A * sums.sed / sums.s - zdot_rest;
    if (g == nullptr) return out;  // grad_mode zdot: no gradient to write

    // ---- 2. gradient ------------------------------------------------------------------
    // p_c = exp(d_c) / s, and with gst = grad_scale t:
    //   index:  g_c = gst (p_c A - eps/C w_c) - [c == y] gst (1-eps) w_y
    //   prob:   g_c = gst (p_c S - w_c q'_c)
    const double gst = double(gscale) * double(t);
    const acc_t k = kTerms == Terms::kProb ? acc_t(gst) : acc_t(gst * double(p_.eps_c));
    const acc_t coef = acc_t(gst * A / sums.s);
    for (int64_t c0 = 0; c0 < C; c0 += B) {
      const int64_t n = std::min(B, C - c0);
      const acc_t* qb = nullptr;
      if constexpr (kTerms == Terms::kProb) qb = as_acc(q + c0, n, sc_.qs);
      acc_t* gb;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        gb = g + c0;
      } else {
        gb = sc_.gs.data();
      }
      if constexpr (kStream) {
        // dispatch chose this only for one-block rows (exponentials in the scratch row)
        // whose gradient is the destination itself (not a half-precision staging row).
        const int64_t y_local = y_fix >= c0 && y_fix < c0 + n ? y_fix - c0 : -1;
        pass2_block<acc_t, kTerms, false, true>(sc_.e.data() + c0, p_.w + c0, qb, n, rexp,
                                                coef, k, p_.one_m_eps, p_.eps_c, y_local,
                                                gst, double(g_y_fix), gb);
      } else {
        if (store == ExpStore::kScratch) {
          pass2_block<acc_t, kTerms, false, false>(sc_.e.data() + c0, p_.w + c0, qb, n, rexp,
                                                   coef, k, p_.one_m_eps, p_.eps_c, -1, 0, 0, gb);
        } else if (store == ExpStore::kGradRow) {
          pass2_block<acc_t, kTerms, false, false>(gb, p_.w + c0, qb, n, rexp, coef, k,
                                                   p_.one_m_eps, p_.eps_c, -1, 0, 0, gb);
        } else {
          pass2_block<acc_t, kTerms, true, false>(as_acc(x + c0, n, sc_.xs), p_.w + c0, qb,
                                                  n, rexp, coef, k, p_.one_m_eps, p_.eps_c,
                                                  -1, 0, 0, gb);
        }
        if (y_fix >= c0 && y_fix < c0 + n) {
          gb[y_fix - c0] = minus_y_term(gb[y_fix - c0], gst, double(g_y_fix));
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(gb, g + c0, n);
    }
    return out;
  }

  // A, the coefficient of p_c in dloss/dz_c (a row that is not ignored):
  //   index: (1-eps) w_y + eps/C W;   prob: S = sum_c w_c q'_c
  template <Terms kTerms>
  double p_coefficient(const Sums& sums, int64_t y) const {
    if constexpr (kTerms == Terms::kProb) {
      return sums.asum;
    } else {
      double A = double(p_.one_m_eps) * double(p_.w[y]);
      if constexpr (kTerms == Terms::kWeight) A += double(p_.eps_c) * p_.W;
      return A;
    }
  }

  // A guessed shift for a one-block row: the larger of the first vector's max and x_y (-inf
  // for none), each a logit of the row, so at most its max. Not finite: no guess.
  //
  // Why guess: pass 0 reads the whole row for its max before pass 1 can start; with the
  // guess, rows took 0.86x the time at 512 x 1000 (1 thread) and 0.92x at 4096 x 1000 (2
  // threads). Any shift gives the same sums in exact arithmetic; what the max buys is
  // range: with m below the max every exponential is larger, so s >= 1 as before, and
  // guess_holds bounds s from above. x_y is the max of a confidently classified row, and
  // then the guess is the max itself.
  // Narrower rows keep pass 0, which costs them little next to a row's fixed costs; the
  // guess as a run-time branch in their code made rows of C = 10 1.3x as long, C = 64 1.1x.
  static constexpr int64_t kGuessMinCols = 256;
  static acc_t guess_shift(const acc_t* x, int64_t C, acc_t x_y) {
    using Vec = Vectorized<acc_t>;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const acc_t first = hmax_finite(load_fill(x, std::min<int64_t>(C, Vec::size()), ninf));
    return x_y > first ? x_y : first;  // a NaN x_y is not taken
  }

  // Whether pass 1's sums from a guessed shift serve: s at most kGuessMaxSum (with the max,
  // s <= C; a NaN or an infinity in the row makes s NaN or inf, and fails here too), and
  // the gradient's coefficient gst A / s no less normal than with s = 1. (The bound keeps m
  // within ln(2^20) / t ~ 13.9 / t of the max, so the exponentials span the range they had,
  // 20 binades up. The coefficient is checked whether or not a gradient is written, so
  // that every grad mode takes the same shift, and gives the same loss to the bit.)
  template <Terms kTerms>
  bool guess_holds(const Sums& sums, int64_t y, bool ignored, acc_t gscale, acc_t t) const {
    static constexpr double kGuessMaxSum = 1 << 20;
    if (!(sums.s <= kGuessMaxSum)) return false;
    if (ignored) return true;
    const double tiny = std::numeric_limits<acc_t>::min();
    const double num = std::abs(double(gscale) * double(t) * p_coefficient<kTerms>(sums, y));
    return !(num / sums.s < tiny) || num < tiny;
  }

  // Where this row's pass 1 keeps its exponentials (g: the row's gradient, or null).  The
  // gradient row serves when it holds acc_t values, x itself included: once pass 0 has
  // found the row finite, pass 1 is the last to read x.
  ExpStore exp_store(const scalar_t* g) const {
    if (g == nullptr) return ExpStore::kNone;
    if (keeps_exp(p_.C)) return ExpStore::kScratch;
    return std::is_same_v<scalar_t, acc_t> ? ExpStore::kGradRow : ExpStore::kNone;
  }

  // A row whose max is NaN, +inf or -inf: scalar, the reference's formulas one by one
  // (shift 0, torch.logsumexp's handling of infinite maxima), in acc_t.
  RowOut exact_row(const scalar_t* x, const scalar_t* q, int64_t y, acc_t t, acc_t gscale,
                   scalar_t* g, bool ignored) {
    const int64_t C = p_.C;
    const acc_t* w = p_.w;
    auto d_at = [&](int64_t c) { return static_cast<acc_t>(x[c]) * t; };
    auto q_at = [&](int64_t c) {
      return static_cast<acc_t>(q[c]) * p_.one_m_eps + p_.eps_c;
    };
    acc_t dmax = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < C; ++c) dmax = nan_max(dmax, d_at(c));
    const acc_t shift = std::isinf(dmax) ? acc_t(0) : dmax;   // torch.logsumexp's rule
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(d_at(c) - shift);
    const acc_t log_s = std::log(s) + shift;
    RowOut out{0.0, double(log_s), 0.0};

    acc_t A = 0, c_y = 0;
    if (p_.prob) {
      acc_t loss = 0, S = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t a = w[c] * q_at(c);
        loss += a * (log_s - d_at(c));
        S += a;
      }
      out.loss = loss;
      A = S;
    } else if (!ignored) {
      c_y = p_.one_m_eps * w[y];
      acc_t loss = c_y * (log_s - d_at(y));
      if (p_.eps > 0) {
        acc_t smooth = 0;
        for (int64_t c = 0; c < C; ++c) smooth += w[c] * (log_s - d_at(c));
        loss += p_.eps_c * smooth;
      }
      out.loss = loss;
      A = c_y + p_.eps_c * acc_t(p_.W);
    }
    if (!p_.grad) return out;

    const acc_t gst = gscale * t;
    acc_t zdot = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = d_at(c);                  // read before g[c] (maybe x[c]) is written
      const acc_t p = std::exp(-(log_s - d));
      acc_t minus;
      if (p_.prob) {
        minus = w[c] * q_at(c);
      } else {
        minus = ignored ? acc_t(0) : (c == y ? c_y : acc_t(0)) + p_.eps_c * w[c];
      }
      const acc_t dz = p * A - minus;
      if (dz != 0) zdot += dz * d;
      if (g != nullptr) g[c] = static_cast<scalar_t>(dz * gst);
    }
    out.zdot = zdot;
    return out;
  }

  const Params<acc_t>& p_;
  Scratch<acc_t>& sc_;
  const scalar_t* next_ = nullptr;  // run()'s next
  acc_t per_t_of_ = std::numeric_limits<acc_t>::quiet_NaN();  // the t of per_t_ (NaN: none)
  typename RowExp<acc_t>::PerT per_t_{};
};

// ------------------------------------------------------------------------------------
// Argument checks
// ------------------------------------------------------------------------------------
void check_row_vector(const at::Tensor& v, const char* name, int64_t M, at::ScalarType acc) {
  TORCH_CHECK(v.device().is_cpu(), "ce_rows: ", name, " must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && (v.size(0) == 1 || v.size(0) == M), "ce_rows: ", name,
              " must have shape (", M, ",) or (1,), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, "ce_rows: ", name, " must have dtype ", acc,
              " (the accumulation dtype of x), got ", v.scalar_type());
}

// The reduction's denominator over index targets (mean): the summed weight of the rows that
// are not ignored -- PyTorch's rule, label smoothing included -- counted in double while the
// targets are checked, so no target is used as an index before it is known to be in range.
double check_index_targets(const at::Tensor& target, int64_t C, int64_t ignore_index,
                           const float* w32, const double* w64) {
  const int64_t* y = target.data_ptr<int64_t>();
  double denom = 0;
  for (int64_t i = 0, M = target.numel(); i < M; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < C, "ce_rows: target ", y[i], " at row ", i,
                      " is out of bounds for ", C, " classes (expected 0 <= target < ", C,
                      " or target == ignore_index = ", ignore_index, ")");
    denom += w32 ? double(w32[y[i]]) : w64 ? w64[y[i]] : 1.0;
  }
  return denom;
}

// ------------------------------------------------------------------------------------
// The op
// ------------------------------------------------------------------------------------
template <typename scalar_t>
void ce_rows_impl(const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
                  const at::Tensor& weight, int64_t ignore_index, double label_smoothing,
                  const at::Tensor& grad_scale, int64_t grad_mode, at::Tensor& grad,
                  at::Tensor& loss, at::Tensor& lse, at::Tensor& zdot) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), C = x.size(1);

  Params<acc_t> p;
  p.C = C;
  p.eps = acc_t(label_smoothing);
  p.eps_c = acc_t(label_smoothing / double(C));
  p.one_m_eps = acc_t(1.0 - label_smoothing);
  p.ignore_index = ignore_index;
  p.prob = target.is_floating_point();
  p.grad = grad_mode != kGradNone;
  p.zdot = has_zdot(grad_mode);
  const bool write = writes_grad(grad_mode);
  p.stream = write && M * C * int64_t(sizeof(scalar_t)) >= kConfig.stream_min_bytes;
  p.w = weight.data_ptr<acc_t>();
  double W = 0;
  for (int64_t c = 0; c < C; ++c) W += p.w[c];
  p.W = W;

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* qp = p.prob ? target.data_ptr<scalar_t>() : nullptr;
  const int64_t* yp = p.prob ? nullptr : target.data_ptr<int64_t>();
  const acc_t* tp = inv_t.data_ptr<acc_t>();
  const acc_t* gsp = grad_scale.data_ptr<acc_t>();
  const bool t_rows = inv_t.numel() == M && M != 1, gs_rows = grad_scale.numel() == M && M != 1;
  scalar_t* gp = write ? grad.data_ptr<scalar_t>() : nullptr;
  acc_t* lossp = loss.data_ptr<acc_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  acc_t* zdotp = p.zdot ? zdot.data_ptr<acc_t>() : nullptr;
  constexpr bool staged = !std::is_same_v<scalar_t, acc_t>;

  at::parallel_for(0, M, grain_rows(C), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(C, write, staged);
    RowKernel<scalar_t, acc_t> kernel(p, scratch);
    for (int64_t i = begin; i < end; ++i) {
      const RowOut r = kernel.run(xp + i * C, qp ? qp + i * C : nullptr, yp ? yp[i] : 0,
                                  tp[t_rows ? i : 0], gsp[gs_rows ? i : 0],
                                  gp ? gp + i * C : nullptr,
                                  i + 1 < end ? xp + (i + 1) * C : nullptr);
      lossp[i] = acc_t(r.loss);
      lsep[i] = acc_t(r.lse);
      if (zdotp) zdotp[i] = acc_t(r.zdot);
    }
    // Streaming stores are weakly ordered: complete them before any thread reads the
    // gradient.
    if (p.stream) stream_fence();
  });
}

// ce_rows' arguments, checked: everything a direct call could get wrong, before any row is
// read. `denom` is the mean's denominator over index targets (check_index_targets).
struct CeCall {
  at::Tensor target, weight, inv_t;
  std::optional<at::Tensor> grad_out;  // set: the gradient goes there
  at::ScalarType acc;
  double denom = 0;
};

CeCall check_ce_args(const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
                     const std::optional<at::Tensor>& weight, int64_t ignore_index,
                     double label_smoothing, int64_t grad_mode,
                     const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK(x.device().is_cpu(), "ce_rows (CPU): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "ce_rows: x must be 2-D (rows, classes), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "ce_rows: x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.is_contiguous(), "ce_rows: x must be contiguous (strides ", x.strides(), ")");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(C >= 1, "ce_rows: x must have at least one class, got shape ", x.sizes());
  CeCall call;
  call.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "ce_rows: label_smoothing must be in [0, 1], got ", label_smoothing);

  TORCH_CHECK(target.device().is_cpu(), "ce_rows: target must be a CPU tensor, got ",
              target.device());
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == x.sizes(), "ce_rows: probability target must have the shape ",
                "of x ", x.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == dt, "ce_rows: probability target must have the dtype ",
                "of x (", dt, "), got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, "ce_rows: index target must be int64, got ",
                target.scalar_type());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == M, "ce_rows: index target must have ",
                "shape (", M, ",), got ", target.sizes());
  }
  call.target = target.contiguous();
  check_row_vector(inv_t, "inv_t", M, call.acc);
  call.inv_t = inv_t.contiguous();
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->device().is_cpu(), "ce_rows: weight must be a CPU tensor, got ",
                weight->device());
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C, "ce_rows: weight must have shape (",
                C, ",), got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == call.acc, "ce_rows: weight must have dtype ", call.acc,
                " (the accumulation dtype of x), got ", weight->scalar_type());
    call.weight = weight->contiguous();
  }
  if (!target.is_floating_point()) {
    const bool w = call.weight.defined(), f32 = call.acc == at::kFloat;
    call.denom = check_index_targets(call.target, C, ignore_index,
                                     w && f32 ? call.weight.data_ptr<float>() : nullptr,
                                     w && !f32 ? call.weight.data_ptr<double>() : nullptr);
  }
  if (!call.weight.defined()) call.weight = at::ones({C}, x.options().dtype(call.acc));
  if (writes_grad(grad_mode) && grad_out.has_value() && grad_out->defined()) {
    TORCH_CHECK(grad_out->device().is_cpu(), "ce_rows: grad_out must be a CPU tensor, got ",
                grad_out->device());
    TORCH_CHECK(grad_out->sizes() == x.sizes(), "ce_rows: grad_out must have the shape of x ",
                x.sizes(), ", got ", grad_out->sizes());
    TORCH_CHECK(grad_out->scalar_type() == dt, "ce_rows: grad_out must have the dtype of x (",
                dt, "), got ", grad_out->scalar_type());
    TORCH_CHECK(grad_out->is_contiguous(), "ce_rows: grad_out must be contiguous (strides ",
                grad_out->strides(), ")");
    // x itself (the in-place gradient) or memory apart from it: rows are read after other
    // rows' gradients are written.
    TORCH_CHECK(at::get_overlap_status(*grad_out, x) != at::MemOverlapStatus::Partial,
                "ce_rows: grad_out must be x itself or not overlap it");
    call.grad_out = grad_out;
  }
  return call;
}

// The kernel over every row of a checked call: (loss per row, lse, grad, zdot).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_ce(
    const at::Tensor& x, const CeCall& call, int64_t ignore_index, double label_smoothing,
    const at::Tensor& grad_scale, int64_t grad_mode) {
  const int64_t M = x.size(0), C = x.size(1);
  check_row_vector(grad_scale, "grad_scale", M, call.acc);
  const bool write = writes_grad(grad_mode);
  const auto acc_opts = x.options().dtype(call.acc);
  at::Tensor loss = at::empty({M}, acc_opts), lse = at::empty({M}, acc_opts);
  at::Tensor zdot = at::empty({has_zdot(grad_mode) ? M : 0}, acc_opts);
  at::Tensor grad = write && !call.grad_out ? cpu::empty_grad({M, C}, x.scalar_type())
                                            : at::empty({0}, x.options());
  at::Tensor grad_target = call.grad_out ? *call.grad_out : grad;
  const at::Tensor gs = grad_scale.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "tempsoft_ce_rows_cpu", [&] {
    ce_rows_impl<scalar_t>(x, call.target, call.inv_t, call.weight, ignore_index,
                           label_smoothing, gs, grad_mode, grad_target, loss, lse, zdot);
  });
  return {loss, lse, grad, zdot};
}

// The reductions of tempsoft/ops/cross_entropy.py (_REDUCTIONS).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// ce_forward for any mode of GradMode, kGradNoZdot included.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction, int64_t grad_mode, const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "ce_forward: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  const CeCall call = check_ce_args(x, target, inv_t, weight, ignore_index, label_smoothing,
                                    grad_mode, grad_out);
  const int64_t M = x.size(0);
  // Mean over index targets: the summed weight of the rows not ignored; over probability
  // targets: the number of rows. All rows ignored gives 0, so the loss is 0/0 = NaN and the
  // gradient zero, as in PyTorch (a NaN weight keeps both NaN).
  double denom = 1;
  if (reduction == kMean) denom = target.is_floating_point() ? double(M) : call.denom;
  const double scale = denom == 0 ? 0.0 : 1.0 / denom;
  const auto acc_opts = x.options().dtype(call.acc);
  at::Tensor scale_t = at::full({1}, scale, acc_opts);
  auto [rows, lse, grad, zdot] = run_ce(x, call, ignore_index, label_smoothing, scale_t,
                                        grad_mode);
  if (reduction == kNone) return {rows, lse, grad, zdot, scale_t};
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "tempsoft_ce_reduce", [&] {
    const scalar_t* r = rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M; ++i) total += double(r[i]);
  });
  const double value = reduction == kSum ? total : total / denom;
  return {at::scalar_tensor(value, acc_opts), lse, grad, zdot, scale_t};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu::ce_rows(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    const at::Tensor& grad_scale, int64_t grad_mode, const std::optional<at::Tensor>& grad_out) {
  check_grad_mode(grad_mode);
  const CeCall call = check_ce_args(x, target, inv_t, weight, ignore_index, label_smoothing,
                                    grad_mode, grad_out);
  return run_ce(x, call, ignore_index, label_smoothing, grad_scale, grad_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu::ce_forward(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction, int64_t grad_mode, const std::optional<at::Tensor>& grad_out) {
  check_grad_mode(grad_mode);
  return forward(x, target, inv_t, weight, ignore_index, label_smoothing, reduction,
                 grad_mode, grad_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu::ce_forward_no_zdot(
    const at::Tensor& x, const at::Tensor& target, const at::Tensor& inv_t,
    const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    int64_t reduction) {
  return forward(x, target, inv_t, weight, ignore_index, label_smoothing, reduction,
                 kGradNoZdot, std::nullopt);
}

}  // namespace tempsoft
