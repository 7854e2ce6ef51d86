// Fused temperature cross-entropy on CUDA: one kernel reads each row of logits once and
// writes its loss, logsumexp, gradient and zdot. Contract (shapes, dtypes, math):
// tempsoft/kernels/reference.py, ce_rows. Raw pointers only; bindings.cpp adapts tensors.
//
// Notation for one row: x the logits, it = 1/T, key_c = sign(it) x_c (so that the shifted
// logits d_c = (key_c - max key) |it| = (x_c - max x) it when it > 0, always <= 0),
// w the class weights (1 when absent), eps the label smoothing, C the number of classes.
//
//   1. statistics pass: m = max_c key_c and s = sum_c 2^((key_c - m) |it| log2 e), online
//      (s is rescaled whenever m grows); plus aux = sum_c w_c q'_c (probability targets,
//      "S") or sum_c w_c (weighted index targets with smoothing, "W").
//      Then ln s = logsumexp(d), lse = ln s + m |it|, p_c = 2^(d_c log2 e - log2 s).
//   2. gradient pass, with the row still on chip (or re-read from L2):
//        index target y:  dz_c = p_c A - [(1-eps) w_y [c == y] + eps/C w_c],
//                         A = (1-eps) w_y + eps/C W           (A = 0 for ignored rows)
//        prob target q:   q'_c = (1-eps) q_c + eps/C,  dz_c = p_c S - w_c q'_c
//      grad_c = dz_c * it * grad_scale (written in the input dtype), zdot = sum dz_c d_c,
//      and sud = sum_c u_c d_c (u = w eps/C or w q') for the smoothing / soft-target loss.
//   loss: index (1-eps) w_y (ln s - d_y) + eps/C (W ln s - sum w_c d_c);  prob S ln s - sud.
//
// Where the row lives between the passes (CeMode, chosen in ce_choose_plan):
//   kWarp  one warp per row (rows up to kWarpRowBytes); the second pass hits L1.
//   kSmem  a block per row, or on sm_90 a cluster of up to 8 blocks that split the row and
//          exchange their partial statistics through distributed shared memory; each block
//          keeps its chunk in shared memory, so HBM sees one read and one write per element.
//   kL2    as kSmem but the chunk is too large for shared memory: the second pass re-reads
//          it (the first pass leaves it in L2; the gradient is stored with evict-first hints).
// A target outside [0, C) (other than ignore_index) is never dereferenced: its row gets a
// NaN loss and a zero gradient, and the first such value is reported through ErrorSink.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "common.cuh"
#include "launch.h"

namespace tempsoft {
namespace cuda {
namespace {

using detail::cluster_peer;
using detail::cluster_sync;
using detail::DeviceInfo;

// ---- tuning constants (the heuristic that uses them is ce_choose_plan, below) ------------
constexpr int kUnroll = 4;                    // 16-byte global loads in flight per thread
constexpr int kUnrollSmem = 2;                // shared-memory reads need less latency hiding
constexpr int64_t kWarpRowBytes = 4096;       // rows up to this size: one warp per row
constexpr int64_t kSmemChunkBytes = 64 << 10; // cached chunk that lets 3 blocks share an SM
constexpr int kSmemReserve = 2048;            // static shared memory + slack per block
constexpr int kMaxCluster = 8;                // portable cluster size limit
constexpr int kRowsPerWarpBlock = 8;          // warp mode: 256 threads = 8 rows per block
constexpr unsigned kFull = 0xffffffffu;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// ---- element codecs: 16 bytes <-> kN accumulator values ----------------------------------
template <typename T> struct Codec;

template <> struct Codec<float> {
  static constexpr int kN = 4;
  __device__ static void unpack(const uint4& r, float (&o)[4]) {
    o[0] = __uint_as_float(r.x); o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z); o[3] = __uint_as_float(r.w);
  }
  __device__ static uint4 pack(const float (&v)[4]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  }
  __device__ static float load1(const float* p) { return *p; }
  __device__ static void store1(float* p, float v) { *p = v; }
};

template <> struct Codec<double> {
  static constexpr int kN = 2;
  __device__ static void unpack(const uint4& r, double (&o)[2]) {
    o[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    o[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  __device__ static uint4 pack(const double (&v)[2]) {
    return make_uint4(static_cast<unsigned>(__double2loint(v[0])),
                      static_cast<unsigned>(__double2hiint(v[0])),
                      static_cast<unsigned>(__double2loint(v[1])),
                      static_cast<unsigned>(__double2hiint(v[1])));
  }
  __device__ static double load1(const double* p) { return *p; }
  __device__ static void store1(double* p, double v) { *p = v; }
};

template <> struct Codec<__half> {
  static constexpr int kN = 8;
  __device__ static void unpack(const uint4& r, float (&o)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      __half2 h;
      memcpy(&h, &w[k], 4);
      const float2 f = __half22float2(h);
      o[2 * k] = f.x;
      o[2 * k + 1] = f.y;
    }
  }
  __device__ static uint4 pack(const float (&v)[8]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __half2 h = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
      memcpy(&w[k], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  __device__ static float load1(const __half* p) { return __half2float(*p); }
  __device__ static void store1(__half* p, float v) { *p = __float2half_rn(v); }
};

template <> struct Codec<__nv_bfloat16> {
  static constexpr int kN = 8;
  // bf16 is the top half of an fp32: widening is a shift, no conversion instruction.
  __device__ static void unpack(const uint4& r, float (&o)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      o[2 * k] = __uint_as_float(w[k] << 16);
      o[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  __device__ static uint4 pack(const float (&v)[8]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
      memcpy(&w[k], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  __device__ static float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// ---- math helpers -------------------------------------------------------------------------
// One MUFU instruction; relative error ~2^-22, far below the fp32 tolerance of the tests.
__device__ __forceinline__ float exp2_acc(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ double exp2_acc(double v) { return exp2(v); }
__device__ __forceinline__ float log2_acc(float v) { return log2f(v); }
__device__ __forceinline__ double log2_acc(double v) { return log2(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
// max that ignores a NaN operand (the running max must stay a number).
__device__ __forceinline__ float max_num(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_num(double a, double b) { return fmax(a, b); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// The shift the exponentials are taken against: the running max, or 0 when that is not
// finite (all -inf so far, or +inf), as the reference does with x_max.
template <typename A>
__device__ __forceinline__ A shift_of(A m) {
  return isfinite(m) ? m : A(0);
}

// s * 2^(dm * ait_l2), with an empty sum staying 0 (avoids 0 * inf when dm = +inf).
template <typename A>
__device__ __forceinline__ A rescale(A s, A dm, A ait_l2) {
  return s == A(0) ? A(0) : s * exp2_acc(dm * ait_l2);
}

// Partial statistics of a set of classes: max key m, s = sum 2^((key - shift(m)) ait_l2),
// and aux (S or W, see the top of the file).
template <typename A>
struct Stats {
  A m, s, aux;
};

template <typename A>
__device__ __forceinline__ Stats<A> stats_identity() {
  return {neg_inf<A>(), A(0), A(0)};
}

template <typename A>
__device__ __forceinline__ Stats<A> combine(const Stats<A>& a, const Stats<A>& b, A ait_l2) {
  const A m = a.m > b.m ? a.m : b.m;  // neither is NaN
  const A r = shift_of(m);
  return {m,
          rescale(a.s, shift_of(a.m) - r, ait_l2) + rescale(b.s, shift_of(b.m) - r, ait_l2),
          a.aux + b.aux};
}

// Adds kN keys to the running statistics: one rescale per vector (rarely taken, the max
// settles quickly), one exponential per element.
template <typename A, int kN>
__device__ __forceinline__ void absorb(Stats<A>& st, const A (&key)[kN], A ait_l2) {
  A vm = key[0];
#pragma unroll
  for (int j = 1; j < kN; ++j) vm = max_num(vm, key[j]);
  if (vm > st.m) {
    st.s = rescale(st.s, shift_of(st.m) - shift_of(vm), ait_l2);
    st.m = vm;
  }
  const A r = shift_of(st.m);
#pragma unroll
  for (int j = 0; j < kN; ++j) st.s += exp2_acc((key[j] - r) * ait_l2);
}

// Per-row sums of the gradient pass.
template <typename A>
struct Sums {
  A zdot, sud;
};

// ---- reductions ---------------------------------------------------------------------------
// Tree over the warp, then lane 0's value everywhere, so every thread uses bit-identical
// row statistics.
template <typename A>
__device__ __forceinline__ Stats<A> warp_combine(Stats<A> v, A ait_l2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Stats<A> u{__shfl_down_sync(kFull, v.m, o), __shfl_down_sync(kFull, v.s, o),
                     __shfl_down_sync(kFull, v.aux, o)};
    v = combine(v, u, ait_l2);
  }
  return {__shfl_sync(kFull, v.m, 0), __shfl_sync(kFull, v.s, 0), __shfl_sync(kFull, v.aux, 0)};
}

// Every warp combines the per-warp partials in the same order, so all threads end with the
// same value after a single barrier. `scratch` must not be reused afterwards in this block.
template <int kThreads, typename A>
__device__ __forceinline__ Stats<A> block_combine(Stats<A> v, A ait_l2, Stats<A>* scratch) {
  v = warp_combine(v, ait_l2);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  const Stats<A> w = lane < kWarps ? scratch[lane] : stats_identity<A>();
  return warp_combine(w, ait_l2);
}

// Sum over the warp; the result is valid in lane 0.
template <typename A>
__device__ __forceinline__ Sums<A> warp_sum(Sums<A> v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.zdot += __shfl_down_sync(kFull, v.zdot, o);
    v.sud += __shfl_down_sync(kFull, v.sud, o);
  }
  return v;
}

// Sum over the block; the result is valid in thread 0.
template <int kThreads, typename A>
__device__ __forceinline__ Sums<A> block_sum(Sums<A> v, Sums<A>* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  Sums<A> w{A(0), A(0)};
  if (warp == 0) {
    if (lane < kWarps) w = scratch[lane];
    w = warp_sum(w);
  }
  return w;
}

// ---- memory access ------------------------------------------------------------------------
// How the row is read. kPlain: default caching (warp mode: the second pass hits L1).
// kStream: read once, evict first (smem mode: the copy in shared memory serves pass 2).
// kKeepL2: skip L1, stay in L2 for the re-read (L2 mode, first pass); the re-read itself is
// kStream (the line's last use).
enum class Src : int { kPlain, kStream, kKeepL2 };

template <Src K>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (K == Src::kStream) return __ldcs(p);
  else if constexpr (K == Src::kKeepL2) return __ldcg(p);
  else return *p;
}

enum class Mode : int { kWarp, kSmem, kL2 };

// Per-launch geometry, identical for every row.
struct Geom {
  int cluster;     // blocks per row
  int cache_vecs;  // 16-byte vectors of a row chunk that shared memory holds (0: none)
};

// The shared-memory scratch a block-mode kernel needs besides the cached chunk.
template <typename A, int kThreads>
struct Scratch {
  Stats<A> red1[kThreads / 32];
  Sums<A> red2[kThreads / 32];
  Stats<A> peer1;  // this block's statistics, read by the other blocks of the cluster
  Sums<A> peer2;   // this block's sums, read by the cluster's rank 0
};

// One row (or, with a cluster, this block's chunk of one row). kGroup threads work on it:
// a warp (warp mode) or the whole block.
template <typename T, bool kProb, int kThreads, int kGroup, Mode kMode>
__device__ __forceinline__ void ce_row(const CeArgs& a, int64_t row, int rank, int cs, int gt,
                                       Scratch<typename AccOf<T>::type, kThreads>& sh,
                                       uint4* s_cache) {
  using A = typename AccOf<T>::type;
  using C = Codec<T>;
  constexpr int kN = C::kN;
  constexpr bool kWarpRows = kMode == Mode::kWarp;
  constexpr Src kSrc1 = kMode == Mode::kWarp ? Src::kPlain
                        : kMode == Mode::kSmem ? Src::kStream : Src::kKeepL2;
  constexpr Src kSrc2 = kMode == Mode::kWarp ? Src::kPlain : Src::kStream;

  // ---- row geometry: a scalar head up to the first 16-byte boundary, 16-byte vectors, a
  // scalar tail. The vectors are split into `cs` contiguous chunks, one per block. ----------
  const int ncols = static_cast<int>(a.cols);
  const T* xr = static_cast<const T*>(a.x) + row * a.cols;
  const int head_bytes = static_cast<int>((16 - (reinterpret_cast<uintptr_t>(xr) & 15)) & 15);
  const int head = min(ncols, head_bytes / static_cast<int>(sizeof(T)));
  const int nvec = (ncols - head) / kN;
  const int body_end = head + nvec * kN;
  const int nscalar = ncols - nvec * kN;  // head + tail, < 2 kN
  const int chunk = (nvec + cs - 1) / cs;
  const int vbeg = min(nvec, rank * chunk);
  const int vend = min(nvec, vbeg + chunk);
  const bool scalar_lane = rank == 0 && gt < nscalar;
  const int scalar_col = gt < head ? gt : body_end + (gt - head);
  const uint4* xv = reinterpret_cast<const uint4*>(xr + head);
  const T* qr = kProb ? static_cast<const T*>(a.target) + row * a.cols : nullptr;
  const uint4* qv = kProb ? reinterpret_cast<const uint4*>(qr + head) : nullptr;

  // ---- row scalars ---------------------------------------------------------------------
  const A it = static_cast<const A*>(a.inv_t)[row * a.inv_t_stride];
  const A sgn = it < A(0) ? A(-1) : A(1);
  const A ait = it * sgn;
  const A ait_l2 = ait * A(1.4426950408889634);  // |it| log2(e)
  const A one_m_eps = static_cast<A>(1.0 - a.label_smoothing);
  const A eps_c = static_cast<A>(a.label_smoothing / static_cast<double>(a.cols));
  const A* w = static_cast<const A*>(a.weight);

  int64_t y = -1;
  bool valid = true, bad = false;
  if constexpr (!kProb) {
    y = static_cast<const int64_t*>(a.target)[row];
    valid = y != a.ignore_index;
    bad = valid && (y < 0 || y >= a.cols);
    valid = valid && !bad;
  }
  const bool writer = rank == 0 && gt == 0;
  A key_y = A(0);
  if (!kProb && valid && writer) key_y = sgn * C::load1(xr + y);  // y is in range here
  const bool sum_w = !kProb && w != nullptr && valid && a.label_smoothing != 0.0;

  // ---- 1. statistics pass ---------------------------------------------------------------
  Stats<A> st = stats_identity<A>();
  auto absorb_vec = [&](const uint4& raw, const uint4& qraw, int col0) {
    A v[kN];
    C::unpack(raw, v);
#pragma unroll
    for (int j = 0; j < kN; ++j) v[j] *= sgn;
    absorb(st, v, ait_l2);
    if constexpr (kProb) {
      A q[kN];
      C::unpack(qraw, q);
#pragma unroll
      for (int j = 0; j < kN; ++j)
        st.aux += (w ? w[col0 + j] : A(1)) * (q[j] * one_m_eps + eps_c);
    } else if (sum_w) {
#pragma unroll
      for (int j = 0; j < kN; ++j) st.aux += w[col0 + j];
    }
  };
  {
    int v = vbeg + gt;
    for (; v + (kUnroll - 1) * kGroup < vend; v += kUnroll * kGroup) {
      uint4 raw[kUnroll], qraw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        raw[u] = load16<kSrc1>(xv + v + u * kGroup);
        qraw[u] = kProb ? load16<kSrc1>(qv + v + u * kGroup) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if constexpr (kMode == Mode::kSmem) s_cache[v + u * kGroup - vbeg] = raw[u];
        absorb_vec(raw[u], qraw[u], head + (v + u * kGroup) * kN);
      }
    }
    for (; v < vend; v += kGroup) {
      const uint4 raw = load16<kSrc1>(xv + v);
      const uint4 qraw = kProb ? load16<kSrc1>(qv + v) : make_uint4(0, 0, 0, 0);
      if constexpr (kMode == Mode::kSmem) s_cache[v - vbeg] = raw;
      absorb_vec(raw, qraw, head + v * kN);
    }
  }
  if (scalar_lane) {
    const int c = scalar_col;
    const A k1[1] = {sgn * C::load1(xr + c)};
    absorb(st, k1, ait_l2);
    if constexpr (kProb) {
      st.aux += (w ? w[c] : A(1)) * (C::load1(qr + c) * one_m_eps + eps_c);
    } else if (sum_w) {
      st.aux += w[c];
    }
  }

  // ---- reduce the statistics over the row ------------------------------------------------
  if constexpr (kWarpRows) {
    st = warp_combine(st, ait_l2);
    __syncwarp();  // orders the writer's early read of x[y] before any lane's gradient store
  } else {
    st = block_combine<kThreads>(st, ait_l2, sh.red1);
    if (cs > 1) {
      if (threadIdx.x == 0) sh.peer1 = st;
      cluster_sync();
      Stats<A> all = stats_identity<A>();
      for (int r = 0; r < cs; ++r) all = combine(all, *cluster_peer(&sh.peer1, r), ait_l2);
      st = all;
    }
  }
  const A r = shift_of(st.m);
  const A log2s = log2_acc(st.s);
  const A ln_s = log_acc(st.s);

  A coef, cy = A(0), e0 = A(0), wsum = A(0);
  if constexpr (kProb) {
    coef = st.aux;  // S
  } else {
    const A w_y = valid ? (w ? w[y] : A(1)) : A(0);
    cy = one_m_eps * w_y;
    e0 = valid ? eps_c : A(0);
    wsum = w ? st.aux : static_cast<A>(a.cols);
    coef = cy + e0 * wsum;  // A; 0 for ignored (and bad) rows
  }
  const A gsc = it * static_cast<const A*>(a.grad_scale)[row * a.grad_scale_stride];
  const bool need_sud = kProb || e0 != A(0);
  const bool pass2 = a.compute_grad || need_sud;  // uniform over the row's blocks
  const bool need_w2 = w != nullptr && need_sud;

  // ---- 2. gradient pass -----------------------------------------------------------------
  Sums<A> acc{A(0), A(0)};
  if (pass2) {
    // No gradient buffer: grad_mode zdot (sums only) or a forward pass with smoothing.
    T* gr = a.grad != nullptr ? static_cast<T*>(a.grad) + row * a.cols : nullptr;
    uint4* gv = gr != nullptr ? reinterpret_cast<uint4*>(gr + head) : nullptr;
    // dz for one class; updates the sums.
    auto dz_of = [&](A xval, A qval, int c) -> A {
      const A t = sgn * xval - r;
      const A d = t * ait;
      const A p = exp2_acc(t * ait_l2 - log2s);
      const A wc = need_w2 ? w[c] : A(1);
      A minus;
      if constexpr (kProb) {
        minus = wc * (qval * one_m_eps + eps_c);
        acc.sud += minus * d;
      } else {
        minus = e0 * wc + (c == y ? cy : A(0));
        if (e0 != A(0)) acc.sud += wc * d;
      }
      const A dz = p * coef - minus;
      // A class with p = 0 and d = -inf contributes 0, not 0 * inf (as the reference).
      acc.zdot += dz == A(0) ? A(0) : dz * d;
      return dz * gsc;
    };
    auto grad_vec = [&](const uint4& raw, const uint4& qraw, int v) {
      A xs[kN], qs[kN], g[kN];
      C::unpack(raw, xs);
      if constexpr (kProb) C::unpack(qraw, qs);
      const int col0 = head + v * kN;
#pragma unroll
      for (int j = 0; j < kN; ++j) g[j] = dz_of(xs[j], kProb ? qs[j] : A(0), col0 + j);
      if (gv != nullptr) __stcs(gv + v, C::pack(g));
    };
    auto fetch = [&](int v) -> uint4 {
      if constexpr (kMode == Mode::kSmem) return s_cache[v - vbeg];
      else return load16<kSrc2>(xv + v);
    };
    constexpr int kU = (kMode == Mode::kSmem && !kProb) ? kUnrollSmem : kUnroll;
    int v = vbeg + gt;
    for (; v + (kU - 1) * kGroup < vend; v += kU * kGroup) {
      uint4 raw[kU], qraw[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        raw[u] = fetch(v + u * kGroup);
        qraw[u] = kProb ? load16<kSrc2>(qv + v + u * kGroup) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) grad_vec(raw[u], qraw[u], v + u * kGroup);
    }
    for (; v < vend; v += kGroup) {
      grad_vec(fetch(v), kProb ? load16<kSrc2>(qv + v) : make_uint4(0, 0, 0, 0), v);
    }
    if (scalar_lane) {
      const int c = scalar_col;
      const A g1 = dz_of(C::load1(xr + c), kProb ? C::load1(qr + c) : A(0), c);
      if (gr != nullptr) C::store1(gr + c, g1);
    }

    if constexpr (kWarpRows) {
      acc = warp_sum(acc);
    } else {
      acc = block_sum<kThreads>(acc, sh.red2);
      if (cs > 1) {
        if (threadIdx.x == 0) sh.peer2 = acc;
        cluster_sync();
        if (writer) {
          Sums<A> all{A(0), A(0)};
          for (int k = 0; k < cs; ++k) {
            const Sums<A> p = *cluster_peer(&sh.peer2, k);
            all.zdot += p.zdot;
            all.sud += p.sud;
          }
          acc = all;
        }
      }
    }
  }

  // ---- per-row outputs ------------------------------------------------------------------
  if (writer) {
    A loss;
    if constexpr (kProb) {
      loss = coef * ln_s - acc.sud;
    } else if (bad) {
      loss = static_cast<A>(NAN);
    } else if (!valid) {
      loss = A(0);
    } else {
      const A d_y = (key_y - r) * ait;
      loss = cy * (ln_s - d_y);
      if (e0 != A(0)) loss += e0 * (wsum * ln_s - acc.sud);
    }
    static_cast<A*>(a.loss)[row] = loss;
    static_cast<A*>(a.lse)[row] = ln_s + r * ait;
    if (a.compute_grad) static_cast<A*>(a.zdot)[row] = acc.zdot;
    if (bad && a.errors.flag != nullptr &&
        atomicCAS(a.errors.flag, 0ull, 1ull) == 0ull && a.errors.record != nullptr) {
      volatile long long* rec = a.errors.record;
      rec[1] = static_cast<long long>(y);
      rec[2] = static_cast<long long>(row);
      rec[3] = static_cast<long long>(a.cols);
      __threadfence_system();  // the host reads entry 0 first, so it must land last
      rec[0] = 1;
    }
  }
  // No block may leave while the others of its cluster can still read its shared memory.
  if (!kWarpRows && cs > 1) cluster_sync();
}

// Warp mode: kThreads / 32 rows per block, no shared-memory cache, no cluster.
template <typename T, bool kProb>
__global__ void __launch_bounds__(32 * kRowsPerWarpBlock)
    ce_rows_warp_kernel(const CeArgs a, const Geom g) {
  using A = typename AccOf<T>::type;
  constexpr int kThreads = 32 * kRowsPerWarpBlock;
  __shared__ Scratch<A, kThreads> sh;  // unused by warp mode; keeps one ce_row signature
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + (threadIdx.x >> 5);
  if (row >= a.rows) return;  // whole warps only: no block barrier follows in warp mode
  ce_row<T, kProb, kThreads, 32, Mode::kWarp>(a, row, 0, 1, threadIdx.x & 31, sh, nullptr);
  (void)g;
}

// Block mode: `cluster` blocks per row (grid = rows * cluster); the row chunk is cached in
// dynamic shared memory when g.cache_vecs covers it, else re-read from L2.
template <typename T, bool kProb, int kThreads, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    ce_rows_block_kernel(const CeArgs a, const Geom g) {
  using A = typename AccOf<T>::type;
  __shared__ Scratch<A, kThreads> sh;
  extern __shared__ uint4 s_cache[];
  const int cs = g.cluster;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / cs;
  const int rank = static_cast<int>(blockIdx.x % cs);
  // cache_vecs = ceil(floor(row bytes / 16) / cluster) (ce_choose_plan) bounds every
  // block's chunk of vectors, whatever the row's alignment.
  if (g.cache_vecs > 0) {
    ce_row<T, kProb, kThreads, kThreads, Mode::kSmem>(a, row, rank, cs, threadIdx.x, sh,
                                                      s_cache);
  } else {
    ce_row<T, kProb, kThreads, kThreads, Mode::kL2>(a, row, rank, cs, threadIdx.x, sh,
                                                    s_cache);
  }
}

// Block sizes: small chunks (up to kSmemChunkBytes, several blocks per SM) use 256 threads,
// larger ones 512 so that enough loads are in flight from one block per SM.
constexpr int kSmallBlock = 256;
constexpr int kLargeBlock = 512;

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fills the block-mode fields of `p` for `cluster` blocks per row: cache the chunk when
// allowed and it fits, and size the block accordingly.
void block_plan(int64_t row_vecs, int cluster, bool allow_cache, int64_t smem_cap, CePlan* p) {
  const int64_t chunk_bytes = ceil_div(row_vecs, cluster) * 16;
  const bool cache = allow_cache && chunk_bytes <= smem_cap;
  p->cluster = cluster;
  p->mode = cache ? CeMode::kSmem : CeMode::kL2;
  p->smem_bytes = cache ? static_cast<size_t>(chunk_bytes) : 0;
  p->threads = (cache && chunk_bytes <= kSmemChunkBytes) ? kSmallBlock : kLargeBlock;
}

template <typename T, bool kProb>
cudaError_t launch_plan(const CeArgs& a, const CePlan& plan, int device,
                        const DeviceInfo& info, cudaStream_t stream) {
  if (plan.mode == CeMode::kWarp) {
    const int64_t blocks = ceil_div(a.rows, kRowsPerWarpBlock);
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    return detail::launch(ce_rows_warp_kernel<T, kProb>, dim3(static_cast<unsigned>(blocks)),
                          dim3(32 * kRowsPerWarpBlock), 0, stream, 1, a, Geom{1, 0});
  }
  const int64_t blocks = a.rows * plan.cluster;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const Geom geom{plan.cluster, static_cast<int>(plan.smem_bytes / 16)};
  auto run = [&](auto kernel, int threads) -> cudaError_t {
    if (plan.smem_bytes > (48u << 10)) {
      const cudaError_t e = detail::allow_max_smem(reinterpret_cast<const void*>(kernel),
                                                   device, info.smem_optin - kSmemReserve);
      if (e != cudaSuccess) return e;
    }
    return detail::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads),
                          plan.smem_bytes, stream, plan.cluster, a, geom);
  };
  // Three small blocks per SM (the kSmemChunkBytes budget); fp64 needs more registers.
  constexpr int kSmallMin = sizeof(T) == 8 ? 2 : 3;
  if (plan.threads == kSmallBlock)
    return run(ce_rows_block_kernel<T, kProb, kSmallBlock, kSmallMin>, kSmallBlock);
  return run(ce_rows_block_kernel<T, kProb, kLargeBlock, 1>, kLargeBlock);
}

template <typename T>
cudaError_t launch_typed(const CeArgs& a, const CePlan& plan, int device,
                         const DeviceInfo& info, cudaStream_t stream) {
  return a.prob_target ? launch_plan<T, true>(a, plan, device, info, stream)
                       : launch_plan<T, false>(a, plan, device, info, stream);
}

cudaError_t launch_dtype(const CeArgs& a, const CePlan& plan, int device,
                         const DeviceInfo& info, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch_typed<float>(a, plan, device, info, stream);
    case DType::kFloat16: return launch_typed<__half>(a, plan, device, info, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, plan, device, info, stream);
    case DType::kFloat64: return launch_typed<double>(a, plan, device, info, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// The one place that decides how rows are laid on the chip.
//   * rows up to kWarpRowBytes: a warp per row;
//   * else a block per row, on sm_90 a cluster of 2..8 blocks when the row is large, the
//     smallest cluster whose chunk fits kSmemChunkBytes (3 blocks per SM keep loads in
//     flight while others compute), else the smallest whose chunk fits shared memory at all,
//     else no cache (re-read from L2) with the largest cluster;
//   * few rows: more blocks per row until the grid covers the SMs.
cudaError_t ce_choose_plan(const CeArgs& a, const CeTuning& tuning, int device, CePlan* plan) {
  DeviceInfo info;
  const cudaError_t e = detail::device_info(device, &info);
  if (e != cudaSuccess) return e;
  const int64_t row_bytes = a.cols * static_cast<int64_t>(dtype_size(a.dtype));
  const int64_t row_vecs = row_bytes / 16;
  const void* probe = reinterpret_cast<const void*>(ce_rows_block_kernel<float, false, kSmallBlock, 3>);
  const int max_cluster = detail::clusters_supported(probe, device, info) ? kMaxCluster : 1;
  const int64_t smem_cap = info.smem_optin - kSmemReserve;

  CeMode mode = tuning.mode;
  if (mode == CeMode::kAuto && row_bytes <= kWarpRowBytes) mode = CeMode::kWarp;
  if (mode == CeMode::kWarp) {
    *plan = CePlan{CeMode::kWarp, 32 * kRowsPerWarpBlock, 1, 0};
    return cudaSuccess;
  }
  const bool allow_cache = mode != CeMode::kL2;
  int cluster = 1;
  if (tuning.cluster > 0) {
    cluster = detail::floor_pow2(tuning.cluster < max_cluster ? tuning.cluster : max_cluster);
  } else {
    if (allow_cache) {
      int fit = 0;
      for (int c = 1; c <= max_cluster && fit == 0; c *= 2)
        if (ceil_div(row_vecs, c) * 16 <= kSmemChunkBytes) fit = c;
      for (int c = 1; c <= max_cluster && fit == 0; c *= 2)
        if (ceil_div(row_vecs, c) * 16 <= smem_cap) fit = c;
      cluster = fit > 0 ? fit : max_cluster;
    }
    while (cluster < max_cluster && a.rows * cluster < info.sms) cluster *= 2;
  }
  block_plan(row_vecs, cluster, allow_cache, smem_cap, plan);
  return cudaSuccess;
}

cudaError_t ce_rows(const CeArgs& a, const CeTuning& tuning, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.cols < 1 || a.cols > INT_MAX) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  DeviceInfo info;
  e = detail::device_info(device, &info);
  if (e != cudaSuccess) return e;
  CePlan plan;
  e = ce_choose_plan(a, tuning, device, &plan);
  if (e != cudaSuccess) return e;
  e = launch_dtype(a, plan, device, info, stream);
  if (e != cudaSuccess && plan.cluster > 1) {
    // A cluster that cannot be scheduled (e.g. a partitioned GPU): clear the error so that
    // nobody else reads it from cudaGetLastError, and run one block per row instead.
    (void)cudaGetLastError();
    const int64_t row_vecs = a.cols * static_cast<int64_t>(dtype_size(a.dtype)) / 16;
    block_plan(row_vecs, 1, plan.mode == CeMode::kSmem, info.smem_optin - kSmemReserve,
               &plan);
    e = launch_dtype(a, plan, device, info, stream);
  }
  return e;
}

}  // namespace cuda
}  // namespace tempsoft
