// CUDA kernels of fastcore_train::binary_cross_entropy{,_backward} (the device-independent
// logic lives in common/row_loss_launch.h). Same maths as
// cpu/kernels/bce_kernel.cpp (see its header and fastcore_train/ops/binary_cross_entropy.py):
//
//   loss = c |z| + w log1p(exp(-|z|)),   c = 1 - q (z >= 0),  pw q (z < 0),  w = 1 + (pw - 1) q
//   dloss/dz = (1 - q) - w sigmoid(-z) (z >= 0),   w sigmoid(z) - pw q (z < 0)
//
// Here every element is evaluated with its own q (off, or q_a / q_b at the target columns), so
// nothing is masked or written twice. One block per row: the reduced forward sums its row (block
// reduction) and writes one value; reduction none and the backward write each element once.
// 16-byte vector loads (and stores of the gradient) after each row's misaligned head.
//
// Out-of-range targets and lam outside [0, 1] trigger a device-side assert, as torch's own CUDA
// losses do: naming the bad value would need a host sync on every call.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <limits>

#include "common/row_loss_launch.h"
#include "cuda/common.cuh"
#include "cuda/row_loss.cuh"

namespace fastcore_train {
namespace {

using gpu::Pack;

template <typename acc_t>
__device__ __forceinline__ acc_t elem_loss(acc_t z, acc_t q, acc_t pw) {
  if (z == -std::numeric_limits<acc_t>::infinity()) {
    return std::numeric_limits<acc_t>::quiet_NaN();  // torch's value: its form adds -inf + inf
  }
  const acc_t w = acc_t(1) + (pw - acc_t(1)) * q;
  const acc_t a = fabs(z);
  const acc_t c = z >= acc_t(0) ? acc_t(1) - q : pw * q;  // NaN z: c * NaN
  return c * a + w * log1p(exp(-a));
}

template <typename acc_t>
__device__ __forceinline__ acc_t elem_grad(acc_t z, acc_t q, acc_t pw) {
  const acc_t w = acc_t(1) + (pw - acc_t(1)) * q;
  const acc_t e = exp(-fabs(z));
  const acc_t s = e / (acc_t(1) + e);  // sigmoid(-|z|)
  return z >= acc_t(0) ? (acc_t(1) - q) - w * s : w * s - pw * q;
}

// A row's two target columns and their q (b == a for one target, or two equal ones: q = on).
template <typename acc_t>
struct RowQ {
  int64_t a, b;
  acc_t qa, qb, off;
  __device__ __forceinline__ acc_t at(int64_t j) const {
    return j == a ? qa : (j == b ? qb : off);
  }
};

template <typename acc_t>
__device__ __forceinline__ RowQ<acc_t> load_row(const int64_t* target, const int64_t* target_b,
                                                const acc_t* lam, acc_t lam_scalar, int64_t r,
                                                int64_t C, acc_t off, acc_t on) {
  RowQ<acc_t> t;
  t.a = target[r];
  t.b = target_b ? target_b[r] : t.a;
  t.off = off;
  CUDA_KERNEL_ASSERT(t.a >= 0 && t.a < C && t.b >= 0 && t.b < C);
  const acc_t l = lam ? lam[r] : lam_scalar;
  CUDA_KERNEL_ASSERT(l >= acc_t(0) && l <= acc_t(1));
  if (t.a == t.b) {
    t.qa = t.qb = on;
  } else {
    t.qa = l * on + (acc_t(1) - l) * off;
    t.qb = (acc_t(1) - l) * on + l * off;
  }
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t pw_at(const acc_t* pos_weight, int64_t j) {
  return pos_weight ? pos_weight[j] : acc_t(1);
}

struct Args {
  int64_t C, row_stride;
  const int64_t* target;
  const int64_t* target_b;
};

// kElementwise: write each element's loss to out (B, C); else the row's sum to out[r]. Block
// (r, s) takes slice s of row r (gridDim.y slices, usually 1); with several, a row's sums go to
// partials[r * slices + s] for bce_merge_kernel.
template <typename scalar_t, typename acc_t, int VEC, bool kElementwise>
__global__ void bce_forward_kernel(const scalar_t* __restrict__ logits, Args args,
                                   const acc_t* __restrict__ lam, acc_t lam_scalar, acc_t off,
                                   acc_t on, const acc_t* __restrict__ pos_weight,
                                   acc_t* __restrict__ out, acc_t* __restrict__ partials) {
  const int64_t r = blockIdx.x, C = args.C;
  const RowQ<acc_t> t = load_row(args.target, args.target_b, lam, lam_scalar, r, C, off, on);
  const gpu::ColumnRange cols = gpu::slice_columns(C, gridDim.y, blockIdx.y);
  const int64_t c0 = cols.begin;
  const scalar_t* x = logits + r * args.row_stride + c0;
  acc_t sum = 0;
  auto visit = [&](acc_t z, int64_t j) {
    const acc_t v = elem_loss(z, t.at(j + c0), pw_at(pos_weight, j + c0));
    if constexpr (kElementwise) {
      out[r * C + c0 + j] = v;
    } else {
      sum += v;
    }
  };
  gpu::for_each_in_row<VEC>(
      x, cols.end - c0, [&](int64_t j) { visit(static_cast<acc_t>(x[j]), j); },
      [&](int64_t j) {
        const Pack<scalar_t, VEC> p = gpu::load_pack<VEC>(x + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) visit(static_cast<acc_t>(p.v[k]), j + k);
      });
  if constexpr (!kElementwise) {
    sum = gpu::block_sum(sum);
    if (threadIdx.x != 0) return;
    if (gridDim.y > 1) {
      partials[r * gridDim.y + blockIdx.y] = sum;
    } else {
      out[r] = sum;
    }
  }
}

// One thread per row adds its slices' sums in slice order (deterministic).
template <typename acc_t>
__global__ void bce_merge_kernel(const acc_t* __restrict__ partials, int64_t rows,
                                 int64_t slices, acc_t* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  acc_t sum = partials[r * slices];
  for (int64_t s = 1; s < slices; ++s) sum += partials[r * slices + s];
  out[r] = sum;
}

// g: the upstream gradient of element (r, j) is g[r * g_row_stride + j * g_col_stride] (strides
// 0 for a reduced loss: one device value, the mean's 1/(B*C) already applied).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void bce_backward_kernel(const acc_t* __restrict__ g, int64_t g_row_stride,
                                    int64_t g_col_stride, const scalar_t* __restrict__ logits,
                                    Args args, const acc_t* __restrict__ lam, acc_t lam_scalar,
                                    acc_t off, acc_t on, const acc_t* __restrict__ pos_weight,
                                    scalar_t* __restrict__ grad) {
  const int64_t r = blockIdx.x, C = args.C;
  const RowQ<acc_t> t = load_row(args.target, args.target_b, lam, lam_scalar, r, C, off, on);
  // block (r, s) writes slice s of row r (gridDim.y slices, usually 1); j counts from its start
  const gpu::ColumnRange cols = gpu::slice_columns(C, gridDim.y, blockIdx.y);
  const int64_t c0 = cols.begin;
  const scalar_t* x = logits + r * args.row_stride + c0;
  scalar_t* out = grad + r * C + c0;
  const acc_t* g_row = g + r * g_row_stride + c0 * g_col_stride;
  auto value = [&](acc_t z, int64_t j) {
    const acc_t v =
        g_row[j * g_col_stride] * elem_grad(z, t.at(j + c0), pw_at(pos_weight, j + c0));
    return static_cast<scalar_t>(v);
  };
  // x's row and out's row are aligned alike (the launcher checks): the same columns are vectors
  gpu::for_each_in_row<VEC>(
      x, cols.end - c0, [&](int64_t j) { out[j] = value(static_cast<acc_t>(x[j]), j); },
      [&](int64_t j) {
        const Pack<scalar_t, VEC> p = gpu::load_pack<VEC>(x + j);
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = value(static_cast<acc_t>(p.v[k]), j + k);
        gpu::store_pack<VEC>(out + j, o);
      });
}

template <typename acc_t>
const acc_t* as_acc(const void* p) {
  return static_cast<const acc_t*>(p);
}

// The kernels of one call. Rows are read (and the gradient written) with 16-byte vectors after
// each row's misaligned head; the backward falls back to single elements only when its input
// and output rows are not aligned alike (a strided logits view). Few long rows are split across
// blocks (gpu::row_slices).
struct CudaBce : gpu::RowLossDevice {
  // Target and lam values are checked by the kernels (device-side asserts, no host sync).
  static void check_values(const LossInputs&, int64_t) {}

  // q off the target columns and at them (label smoothing spread over the C columns).
  static double off_value(const BceArgs& a) {
    return a.classes > 0 ? a.smoothing / static_cast<double>(a.classes) : 0.0;
  }

  static void forward(const BceArgs& a) {
    const double off = off_value(a), on = 1.0 - a.smoothing + off;
    const Args args{a.classes, a.row_stride, a.target, a.target_b};
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype,
                                    "binary_cross_entropy_cuda", [&] {
      using acc_t = gpu::acc_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const auto* x = static_cast<const scalar_t*>(a.logits);
      auto* loss = static_cast<acc_t*>(a.loss);
      // every row is read with 16-byte vectors after its misaligned head (for_each_in_row);
      // few long rows are split across slices, their row sums then merged; C == 0 (every
      // target out of range) still runs one warp per row: its assert says so
      const gpu::RowLaunch l = gpu::row_launch("binary_cross_entropy", a.rows, a.classes, VEC);
      const int slices = l.slices;
      at::Tensor partials;
      if (slices > 1 && !a.elementwise) {
        partials = at::empty({a.rows * slices}, at::TensorOptions()
                                                    .dtype(c10::CppTypeToScalarType<acc_t>::value)
                                                    .device(at::kCUDA, at::cuda::current_device()));
      }
      acc_t* partials_ptr = partials.defined() ? partials.mutable_data_ptr<acc_t>() : nullptr;
      auto launch = [&](auto kernel) {
        kernel<<<l.grid, l.threads, 0, stream>>>(
            x, args, as_acc<acc_t>(a.lam), static_cast<acc_t>(a.lam_scalar),
            static_cast<acc_t>(off), static_cast<acc_t>(on), as_acc<acc_t>(a.pos_weight), loss,
            partials_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (a.elementwise) {
        launch(bce_forward_kernel<scalar_t, acc_t, VEC, true>);
      } else {
        launch(bce_forward_kernel<scalar_t, acc_t, VEC, false>);
      }
      if (partials_ptr != nullptr) {
        bce_merge_kernel<acc_t><<<gpu::merge_blocks(a.rows), gpu::kMergeThreads, 0, stream>>>(
            partials_ptr, a.rows, slices, loss);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  static void backward(const BceArgs& a) {
    const double off = off_value(a), on = 1.0 - a.smoothing + off;
    const Args args{a.classes, a.row_stride, a.target, a.target_b};
    // (B, C) upstream gradient for reduction none, else one value: strides 0
    const int64_t g_row_stride = a.grad_per_element ? a.classes : 0;
    const int64_t g_col_stride = a.grad_per_element ? 1 : 0;
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype,
                                    "binary_cross_entropy_backward_cuda", [&] {
      using acc_t = gpu::acc_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const auto* x = static_cast<const scalar_t*>(a.logits);
      auto* out = static_cast<scalar_t*>(a.grad_logits);
      const bool vec = gpu::rows_aligned_alike<scalar_t>(x, a.row_stride, out, a.classes);
      // few long rows: each split across slices (each element is independent)
      const gpu::RowLaunch l =
          gpu::row_launch("binary_cross_entropy", a.rows, a.classes, vec ? VEC : 1);
      auto launch = [&](auto kernel) {
        kernel<<<l.grid, l.threads, 0, stream>>>(
            as_acc<acc_t>(a.grad_loss), g_row_stride, g_col_stride, x, args,
            as_acc<acc_t>(a.lam), static_cast<acc_t>(a.lam_scalar), static_cast<acc_t>(off),
            static_cast<acc_t>(on), as_acc<acc_t>(a.pos_weight), out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        launch(bce_backward_kernel<scalar_t, acc_t, VEC>);
      } else {
        launch(bce_backward_kernel<scalar_t, acc_t, 1>);
      }
    });
  }
};

namespace impl = row_loss_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CUDA, m) {
  m.impl("binary_cross_entropy", &impl::binary_cross_entropy<CudaBce>);
  m.impl("binary_cross_entropy_backward", &impl::binary_cross_entropy_backward<CudaBce>);
}

}  // namespace fastcore_train
