// Decisions about what the compiled device code can do, as plain C++ (no CUDA header), so
// that a host compiler alone can test them (tests/test_cuda_logic.py).
#pragma once

namespace tempsoft {
namespace cuda {
namespace detail {

// Whether a kernel may be launched in thread-block clusters. The device must be sm_90+, and
// so must the code that runs there: the cluster barriers exist only in code compiled for a
// compute_90+ virtual architecture (below it, cluster_sync in common.cuh compiles to
// nothing). ptx_version and binary_version are cudaFuncAttributes' fields (10 * major +
// minor). binary_version alone is not enough: a build for "8.0+PTX" that the driver
// JIT-compiles on an H100 reports binary_version 90 but ptx_version 80, and its blocks would
// combine their rows' statistics without synchronising.
constexpr bool cluster_launch_allowed(int device_cc_major, int ptx_version,
                                      int binary_version) {
  return device_cc_major >= 9 && ptx_version >= 90 && binary_version >= 90;
}

}  // namespace detail
}  // namespace cuda
}  // namespace tempsoft
