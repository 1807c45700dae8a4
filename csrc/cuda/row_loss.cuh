// What the CUDA cross-entropy and binary cross-entropy share under common/row_loss_launch.h:
// allocation and the two reductions over rows, each one single-block kernel (a sum and a
// division as torch ops, plus counting the rows not ignored, were 4-6 launches per call).
// Both sum in float64 in a fixed order, as the CPU does: deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common/row_loss_args.h"
#include "cuda/common.cuh"

namespace fastcore_train::gpu {

constexpr int kReduceThreads = 1024;

// count(c) over the block (every thread must call it; valid in thread 0).
__device__ __forceinline__ double block_count(const RowCount& c) {
  if (c.target == nullptr) return static_cast<double>(c.fixed);
  const int64_t* b = c.target_b != nullptr ? c.target_b : c.target;
  int64_t n = 0;
  for (int64_t i = threadIdx.x; i < c.rows; i += blockDim.x) {
    n += c.target[i] != c.ignore_index && b[i] != c.ignore_index;
  }
  return static_cast<double>(block_sum(n));
}

template <typename acc_t>
__global__ void reduce_rows_kernel(const acc_t* __restrict__ rows, int64_t n, RowCount c,
                                   bool mean, acc_t* __restrict__ out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(rows[i]);
  s = block_sum(s);
  const double count = mean ? block_count(c) : 1.0;
  // a mean of no rows is 0/0 = NaN, as in torch
  if (threadIdx.x == 0) *out = static_cast<acc_t>(mean ? s / count : s);
}

template <typename acc_t>
__global__ void scale_grad_kernel(const acc_t* __restrict__ grad, RowCount c,
                                  acc_t* __restrict__ out) {
  const double count = block_count(c);
  if (threadIdx.x == 0) *out = static_cast<acc_t>(static_cast<double>(*grad) / count);
}

// ---- long rows: a row split across blocks --------------------------------------------------
//
// One block per row leaves most of the GPU idle when there are few rows (B = 8 rows of a
// 256k vocabulary fill 8 of 132 SMs): the launcher then gives each row `slices` blocks along
// gridDim.y, each taking a contiguous range of columns.

constexpr int64_t kMinSliceColumns = 16384;  // below this a block's setup costs more than it saves

// Blocks per row: enough for about two blocks per SM, none with fewer than kMinSliceColumns.
inline int row_slices(int64_t rows, int64_t C) {
  if (rows <= 0) return 1;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (2 * sms + rows - 1) / rows;
  int64_t s = std::min(want, C / kMinSliceColumns);
  s = std::min<int64_t>(s, 65535);  // gridDim.y
  return static_cast<int>(std::max<int64_t>(s, 1));
}

// The launch of a row kernel: blockIdx.x the row, blockIdx.y its slice (usually 1), threads
// for a slice's columns read `vec` at a time (a warp at least, also for C == 0).
struct RowLaunch {
  dim3 grid;
  int threads;
  int slices;
};

inline RowLaunch row_launch(const char* op, int64_t rows, int64_t C, int vec) {
  const int slices = row_slices(rows, C);
  return {dim3(blocks_for_rows(op, rows), static_cast<unsigned>(slices)),
          threads_for((C + slices - 1) / slices, vec), slices};
}

// The kernels that merge a split row's slices run one thread per row.
constexpr int kMergeThreads = 128;

inline unsigned merge_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads);
}

// Columns [begin, end) of slice `s` of `slices` (multiples of 64 apart; the last ones may be
// empty).
struct ColumnRange {
  int64_t begin, end;
};

__device__ __forceinline__ ColumnRange slice_columns(int64_t C, int64_t slices, int64_t s) {
  const int64_t len = ((C + slices - 1) / slices + 63) / 64 * 64;
  const int64_t begin = s * len < C ? s * len : C;
  const int64_t end = begin + len < C ? begin + len : C;
  return {begin, end};
}

struct RowLossDevice {
  using Guard = DeviceGuard;

  static at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  static at::Tensor reduce(const at::Tensor& rows, const RowCount& c, bool mean) {
    at::Tensor loss = at::empty({}, rows.options());
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_loss_reduce", [&] {
      reduce_rows_kernel<scalar_t><<<1, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          rows.const_data_ptr<scalar_t>(), rows.numel(), c, mean,
          loss.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return loss;
  }

  static at::Tensor scale_grad(const at::Tensor& grad_loss, const RowCount& c,
                               at::ScalarType acc) {
    const at::Tensor g = grad_loss.to(acc);
    at::Tensor out = at::empty({1}, g.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "row_loss_scale_grad", [&] {
      scale_grad_kernel<scalar_t><<<1, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), c, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
};

}  // namespace fastcore_train::gpu
