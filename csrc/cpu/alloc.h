// Large CPU output buffers backed by transparent huge pages.
//
// A fresh multi-GB output costs one page fault per 4 KiB page on first touch (glibc hands
// big blocks back to the OS on free, so every step pays again); for a (8192, 32000) float
// gradient the faults cost more than the kernel itself. Asking for 2 MiB pages cuts the
// number of faults 512-fold, and freed blocks are kept for reuse (bounded by what the workload
// reuses, see alloc.cpp, and by FASTCORE_TRAIN_CACHE_MB), so a step that asks for the same sizes
// as the last one faults not at all. Set FASTCORE_TRAIN_HUGEPAGES=0 to use torch's allocator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

namespace fastcore_train::cpu {

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);
// The same with explicit strides (e.g. channels_last); they must describe a dense tensor.
at::Tensor empty_large(at::IntArrayRef sizes, at::IntArrayRef strides,
                       const at::TensorOptions& options);

// Frees the cached blocks (not those in use); returns the bytes released.
size_t release_cached_blocks();
// Bytes held by cached blocks not in use.
size_t cached_block_bytes();
// cached_bytes, in_use_bytes, limit_bytes (the current bound on cached bytes), hits, misses,
// evicted: for `fastcore-train info` and the tests of the cache policy.
std::map<std::string, int64_t> large_block_stats();
// A uint8 tensor of nbytes from empty_large (tests of the cache policy).
at::Tensor empty_large_bytes(int64_t nbytes);

}  // namespace fastcore_train::cpu
