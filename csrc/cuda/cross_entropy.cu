// CUDA kernels of fastcore_train::cross_entropy{,_backward} (the device-independent logic lives
// in common/row_loss_launch.h). Same maths as
// cpu/kernels/cross_entropy_kernel.cpp: one block per row; forward is a single read of the row
// with a per-thread online log-sum-exp merged across the block, backward one read and one write.
// Memory-bound by design: 16-byte vector accesses after each row's misaligned head.
//
// Out-of-range targets and lam outside [0, 1] trigger a device-side assert, as torch's own
// CUDA losses do: naming the bad value would need a host sync on every call.
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

// Per-thread, then per-block state of the online log-sum-exp over a row. The loss is assembled
// from differences with the max (as in the CPU kernel): lse = m + log(s) rounded to acc_t would
// lose log(s) once |m| >> 1, and a plain sum of z overflows for logits near the type's maximum.
template <typename acc_t>
struct LseState {
  acc_t m;    // running max (never NaN: a NaN logit goes into s)
  acc_t s;    // sum of exp(z - m)
  acc_t t;    // sum of (z - m), the label-smoothing term
  int64_t n;  // elements seen
};

template <typename acc_t>
__device__ __forceinline__ void lse_add(LseState<acc_t>& st, acc_t v) {
  if (v > st.m) {
    // rescale to the new max; the earlier elements' z - m all drop by v - m (to -inf when m
    // was -inf, which only -inf elements give)
    st.s = st.s * exp(st.m - v) + acc_t(1);
    if (st.n > 0) st.t += static_cast<acc_t>(st.n) * (st.m - v);
    st.m = v;
  } else if (v == -std::numeric_limits<acc_t>::infinity()) {
    st.t += v;  // z - m is -inf, also while m is still -inf (where v - m would be NaN)
  } else {
    st.s += exp(v - st.m);  // NaN propagates through s
    st.t += v - st.m;
  }
  st.n += 1;
}

template <typename acc_t>
__device__ __forceinline__ acc_t lse_shift(const LseState<acc_t>& a, acc_t m) {
  return (a.n > 0 && a.m != m) ? static_cast<acc_t>(a.n) * (a.m - m) : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> lse_merge(const LseState<acc_t>& a,
                                                     const LseState<acc_t>& b) {
  LseState<acc_t> r;
  r.m = a.m > b.m ? a.m : b.m;
  if (r.m == -std::numeric_limits<acc_t>::infinity()) {
    r.s = a.s + b.s;  // both empty or all -inf so far
  } else {
    r.s = a.s * exp(a.m - r.m) + b.s * exp(b.m - r.m);
  }
  r.t = a.t + b.t + lse_shift(a, r.m) + lse_shift(b, r.m);
  r.n = a.n + b.n;
  return r;
}

// The warp shuffle of a state, for gpu::block_reduce (found by argument-dependent lookup).
template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> shfl_down(const LseState<acc_t>& st, int o) {
  return {__shfl_down_sync(0xffffffff, st.m, o), __shfl_down_sync(0xffffffff, st.s, o),
          __shfl_down_sync(0xffffffff, st.t, o), __shfl_down_sync(0xffffffff, st.n, o)};
}

struct RowTarget {
  int64_t a, b;
  bool ignored;
};

__device__ __forceinline__ bool target_ok(int64_t v, int64_t C, int64_t ignore_index) {
  return v == ignore_index || (v >= 0 && v < C);
}

// The row's targets, each checked on its own as the CPU checks them: an ignored target does
// not excuse an out-of-range partner, and a per-row lam is checked on ignored rows too.
template <typename acc_t>
__device__ __forceinline__ RowTarget load_targets(const int64_t* target, const int64_t* target_b,
                                                  const acc_t* lam, int64_t r, int64_t C,
                                                  int64_t ignore_index) {
  RowTarget t;
  t.a = target[r];
  t.b = target_b ? target_b[r] : t.a;
  t.ignored = t.a == ignore_index || t.b == ignore_index;
  CUDA_KERNEL_ASSERT(target_ok(t.a, C, ignore_index) && target_ok(t.b, C, ignore_index));
  if (lam != nullptr) CUDA_KERNEL_ASSERT(lam[r] >= acc_t(0) && lam[r] <= acc_t(1));
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_lam(const acc_t* lam, acc_t lam_scalar, int64_t r) {
  const acc_t l = lam ? lam[r] : lam_scalar;
  CUDA_KERNEL_ASSERT(l >= acc_t(0) && l <= acc_t(1));
  return l;
}

template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> lse_identity() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0), 0};
}

// The loss and stats of row r from the state of its whole row (thread 0).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_row(const LseState<acc_t>& st, const scalar_t* x,
                                           const RowTarget& t, const acc_t* lam,
                                           acc_t lam_scalar, acc_t eps, int64_t C, int64_t r,
                                           acc_t* loss, acc_t* stats) {
  // A NaN or +inf logit, or only -inf ones, make torch's log_softmax NaN across the row: a
  // NaN second stat carries that into the loss and every gradient entry.
  const acc_t L = (isfinite(st.m) && isfinite(st.s)) ? log(st.s) : static_cast<acc_t>(NAN);
  const acc_t lm = load_lam(lam, lam_scalar, r);
  const acc_t da = st.m - static_cast<acc_t>(x[t.a]);
  const acc_t db = st.m - static_cast<acc_t>(x[t.b]);
  // One target (b == a, lam == 1) must use m - z_a itself, as the CPU kernel and the reference
  // do: the blend would be 1*inf + 0*inf, NaN for z_a = -inf where the loss is +inf.
  const acc_t dt = t.a == t.b ? da : lm * da + (acc_t(1) - lm) * db;
  stats[2 * r] = st.m;
  stats[2 * r + 1] = L;
  // Without smoothing the logit sum is not part of the loss (0 * -inf would be NaN).
  const acc_t smooth = eps != acc_t(0) ? eps / static_cast<acc_t>(C) * st.t : acc_t(0);
  loss[r] = L + (acc_t(1) - eps) * dt - smooth;
}

// Block (r, s) reads slice s of row r (gridDim.y slices, usually 1). With one slice it finishes
// the row; with more it writes its state to partials[r * slices + s] for ce_merge_kernel.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                  int64_t C, const int64_t* __restrict__ target,
                                  const int64_t* __restrict__ target_b,
                                  const acc_t* __restrict__ lam, acc_t lam_scalar, acc_t eps,
                                  int64_t ignore_index, acc_t* __restrict__ loss,
                                  acc_t* __restrict__ stats,
                                  LseState<acc_t>* __restrict__ partials) {
  const int64_t r = blockIdx.x, slices = gridDim.y;
  const RowTarget t = load_targets(target, target_b, lam, r, C, ignore_index);
  if (t.ignored) {  // uniform across the block
    if (threadIdx.x == 0 && blockIdx.y == 0) {
      loss[r] = 0;
      stats[2 * r] = 0;
      stats[2 * r + 1] = 0;
    }
    return;
  }
  const scalar_t* x = logits + r * row_stride;
  const gpu::ColumnRange cols = gpu::slice_columns(C, slices, blockIdx.y);
  const scalar_t* xs = x + cols.begin;
  LseState<acc_t> st = lse_identity<acc_t>();
  gpu::for_each_in_row<VEC>(
      xs, cols.end - cols.begin, [&](int64_t j) { lse_add(st, static_cast<acc_t>(xs[j])); },
      [&](int64_t j) {
        const Pack<scalar_t, VEC> p = gpu::load_pack<VEC>(xs + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) lse_add(st, static_cast<acc_t>(p.v[k]));
      });
  st = gpu::block_reduce(
      st, [](const LseState<acc_t>& a, const LseState<acc_t>& b) { return lse_merge(a, b); },
      lse_identity<acc_t>());
  if (threadIdx.x != 0) return;
  if (slices > 1) {
    partials[r * slices + blockIdx.y] = st;
  } else {
    finish_row(st, x, t, lam, lam_scalar, eps, C, r, loss, stats);
  }
}

// One thread per row merges its slices' states in slice order (deterministic) and finishes it.
template <typename scalar_t, typename acc_t>
__global__ void ce_merge_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                int64_t rows, int64_t C, const int64_t* __restrict__ target,
                                const int64_t* __restrict__ target_b,
                                const acc_t* __restrict__ lam, acc_t lam_scalar, acc_t eps,
                                int64_t ignore_index, acc_t* __restrict__ loss,
                                acc_t* __restrict__ stats,
                                const LseState<acc_t>* __restrict__ partials, int64_t slices) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const RowTarget t = load_targets(target, target_b, lam, r, C, ignore_index);
  if (t.ignored) return;  // written by the forward kernel
  LseState<acc_t> st = partials[r * slices];
  for (int64_t s = 1; s < slices; ++s) st = lse_merge(st, partials[r * slices + s]);
  finish_row(st, logits + r * row_stride, t, lam, lam_scalar, eps, C, r, loss, stats);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void ce_backward_kernel(const acc_t* __restrict__ grad_loss, int64_t grad_loss_stride,
                                   const scalar_t* __restrict__ logits, int64_t row_stride,
                                   int64_t C, const int64_t* __restrict__ target,
                                   const int64_t* __restrict__ target_b,
                                   const acc_t* __restrict__ lam, acc_t lam_scalar,
                                   const acc_t* __restrict__ stats, acc_t eps,
                                   int64_t ignore_index, scalar_t* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  const RowTarget t = load_targets(target, target_b, lam, r, C, ignore_index);
  // block (r, s) writes slice s of row r (gridDim.y slices, usually 1); j counts from its start
  const gpu::ColumnRange cols = gpu::slice_columns(C, gridDim.y, blockIdx.y);
  const int64_t n = cols.end - cols.begin, c0 = cols.begin;
  scalar_t* out = grad + r * C + c0;
  const scalar_t* x = logits + r * row_stride + c0;
  if (t.ignored) {
    Pack<scalar_t, VEC> zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.v[k] = scalar_t(0);
    gpu::for_each_in_row<VEC>(
        out, n, [&](int64_t j) { out[j] = scalar_t(0); },
        [&](int64_t j) { gpu::store_pack<VEC>(out + j, zero); });
    return;
  }
  const acc_t g = grad_loss[r * grad_loss_stride];
  const acc_t m = stats[2 * r], L = stats[2 * r + 1];
  const acc_t lm = load_lam(lam, lam_scalar, r);
  const acc_t off = g * eps / static_cast<acc_t>(C);
  // q's one-hot part, folded in as each column is written (no second pass, no race).
  const acc_t ga = g * (acc_t(1) - eps) * (t.a == t.b ? acc_t(1) : lm);
  const acc_t gb = g * (acc_t(1) - eps) * (acc_t(1) - lm);
  auto value = [&](acc_t z, int64_t j) {
    acc_t v = g * exp((z - m) - L) - off;  // softmax as torch's exp(log_softmax)
    if (j + c0 == t.a) v -= ga;
    if (j + c0 == t.b && t.b != t.a) v -= gb;
    return static_cast<scalar_t>(v);
  };
  // x's row and out's row are aligned alike (the launcher checks): the same columns are vectors
  gpu::for_each_in_row<VEC>(
      x, n, [&](int64_t j) { out[j] = value(static_cast<acc_t>(x[j]), j); },
      [&](int64_t j) {
        const Pack<scalar_t, VEC> p = gpu::load_pack<VEC>(x + j);
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = value(static_cast<acc_t>(p.v[k]), j + k);
        gpu::store_pack<VEC>(out + j, o);
      });
}


// The kernels of one call. Rows are read (and the gradient written) with 16-byte vectors after
// each row's misaligned head; the backward falls back to single elements only when its input
// and output rows are not aligned alike (a strided logits view). Few long rows are split
// across blocks (gpu::row_slices).
struct CudaCrossEntropy : gpu::RowLossDevice {
  // Target and lam values are checked by the kernels (device-side asserts, no host sync).
  static void check_values(const LossInputs&, int64_t, int64_t) {}

  static void forward(const CrossEntropyArgs& a) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "cross_entropy_cuda", [&] {
      using acc_t = gpu::acc_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const auto* x = static_cast<const scalar_t*>(a.logits);
      const auto* lam = static_cast<const acc_t*>(a.lam);
      auto* loss = static_cast<acc_t*>(a.loss);
      auto* stats = static_cast<acc_t*>(a.stats);
      // every row is read with 16-byte vectors after its misaligned head (for_each_in_row);
      // few long rows are split across slices, their states then merged by a second kernel
      const gpu::RowLaunch l = gpu::row_launch("cross_entropy", a.rows, a.classes, VEC);
      const int slices = l.slices;
      at::Tensor partials;
      LseState<acc_t>* partials_ptr = nullptr;
      if (slices > 1) {
        partials = at::empty({a.rows * slices * static_cast<int64_t>(sizeof(LseState<acc_t>))},
                             at::TensorOptions().dtype(at::kByte).device(
                                 at::kCUDA, at::cuda::current_device()));
        partials_ptr = reinterpret_cast<LseState<acc_t>*>(partials.mutable_data_ptr());
      }
      ce_forward_kernel<scalar_t, acc_t, VEC><<<l.grid, l.threads, 0, stream>>>(
          x, a.row_stride, a.classes, a.target, a.target_b, lam,
          static_cast<acc_t>(a.lam_scalar), static_cast<acc_t>(a.smoothing), a.ignore_index,
          loss, stats, partials_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (slices > 1) {
        ce_merge_kernel<scalar_t, acc_t>
            <<<gpu::merge_blocks(a.rows), gpu::kMergeThreads, 0, stream>>>(
            x, a.row_stride, a.rows, a.classes, a.target, a.target_b, lam,
            static_cast<acc_t>(a.lam_scalar), static_cast<acc_t>(a.smoothing), a.ignore_index,
            loss, stats, partials_ptr, slices);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  static void backward(const CrossEntropyArgs& a) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype,
                                    "cross_entropy_backward_cuda", [&] {
      using acc_t = gpu::acc_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const auto* x = static_cast<const scalar_t*>(a.logits);
      auto* out = static_cast<scalar_t*>(a.grad_logits);
      const bool vec = gpu::rows_aligned_alike<scalar_t>(x, a.row_stride, out, a.classes);
      // few long rows: each split across slices (each element is independent)
      const gpu::RowLaunch l = gpu::row_launch("cross_entropy", a.rows, a.classes, vec ? VEC : 1);
      auto launch = [&](auto kernel) {
        kernel<<<l.grid, l.threads, 0, stream>>>(
            static_cast<const acc_t*>(a.grad_loss), a.grad_loss_stride, x, a.row_stride,
            a.classes, a.target, a.target_b, static_cast<const acc_t*>(a.lam),
            static_cast<acc_t>(a.lam_scalar), static_cast<const acc_t*>(a.stats_in),
            static_cast<acc_t>(a.smoothing), a.ignore_index, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        launch(ce_backward_kernel<scalar_t, acc_t, VEC>);
      } else {
        launch(ce_backward_kernel<scalar_t, acc_t, 1>);
      }
    });
  }
};

namespace impl = row_loss_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CUDA, m) {
  m.impl("cross_entropy", &impl::cross_entropy<CudaCrossEntropy>);
  m.impl("cross_entropy_backward", &impl::cross_entropy_backward<CudaCrossEntropy>);
}

}  // namespace fastcore_train
