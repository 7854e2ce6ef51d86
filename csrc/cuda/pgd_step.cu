// One fused PGD step on CUDA, in place: ascent step, projection onto the eps-ball around
// x_nat, clamp to [lower, upper]. Contract and the exact arithmetic order:
// tempsoft/kernels/reference.py (pgd_step); this file follows that order so the result equals
// the reference in fp32 (every rounding is spelled out with __f*_rn / __d*_rn, which nvcc
// never contracts into an FMA).
//
//   Linf (elementwise, one pass: read x_adv, grad, x_nat; write x_adv):
//     s = (g > 0) - (g < 0);  a = x + alpha s;  d = min(max(a - x0, -eps), eps)
//   L2 (a block, or on sm_90 a cluster of blocks, per sample; sums in fp64):
//     1. G = sum g^2;  s = T(alpha / sqrt(G));  ok = 0 < G < inf && isfinite(s);  scale = ok ? s : 0
//     2. d = (x + (ok ? g*scale : 0)) - x0;  D = sum d^2;  f = sqrt(D) > eps ? T(eps/sqrt(D)) : 1
//     3. write clamp(x0 + d*f)
//     Between the passes the sample stays in shared memory when it fits (g after pass 1;
//     d and x0 after pass 2), so HBM sees each input once; otherwise it is re-read (L2).
//   both: out = min(max(x0 + d, lower), upper); samples with active == false are skipped.
// min/max propagate NaN like torch.minimum / torch.maximum / torch.clamp.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launch.h"

namespace tempsoft {
namespace cuda {
namespace {

using detail::cluster_peer;
using detail::cluster_sync;
using detail::DeviceInfo;

constexpr int kLinfThreads = 256;
constexpr int kLinfPacksPerThread = 2;      // packs per thread per tile (tile = block's work)
constexpr int kL2SmallBlock = 256;
constexpr int kL2LargeBlock = 512;
constexpr int64_t kL2CacheTarget = 64 << 10;  // cached bytes that let 3 blocks share an SM
constexpr int kSmemReserve = 2048;
constexpr int kMaxCluster = 8;
constexpr unsigned kFull = 0xffffffffu;

// kN elements moved as one access (16 bytes when the data is aligned for it).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// NaN-propagating max / min (fmaxf would drop the NaN).
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}
template <typename T>
__device__ __forceinline__ T min_nan(T a, T b) {
  return (a != a || a < b) ? a : b;
}
template <typename T>
__device__ __forceinline__ T clamp_nan(T v, T lo, T hi) {
  return min_nan(max_nan(v, lo), hi);
}

template <typename T>
__device__ __forceinline__ T linf_elem(T x, T g, T x0, T eps, T alpha, T lo, T hi) {
  const T s = static_cast<T>(g > T(0)) - static_cast<T>(g < T(0));  // NaN -> 0
  const T a = add_rn(x, mul_rn(alpha, s));
  const T d = min_nan(max_nan(sub_rn(a, x0), -eps), eps);
  return clamp_nan(add_rn(x0, d), lo, hi);
}

// ---- Linf: tiles of kThreads * kLinfPacksPerThread packs, each inside one sample ----------
template <typename T, int kN>
__global__ void __launch_bounds__(kLinfThreads)
    pgd_linf_kernel(const PgdArgs a, int64_t tiles_per_sample) {
  using P = Pack<T, kN>;
  constexpr int64_t kTile = static_cast<int64_t>(kLinfThreads) * kLinfPacksPerThread;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / tiles_per_sample;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) - b * tiles_per_sample;
  if (a.active != nullptr && !a.active[b]) return;
  const int64_t npack = a.per_sample / kN;
  const int64_t off = b * a.per_sample;
  // Every output element depends only on the same element of the inputs, so even aliased
  // inputs are safe with __restrict__ (no element is read after another one is written).
  P* __restrict__ x = reinterpret_cast<P*>(static_cast<T*>(a.x_adv) + off);
  const P* __restrict__ g = reinterpret_cast<const P*>(static_cast<const T*>(a.grad) + off);
  const P* __restrict__ x0 = reinterpret_cast<const P*>(static_cast<const T*>(a.x_nat) + off);
  const T eps = static_cast<const T*>(a.eps)[b];
  const T alpha = static_cast<const T*>(a.alpha)[b];
  const T lo = static_cast<T>(a.lower), hi = static_cast<T>(a.upper);
  const int64_t p1 = min(npack, (tile + 1) * kTile);
#pragma unroll
  for (int k = 0; k < kLinfPacksPerThread; ++k) {
    const int64_t p = tile * kTile + k * kLinfThreads + threadIdx.x;
    if (p < p1) {
      P xv = x[p];
      const P gv = g[p], nv = x0[p];
#pragma unroll
      for (int j = 0; j < kN; ++j) xv.v[j] = linf_elem(xv.v[j], gv.v[j], nv.v[j], eps, alpha, lo, hi);
      x[p] = xv;
    }
  }
}

// ---- L2 -------------------------------------------------------------------------------------
// Sum over the block of one double per thread; every thread gets the total (each warp adds
// the per-warp partials in the same order). `scratch` must not be reused in this block.
template <int kThreads>
__device__ __forceinline__ double block_total(double v, double* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFull, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  double w = lane < kWarps ? scratch[lane] : 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) w += __shfl_down_sync(kFull, w, o);
  return __shfl_sync(kFull, w, 0);
}

// Adds the cluster's block totals in rank order (the same value in every block).
__device__ __forceinline__ double cluster_total(double v, double* slot, int cs) {
  if (cs == 1) return v;
  if (threadIdx.x == 0) *slot = v;
  cluster_sync();
  double t = 0.0;
  for (int r = 0; r < cs; ++r) t += *cluster_peer(slot, r);
  return t;
}

struct L2Geom {
  int cluster;      // blocks per sample
  int cache_packs;  // packs per block that shared memory holds for each of two arrays (0: none)
};

// kL2Unroll packs per thread per step, loaded before any is used, so that several 16-byte
// loads are in flight per thread (a sample chunk is walked by one block only).
constexpr int kL2Unroll = 4;

template <typename T, int kN, int kThreads>
__global__ void __launch_bounds__(kThreads) pgd_l2_kernel(const PgdArgs a, const L2Geom geom) {
  using P = Pack<T, kN>;
  constexpr int kU = kL2Unroll;
  __shared__ double s_red1[kThreads / 32], s_red2[kThreads / 32];
  __shared__ double s_peer1, s_peer2;
  extern __shared__ uint4 s_dyn[];
  const int cs = geom.cluster;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / cs;
  const int rank = static_cast<int>(blockIdx.x % cs);
  if (a.active != nullptr && !a.active[b]) return;  // the whole cluster returns together

  const int64_t npack = a.per_sample / kN;
  const int64_t chunk = (npack + cs - 1) / cs;
  const int64_t pbeg = min(npack, rank * chunk);
  const int64_t pend = min(npack, pbeg + chunk);
  const bool cache = geom.cache_packs > 0 && chunk <= geom.cache_packs;
  P* c_a = reinterpret_cast<P*>(s_dyn);  // g after pass 1, then d
  P* c_b = c_a + geom.cache_packs;       // x0 after pass 2
  const int64_t off = b * a.per_sample;
  P* x = reinterpret_cast<P*>(static_cast<T*>(a.x_adv) + off);
  const P* g = reinterpret_cast<const P*>(static_cast<const T*>(a.grad) + off);
  const P* x0 = reinterpret_cast<const P*>(static_cast<const T*>(a.x_nat) + off);
  const T eps = static_cast<const T*>(a.eps)[b];
  const T alpha = static_cast<const T*>(a.alpha)[b];
  const T lo = static_cast<T>(a.lower), hi = static_cast<T>(a.upper);
  const int64_t first = pbeg + threadIdx.x;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kU;

  // 1. gradient norm -> step scale. Squares of fp32 values are exact in fp64.
  double gsum = 0.0;
  for (int64_t p0 = first; p0 < pend; p0 += kStep) {
    P gv[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u)
      if (p0 + u * kThreads < pend) gv[u] = g[p0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t p = p0 + u * kThreads;
      if (p >= pend) break;
      if (cache) c_a[p - pbeg] = gv[u];
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const double t = static_cast<double>(gv[u].v[j]);
        gsum += t * t;
      }
    }
  }
  const double G = cluster_total(block_total<kThreads>(gsum, s_red1), &s_peer1, cs);
  // A gradient too small to normalise (alpha / ||g|| overflows T) is no step, like a zero one.
  const T s = static_cast<T>(static_cast<double>(alpha) / sqrt(G));
  const bool ok = G > 0.0 && G < static_cast<double>(INFINITY) && isfinite(s);
  const T scale = ok ? s : T(0);

  // 2. norm of the stepped offset -> projection factor
  auto offset = [&](const P& xv, const P& gv, const P& nv) {
    P d;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const T step = ok ? mul_rn(gv.v[j], scale) : T(0);
      d.v[j] = sub_rn(add_rn(xv.v[j], step), nv.v[j]);
    }
    return d;
  };
  double dsum = 0.0;
  for (int64_t p0 = first; p0 < pend; p0 += kStep) {
    P xv[kU], gv[kU], nv[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t p = p0 + u * kThreads;
      if (p < pend) {
        xv[u] = x[p];
        nv[u] = x0[p];
        gv[u] = cache ? c_a[p - pbeg] : g[p];
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t p = p0 + u * kThreads;
      if (p >= pend) break;
      const P d = offset(xv[u], gv[u], nv[u]);
      if (cache) {
        c_a[p - pbeg] = d;
        c_b[p - pbeg] = nv[u];
      }
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const double t = static_cast<double>(d.v[j]);
        dsum += t * t;
      }
    }
  }
  const double n = sqrt(cluster_total(block_total<kThreads>(dsum, s_red2), &s_peer2, cs));
  const double eps64 = static_cast<double>(eps);
  const T f = n > eps64 ? static_cast<T>(eps64 / n) : T(1);

  // 3. write
  for (int64_t p0 = first; p0 < pend; p0 += kStep) {
    P d[kU], nv[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t p = p0 + u * kThreads;
      if (p < pend) {
        if (cache) {
          d[u] = c_a[p - pbeg];
          nv[u] = c_b[p - pbeg];
        } else {
          nv[u] = x0[p];
          d[u] = offset(x[p], g[p], nv[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t p = p0 + u * kThreads;
      if (p >= pend) break;
      P out;
#pragma unroll
      for (int j = 0; j < kN; ++j)
        out.v[j] = clamp_nan(add_rn(nv[u].v[j], mul_rn(d[u].v[j], f)), lo, hi);
      x[p] = out;
    }
  }
  // No block may leave while the others of its cluster can still read its shared memory.
  if (cs > 1) cluster_sync();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int kN>
cudaError_t launch_linf(const PgdArgs& a, cudaStream_t stream) {
  const int64_t npack = a.per_sample / kN;
  const int64_t tiles = ceil_div(npack, static_cast<int64_t>(kLinfThreads) * kLinfPacksPerThread);
  const int64_t blocks = a.batch * tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  return detail::launch(pgd_linf_kernel<T, kN>, dim3(static_cast<unsigned>(blocks)),
                        dim3(kLinfThreads), 0, stream, 1, a, tiles);
}

// Blocks per sample and shared-memory cache for L2, chosen like the cross-entropy plan: the
// smallest cluster whose two cached arrays fit kL2CacheTarget (several blocks per SM), else
// shared memory at all (one large block per SM), else no cache; more blocks per sample when
// the samples alone do not cover the SMs.
template <typename T, int kN>
cudaError_t launch_l2(const PgdArgs& a, cudaStream_t stream) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  DeviceInfo info;
  e = detail::device_info(device, &info);
  if (e != cudaSuccess) return e;
  const void* probe = reinterpret_cast<const void*>(pgd_l2_kernel<T, kN, kL2SmallBlock>);
  const int max_cluster = detail::clusters_supported(probe, device, info) ? kMaxCluster : 1;
  const int64_t smem_cap = info.smem_optin - kSmemReserve;
  const int64_t npack = a.per_sample / kN;
  auto cache_bytes = [&](int c) {
    return 2 * ceil_div(npack, c) * static_cast<int64_t>(sizeof(Pack<T, kN>));
  };
  int cluster = 0;
  for (int c = 1; c <= max_cluster && cluster == 0; c *= 2)
    if (cache_bytes(c) <= kL2CacheTarget) cluster = c;
  for (int c = 1; c <= max_cluster && cluster == 0; c *= 2)
    if (cache_bytes(c) <= smem_cap) cluster = c;
  if (cluster == 0) cluster = max_cluster;
  while (cluster < max_cluster && a.batch * cluster < info.sms) cluster *= 2;

  auto run = [&](int cs) -> cudaError_t {
    const bool cache = cache_bytes(cs) <= smem_cap;
    const int64_t blocks = a.batch * cs;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    const L2Geom geom{cs, cache ? static_cast<int>(ceil_div(npack, cs)) : 0};
    const size_t smem = cache ? static_cast<size_t>(cache_bytes(cs)) : 0;
    // Small cached chunks: several 256-thread blocks per SM; otherwise one 512-thread block
    // per SM has to keep enough loads in flight on its own.
    const bool small = cache && cache_bytes(cs) <= kL2CacheTarget;
    auto go = [&](auto kernel, int threads) -> cudaError_t {
      if (smem > (48u << 10)) {
        const cudaError_t err = detail::allow_max_smem(reinterpret_cast<const void*>(kernel),
                                                       device, static_cast<int>(smem_cap));
        if (err != cudaSuccess) return err;
      }
      return detail::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), smem,
                            stream, cs, a, geom);
    };
    return small ? go(pgd_l2_kernel<T, kN, kL2SmallBlock>, kL2SmallBlock)
                 : go(pgd_l2_kernel<T, kN, kL2LargeBlock>, kL2LargeBlock);
  };
  e = run(cluster);
  if (e != cudaSuccess && cluster > 1) {
    (void)cudaGetLastError();  // a cluster that cannot be scheduled: one block per sample
    e = run(1);
  }
  return e;
}

template <typename T>
cudaError_t launch_typed(const PgdArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = a.per_sample % kVec == 0 &&
                       (reinterpret_cast<uintptr_t>(a.x_adv) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(a.grad) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(a.x_nat) & 15) == 0;
  if (a.norm == 0) return aligned ? launch_linf<T, kVec>(a, stream) : launch_linf<T, 1>(a, stream);
  return aligned ? launch_l2<T, kVec>(a, stream) : launch_l2<T, 1>(a, stream);
}

}  // namespace

cudaError_t pgd_step(const PgdArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.per_sample == 0) return cudaSuccess;
  if (a.norm != 0 && a.norm != 2) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch_typed<float>(a, stream);
    case DType::kFloat64: return launch_typed<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace tempsoft
