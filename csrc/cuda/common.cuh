// What every CUDA kernel file shares: the device-guard idiom, the accumulation type, vector
// packs for 16-byte loads and stores, and the warp/block reductions. One definition each, so
// reading one op teaches the others.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace fastcore_train::gpu {

// Makes t's device current when t is on CUDA. A call reaches a CUDA kernel when any argument is
// on CUDA; a CUDAGuard built from a CPU tensor's device would throw a bare error before the
// shared checks could name the device mismatch as the CPU backend does.
class DeviceGuard {
 public:
  explicit DeviceGuard(const at::Tensor& t) {
    if (t.defined() && t.is_cuda()) guard_.set_device(t.device());
  }

 private:
  c10::cuda::OptionalCUDAGuard guard_;
};

// float for float/half/bfloat16, double for double: torch's CUDA accumulation type.
template <typename T>
using acc_t = at::acc_type<T, /*is_cuda=*/true>;

// N elements of T loaded or stored as one aligned access (16 bytes for the usual N).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One block per row: gridDim.x is at most 2^31 - 1, so a larger B would fail to launch, or from
// 2^32 on be truncated by the conversion to dim3 and leave rows unwritten.
inline unsigned blocks_for_rows(const char* op, int64_t B) {
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max(), op,
                    ": the CUDA kernel handles at most 2^31 - 1 rows, got ", B);
  return static_cast<unsigned>(B);
}

// Threads for one row of C elements read `vec` at a time: a power of two from a warp up to 512.
inline int threads_for(int64_t C, int vec) {
  constexpr int kMaxThreads = 512;
  const int64_t want = (C + vec - 1) / vec;
  int threads = 32;
  while (threads < kMaxThreads && threads < want) threads *= 2;
  return threads;
}

// 16-byte vector accesses need every row of p 16-byte aligned.
template <typename T>
bool rows_aligned(const void* p, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (row_stride * sizeof(T)) % 16 == 0;
}

// shfl_down for the reductions below; a struct state provides its own overload.
template <typename T>
__device__ __forceinline__ T shfl_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

// Reduces v over the block with merge(a, b) (associative), `identity` for missing warps; the
// result is valid in thread 0. The order of the merges is fixed by the block shape, so the
// result is deterministic. T must be trivially constructible (it lives in shared memory), and
// every thread of the block must call it.
template <typename T, typename Merge>
__device__ T block_reduce(T v, Merge merge, T identity) {
  __shared__ T partial[32];
  __syncthreads();  // a previous call's warp 0 may still be reading `partial`
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_down(v, o));
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? partial[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_down(v, o));
  }
  return v;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  return block_reduce(v, [](A a, A b) { return a + b; }, A(0));
}

}  // namespace fastcore_train::gpu
