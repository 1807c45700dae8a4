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

// Row r of a (row stride sa) and of b (row stride sb) have the same offset from a 16-byte
// boundary for every r, so one for_each_in_row can read the one and write the other with
// 16-byte vectors, whatever C (a C = 50257 vocabulary starts each row somewhere else).
template <typename T>
bool rows_aligned_alike(const void* a, int64_t sa, const void* b, int64_t sb) {
  return reinterpret_cast<uintptr_t>(a) % 16 == reinterpret_cast<uintptr_t>(b) % 16 &&
         ((sa - sb) * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// Visits the columns [0, C) of a row starting at `row`, spread over the block's threads: single
// columns up to the first 16-byte boundary, then VEC columns at a time (at 16-byte aligned
// addresses of `row` and of every row aligned alike), then single columns to the end. one(j)
// handles column j, many(j) columns [j, j + VEC). VEC == 1: one column at a time throughout.
template <int VEC, typename T, typename One, typename Many>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t C, One one, Many many) {
  int64_t head = 0;
  if (VEC > 1) {
    const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) % 16);
    // a row not even aligned to its element size (memory from outside torch) never reaches
    // a 16-byte boundary in whole elements: single columns throughout
    if (mis % sizeof(T) != 0) {
      head = C;
    } else if (mis != 0) {
      head = static_cast<int64_t>((16 - mis) / sizeof(T));
    }
    if (head > C) head = C;
  }
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) one(j);
  const int64_t nvec = (C - head) / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) many(head + i * VEC);
  for (int64_t j = head + nvec * VEC + threadIdx.x; j < C; j += blockDim.x) one(j);
}

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
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
