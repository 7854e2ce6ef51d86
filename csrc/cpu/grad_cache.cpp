// A cache of the CPU cross-entropy's gradient buffers: cpu::empty_grad().
//
// Every forward + backward returns a fresh (N, C) gradient, and a training loop drops it
// again (zero_grad(set_to_none=True)) before the next step asks for the same size.  Through
// the default CPU allocator, glibc unmaps or trims such a buffer, and the next one is
// faulted in page by page, each page zeroed by the OS: at 4096 x 32000 fp32 (512 MiB) the
// kernel took 48.7 ms into fresh memory and 28.3 ms into a buffer it had written before
// (2 threads, AMD EPYC Zen 5); at 4096 x 1000 (16 MiB) glibc sometimes keeps the pages and
// sometimes faults in 100-300 of them per call.  As PyTorch's CUDA caching allocator does
// for device memory, this allocator keeps buffers that are freed and hands them out again
// for the same size or one up to half smaller, up to a byte limit (grad_cache_set_limit;
// tempsoft sets it from TEMPSOFT_CPU_CACHE_MB at load; default kDefaultLimit, 0 turns the
// cache off).  Buffers below kMinBytes go to the default CPU allocator: glibc serves those
// from its heap anyway.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <deque>
#include <mutex>

#include "kernels.h"

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace tempsoft {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kDefaultLimit = size_t(1024) << 20;
// Fresh buffers at least this large ask Linux for transparent huge pages: their first-touch
// faults then zero 2 MiB at a time (measured, 1 thread, filling a fresh fp32 tensor:
// 62 MiB 28 ms with 4 KiB pages, 4.4 ms with huge pages).
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

// Asks for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched
// buffer (only whole pages inside it, so no other allocation is affected).  A hint: any
// failure (THP disabled, not Linux) leaves ordinary pages.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageMinBytes) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

struct Block {
  void* ptr;
  size_t bytes;
};

class GradAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    Block block = take(bytes);
    if (block.ptr == nullptr) {
      block = {c10::alloc_cpu(bytes), bytes};
      advise_huge_pages(block.ptr, bytes);
    }
    return {block.ptr, new Block(block), &GradAllocator::release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    trim_to(limit_);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mu_);
    trim_to(0);
  }

  GradCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_bytes_, int64_t(free_.size()), hits_, misses_, limit_};
  }

 private:
  // The smallest cached block that holds `bytes` and wastes at most half of itself (batch
  // sizes that vary, e.g. a smaller last batch, still find a block), the most recently
  // freed among equals (its pages are the likeliest to be in cache and TLB); or {null, 0}.
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = free_.rend();
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes >= bytes && it->bytes / 2 <= bytes &&
          (best == free_.rend() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best == free_.rend()) {
      ++misses_;
      return {nullptr, 0};
    }
    const Block block = *best;
    free_.erase(std::next(best).base());
    cached_bytes_ -= block.bytes;
    ++hits_;
    return block;
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    instance().give_back(*block);
    delete block;
  }

  void give_back(const Block& block) {
    std::lock_guard<std::mutex> lock(mu_);
    if (block.bytes > limit_) {
      c10::free_cpu(block.ptr);
      return;
    }
    free_.push_back(block);
    cached_bytes_ += block.bytes;
    trim_to(limit_);
  }

  // Frees the least recently cached blocks until at most `bytes` stay cached (mu_ held).
  void trim_to(size_t bytes) {
    while (cached_bytes_ > bytes && !free_.empty()) {
      c10::free_cpu(free_.front().ptr);
      cached_bytes_ -= free_.front().bytes;
      free_.pop_front();
    }
  }

 public:
  // Never destroyed: tensors that hold its blocks may be freed during interpreter shutdown,
  // after static destructors have run.
  static GradAllocator& instance() {
    static auto* allocator = [] {
      auto* a = new GradAllocator();
#if defined(__unix__) || defined(__APPLE__)
      // A fork (a DataLoader worker) while another thread holds the lock would leave the
      // child's copy locked forever: hold it across the fork instead.
      pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); },
                     [] { instance().mu_.unlock(); });
#endif
      return a;
    }();
    return *allocator;
  }

 private:
  std::mutex mu_;
  std::deque<Block> free_;  // oldest first
  size_t cached_bytes_ = 0;
  size_t limit_ = kDefaultLimit;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_grad(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &GradAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

void grad_cache_set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "grad cache limit must be >= 0 bytes, got ", bytes);
  GradAllocator::instance().set_limit(size_t(bytes));
}

void grad_cache_empty() { GradAllocator::instance().empty(); }

GradCacheStats grad_cache_stats() { return GradAllocator::instance().stats(); }

}  // namespace cpu
}  // namespace tempsoft
