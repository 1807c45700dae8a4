#include "cpu/alloc.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastcore_train::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// glibc serves blocks below its largest mmap threshold (32 MiB on 64-bit) from a heap it
// reuses without faults, which beats fresh huge pages; above it every block is a fresh mmap.
constexpr size_t kThreshold = size_t(32) << 20;

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTCORE_TRAIN_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

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
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) == 0) {
      madvise(p, bytes, MADV_HUGEPAGE);  // advisory: failure just means 4 KiB pages
      return at::from_blob(p, sizes, strides, [](void* q) { std::free(q); }, options);
    }
  }
#endif
  return at::empty_strided(sizes, strides, options);
}

}  // namespace fastcore_train::cpu
