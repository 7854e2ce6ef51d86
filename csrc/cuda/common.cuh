// Pieces shared by tempsoft's .cu files: device facts, cluster helpers, launch helpers.
// Plain CUDA (no ATen), so nvcc alone compiles every .cu file that includes it.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <utility>

#include "arch.h"

namespace tempsoft {
namespace cuda {
namespace detail {

// ----------------------------------------------------------------------------------------
// Host: what the launch heuristics need to know about a device, read once per device.
// ----------------------------------------------------------------------------------------
struct DeviceInfo {
  int cc_major = 0;
  int sms = 0;
  int smem_optin = 0;  // largest dynamic shared memory one block may opt in to (bytes)
};

constexpr int kMaxDevices = 64;

inline cudaError_t device_info(int device, DeviceInfo* out) {
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  static bool ready[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mu);
  if (!ready[device]) {
    DeviceInfo d;
    cudaError_t e = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return e;
    cache[device] = d;
    ready[device] = true;
  }
  *out = cache[device];
  return cudaSuccess;
}

// Whether `kernel` may be launched in clusters on `device` (the rule: arch.h,
// cluster_launch_allowed), from the versions the loaded code reports.
inline bool clusters_supported(const void* kernel, int device, const DeviceInfo& info) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> cached;
  if (info.cc_major < 9) return false;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, device);
  auto it = cached.find(key);
  if (it == cached.end()) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
    if (e != cudaSuccess) (void)cudaGetLastError();
    const bool ok = e == cudaSuccess &&
                    cluster_launch_allowed(info.cc_major, attr.ptxVersion, attr.binaryVersion);
    it = cached.emplace(key, ok).first;
  }
  return it->second;
}

// Raises a kernel's dynamic shared-memory limit to the device maximum, once per (kernel,
// device). Always the same value, so concurrent callers cannot lower it under each other.
inline cudaError_t allow_max_smem(const void* kernel, int device, int optin_bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, device})) return cudaSuccess;
  cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (e == cudaSuccess) done.insert({kernel, device});
  return e;
}

// Launches `kernel` with `cluster` blocks per cluster along x (1 = an ordinary launch).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, int cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  cfg.attrs = attr;
  cfg.numAttrs = 0;
  if (cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Largest power of two <= v (v >= 1).
inline int floor_pow2(int v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

// ----------------------------------------------------------------------------------------
// Device: thread-block clusters (sm_90+). Launchers only ask for clusters on such devices;
// the sm_80 build compiles these to nothing, and its kernels always see a cluster of one.
// ----------------------------------------------------------------------------------------
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}

// Pointer to `p` in the shared memory of block `rank` of this cluster.
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, static_cast<unsigned>(rank));
#else
  (void)rank;
  return p;
#endif
}

}  // namespace detail
}  // namespace cuda
}  // namespace tempsoft
