// CUDA kernels of fastcore_train::cross_entropy{,_backward} (the device-independent logic lives
// in common/row_loss_launch.h). Same maths as
// cpu/kernels/cross_entropy_kernel.cpp: one block per row; forward is a single read of the row
// with a per-thread online log-sum-exp merged across the block, backward one read and one write.
// Memory-bound by design: 16-byte vector accesses when the rows are aligned.
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

template <typename scalar_t, typename acc_t, int VEC>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                  int64_t C, const int64_t* __restrict__ target,
                                  const int64_t* __restrict__ target_b,
                                  const acc_t* __restrict__ lam, acc_t lam_scalar, acc_t eps,
                                  int64_t ignore_index, acc_t* __restrict__ loss,
                                  acc_t* __restrict__ stats) {
  const int64_t r = blockIdx.x;
  const RowTarget t = load_targets(target, target_b, lam, r, C, ignore_index);
  if (t.ignored) {  // uniform across the block
    if (threadIdx.x == 0) {
      loss[r] = 0;
      stats[2 * r] = 0;
      stats[2 * r + 1] = 0;
    }
    return;
  }
  const scalar_t* x = logits + r * row_stride;
  LseState<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0), 0};
  const int64_t nvec = C / VEC;
  const auto* xv = reinterpret_cast<const Pack<scalar_t, VEC>*>(x);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<scalar_t, VEC> p = xv[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) lse_add(st, static_cast<acc_t>(p.v[k]));
  }
  for (int64_t j = nvec * VEC + threadIdx.x; j < C; j += blockDim.x) {
    lse_add(st, static_cast<acc_t>(x[j]));
  }
  st = gpu::block_reduce(
      st, [](const LseState<acc_t>& a, const LseState<acc_t>& b) { return lse_merge(a, b); },
      LseState<acc_t>{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0), 0});
  if (threadIdx.x == 0) {
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
  scalar_t* out = grad + r * C;
  const scalar_t* x = logits + r * row_stride;
  const int64_t nvec = C / VEC;
  auto* outv = reinterpret_cast<Pack<scalar_t, VEC>*>(out);
  if (t.ignored) {
    Pack<scalar_t, VEC> zero;
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero.v[k] = scalar_t(0);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) outv[i] = zero;
    for (int64_t j = nvec * VEC + threadIdx.x; j < C; j += blockDim.x) out[j] = scalar_t(0);
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
    if (j == t.a) v -= ga;
    if (j == t.b && t.b != t.a) v -= gb;
    return static_cast<scalar_t>(v);
  };
  const auto* xv = reinterpret_cast<const Pack<scalar_t, VEC>*>(x);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<scalar_t, VEC> p = xv[i];
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = value(static_cast<acc_t>(p.v[k]), i * VEC + k);
    outv[i] = o;
  }
  for (int64_t j = nvec * VEC + threadIdx.x; j < C; j += blockDim.x) {
    out[j] = value(static_cast<acc_t>(x[j]), j);
  }
}


// The kernels of one call: 16-byte vectors when every row is aligned, else scalar accesses.
struct CudaCrossEntropy : gpu::RowLossDevice {
  // Target and lam values are checked by the kernels (device-side asserts, no host sync).
  static void check_values(const LossInputs&, int64_t, int64_t) {}

  static void forward(const CrossEntropyArgs& a) {
    const unsigned blocks = gpu::blocks_for_rows("cross_entropy", a.rows);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "cross_entropy_cuda", [&] {
      using acc_t = gpu::acc_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const auto* x = static_cast<const scalar_t*>(a.logits);
      const bool vec = gpu::rows_aligned<scalar_t>(x, a.row_stride);
      const int threads = gpu::threads_for(a.classes, vec ? VEC : 1);
      auto launch = [&](auto kernel) {
        kernel<<<blocks, threads, 0, stream>>>(
            x, a.row_stride, a.classes, a.target, a.target_b, static_cast<const acc_t*>(a.lam),
            static_cast<acc_t>(a.lam_scalar), static_cast<acc_t>(a.smoothing), a.ignore_index,
            static_cast<acc_t*>(a.loss), static_cast<acc_t*>(a.stats));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        launch(ce_forward_kernel<scalar_t, acc_t, VEC>);
      } else {
        launch(ce_forward_kernel<scalar_t, acc_t, 1>);
      }
    });
  }

  static void backward(const CrossEntropyArgs& a) {
    const unsigned blocks = gpu::blocks_for_rows("cross_entropy", a.rows);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype,
                                    "cross_entropy_backward_cuda", [&] {
      using acc_t = gpu::acc_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const auto* x = static_cast<const scalar_t*>(a.logits);
      auto* out = static_cast<scalar_t*>(a.grad_logits);
      const bool vec = gpu::rows_aligned<scalar_t>(x, a.row_stride) &&
                       gpu::rows_aligned<scalar_t>(out, a.classes);
      const int threads = gpu::threads_for(a.classes, vec ? VEC : 1);
      auto launch = [&](auto kernel) {
        kernel<<<blocks, threads, 0, stream>>>(
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
