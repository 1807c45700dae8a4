#include "cpu/alloc.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastcore_train::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// glibc serves blocks below its largest mmap threshold (32 MiB on 64-bit) from a heap it
// reuses without faults, which beats fresh huge pages; above it every block is a fresh mmap.
constexpr size_t kThreshold = size_t(32) << 20;

bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

bool enabled() {
  static const bool on = !env_off("FASTCORE_TRAIN_HUGEPAGES");
  return on;
}

#if defined(__linux__)
// Freed blocks kept for the next output of a similar size. A training step frees its big
// outputs (the cross-entropy gradient, a mixed batch) and asks for the same sizes in the next
// step; a cached block is already mapped, so reusing it skips the kernel's page faults and
// the zeroing of every fresh page (~20 ms per GB here). Bounded by FASTCORE_TRAIN_CACHE_MB
// (default: 1/8 of physical memory; 0 disables); release_cached_blocks() empties it.
class BlockCache {
 public:
  BlockCache() : limit_(default_limit()) {}

  void* allocate(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // the smallest cached block that fits without wasting more than half of it
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].second;
        if (b >= bytes && b / 2 <= bytes && (best == free_.size() || b < free_[best].second)) {
          best = i;
        }
      }
      if (best != free_.size()) {
        void* p = free_[best].first;
        cached_ -= free_[best].second;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory: failure just means 4 KiB pages
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    return p;
  }

  void release(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = sizes_.at(p);
    if (cached_ + bytes <= limit_) {
      free_.emplace_back(p, bytes);
      cached_ += bytes;
      return;
    }
    sizes_.erase(p);
    std::free(p);
  }

  size_t release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t n = cached_;
    for (auto& [p, bytes] : free_) {
      sizes_.erase(p);
      std::free(p);
    }
    free_.clear();
    cached_ = 0;
    return n;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  // A fork (DataLoader workers) copies the mutex in whatever state another thread left it;
  // the child has only the forking thread, so it starts from a fresh, unlocked one.
  void reset_lock_after_fork() { new (&mu_) std::mutex(); }

 private:
  static size_t default_limit() {
    if (const char* v = std::getenv("FASTCORE_TRAIN_CACHE_MB")) {
      return static_cast<size_t>(std::strtoull(v, nullptr, 10)) << 20;
    }
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) / 8
                                 : size_t(0);
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;     // every block handed out or cached
  std::vector<std::pair<void*, size_t>> free_;  // cached, not in use
  size_t cached_ = 0;
  const size_t limit_;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
BlockCache& cache() {
  static BlockCache* c = [] {
    auto* made = new BlockCache();
    pthread_atfork(nullptr, nullptr, [] { cache().reset_lock_after_fork(); });
    return made;
  }();
  return *c;
}
#endif

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_large(sizes, c10::contiguous_strides(sizes), options);
}

at::Tensor empty_large(at::IntArrayRef sizes, at::IntArrayRef strides,
                       const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(sizes.size() == strides.size());
#if defined(__linux__)
  size_t numel = 1;
  for (auto s : sizes) numel *= static_cast<size_t>(s);
  const size_t nbytes = numel * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (enabled() && nbytes >= kThreshold) {
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    if (void* p = cache().allocate(bytes)) {
      return at::from_blob(p, sizes, strides, [](void* q) { cache().release(q); }, options);
    }
  }
#endif
  return at::empty_strided(sizes, strides, options);
}

size_t release_cached_blocks() {
#if defined(__linux__)
  return cache().release_all();
#else
  return 0;
#endif
}

size_t cached_block_bytes() {
#if defined(__linux__)
  return cache().cached();
#else
  return 0;
#endif
}

}  // namespace fastcore_train::cpu
