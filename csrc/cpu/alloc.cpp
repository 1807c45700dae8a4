#include "cpu/alloc.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
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
// the zeroing of every fresh page (~20 ms per GB here).
//
// What is kept is bounded by what the workload reuses, measured in large allocations (the
// "clock"; a training step makes a few):
// * admission: a freed block is kept only if the size it served was asked for at least twice
//   within the last kWindow allocations -- a process that never asks again keeps nothing;
// * size: cached bytes <= the peak of bytes in use over the last one or two windows, so the
//   process holds at most ~2x its largest live outputs however the sizes vary (oldest evicted
//   first), and never more than FASTCORE_TRAIN_CACHE_MB (default 1/8 of RAM; 0 disables);
// * age: a block not reused within kWindow allocations is freed;
// * fork: a child (a DataLoader worker) starts with an empty cache.
// release_cached_blocks() empties it.
class BlockCache {
 public:
  static constexpr uint64_t kWindow = 16;

  struct Stats {
    size_t cached, in_use, limit, hits, misses, evicted;
  };

  BlockCache() : limit_(default_limit()) {}

  void* allocate(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tick_locked();
      const size_t cls = size_class(bytes);
      note_request_locked(cls);
      // the smallest cached block that fits without wasting more than half of it
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].bytes;
        if (b >= bytes && b / 2 <= bytes && (best == free_.size() || b < free_[best].bytes)) {
          best = i;
        }
      }
      if (best != free_.size()) {
        Cached c = free_[best];
        cached_ -= c.bytes;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        blocks_[c.p] = Block{c.bytes, cls};
        use_locked(c.bytes);
        ++hits_;
        return c.p;
      }
      ++misses_;
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory: failure just means 4 KiB pages
    std::lock_guard<std::mutex> lock(mu_);
    blocks_[p] = Block{bytes, size_class(bytes)};
    use_locked(bytes);
    return p;
  }

  void release(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.find(p);
    TORCH_INTERNAL_ASSERT(it != blocks_.end(), "fastcore_train: unknown large block");
    const Block blk = it->second;
    in_use_ -= blk.bytes;
    const size_t limit = dynamic_limit_locked();
    if (requested_twice_locked(blk.cls) && blk.bytes <= limit) {
      evict_oldest_locked(limit - blk.bytes);
      free_.push_back(Cached{p, blk.bytes, clock_});
      cached_ += blk.bytes;
      return;
    }
    blocks_.erase(it);
    std::free(p);
  }

  size_t release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t n = cached_;
    evict_oldest_locked(0);
    return n;
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return Stats{cached_, in_use_, dynamic_limit_locked(), hits_, misses_, evicted_};
  }

  // A fork (DataLoader workers) copies the mutex in whatever state another thread left it;
  // the child has only the forking thread, so it starts from a fresh, unlocked one, and it
  // gives back the parent's cached blocks (its own outputs will build their own history).
  void after_fork_in_child() {
    new (&mu_) std::mutex();
    std::lock_guard<std::mutex> lock(mu_);
    evict_oldest_locked(0);
    requests_.clear();
    peak_cur_ = peak_prev_ = in_use_;
  }

 private:
  struct Block {
    size_t bytes;
    size_t cls;  // size class of the request the block serves
  };
  struct Cached {
    void* p;
    size_t bytes;
    uint64_t released_at;
  };
  struct Requests {
    uint64_t last;
    uint64_t count;
  };

  static size_t default_limit() {
    if (const char* v = std::getenv("FASTCORE_TRAIN_CACHE_MB")) {
      return static_cast<size_t>(std::strtoull(v, nullptr, 10)) << 20;
    }
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) / 8
                                 : size_t(0);
  }

  // Requests within 1/8 of a power of two share a class (a batch of 250 and one of 256 rows).
  static size_t size_class(size_t bytes) {
    size_t top = 1;
    while (top < bytes) top <<= 1;
    const size_t step = std::max<size_t>(top / 16, kHugePage);
    return (bytes + step - 1) / step * step;
  }

  // One large allocation: the clock advances; every kWindow ticks the peak and the request
  // history roll over and blocks idle for a whole window are freed.
  void tick_locked() {
    ++clock_;
    if (clock_ % kWindow == 0) {
      peak_prev_ = peak_cur_;
      peak_cur_ = in_use_;
      for (auto it = requests_.begin(); it != requests_.end();) {
        it = clock_ - it->second.last > kWindow ? requests_.erase(it) : std::next(it);
      }
    }
    for (size_t i = 0; i < free_.size();) {
      if (clock_ - free_[i].released_at > kWindow) {
        evict_at_locked(i);
      } else {
        ++i;
      }
    }
  }

  void note_request_locked(size_t cls) {
    auto it = requests_.find(cls);
    if (it == requests_.end() || clock_ - it->second.last > kWindow) {
      requests_[cls] = Requests{clock_, 1};
    } else {
      it->second = Requests{clock_, it->second.count + 1};
    }
  }

  bool requested_twice_locked(size_t cls) const {
    auto it = requests_.find(cls);
    return it != requests_.end() && it->second.count >= 2 && clock_ - it->second.last <= kWindow;
  }

  void use_locked(size_t bytes) {
    in_use_ += bytes;
    peak_cur_ = std::max(peak_cur_, in_use_);
  }

  size_t dynamic_limit_locked() const {
    return std::min(limit_, std::max(peak_cur_, peak_prev_));
  }

  void evict_at_locked(size_t i) {
    blocks_.erase(free_[i].p);
    std::free(free_[i].p);
    cached_ -= free_[i].bytes;
    ++evicted_;
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
  }

  // Frees the least recently released blocks until at most `keep` bytes stay cached.
  void evict_oldest_locked(size_t keep) {
    while (cached_ > keep && !free_.empty()) {
      size_t oldest = 0;
      for (size_t i = 1; i < free_.size(); ++i) {
        if (free_[i].released_at < free_[oldest].released_at) oldest = i;
      }
      evict_at_locked(oldest);
    }
  }

  std::mutex mu_;
  std::unordered_map<void*, Block> blocks_;  // every block handed out or cached
  std::vector<Cached> free_;                 // cached, not in use
  std::unordered_map<size_t, Requests> requests_;
  size_t cached_ = 0, in_use_ = 0, peak_cur_ = 0, peak_prev_ = 0;
  uint64_t clock_ = 0, hits_ = 0, misses_ = 0, evicted_ = 0;
  const size_t limit_;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
BlockCache& cache() {
  static BlockCache* c = [] {
    auto* made = new BlockCache();
    pthread_atfork(nullptr, nullptr, [] { cache().after_fork_in_child(); });
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
  return cache().stats().cached;
#else
  return 0;
#endif
}

std::map<std::string, int64_t> large_block_stats() {
#if defined(__linux__)
  const auto s = cache().stats();
  return {{"cached_bytes", int64_t(s.cached)}, {"in_use_bytes", int64_t(s.in_use)},
          {"limit_bytes", int64_t(s.limit)}, {"hits", int64_t(s.hits)},
          {"misses", int64_t(s.misses)}, {"evicted", int64_t(s.evicted)}};
#else
  return {};
#endif
}

at::Tensor empty_large_bytes(int64_t nbytes) {
  return empty_large({nbytes}, at::TensorOptions().dtype(at::kByte));
}

}  // namespace fastcore_train::cpu
