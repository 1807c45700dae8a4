// CUDA implementation of the fastcore_train mixup and cutmix operators. Checks, layout and
// allocation are shared with the CPU (common/mixup_launch.h); this file has the kernels.
//
// Blend: blockIdx.y walks the samples, the x dimension of the grid the elements of a sample,
// 16 bytes per thread access when the rows are aligned. In place, the block of the pair's
// leader (i <= perm[i]) reads both rows and writes both, so no element is read after its
// partner overwrote it; the other block of the pair has nothing to do.
// Cutmix: one warp per image row (of all planes of all samples), its lanes the elements of the
// row; the row's index arithmetic (a division, 32-bit when the sizes allow) once per warp and
// row. A paste copies each row as up to three segments (outside, inside, outside the box), each
// in 16-byte words when its source and destination are aligned alike.
//
// The permutation, lam and the boxes are checked on the device before any kernel reads through
// them (common/mixup_launch.h: device-side asserts, no host sync); the kernels clamp box columns
// to the row all the same, so nothing is written outside a row.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/mixup_launch.h"
#include "cuda/common.cuh"

namespace fastcore_train {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 1024;

using gpu::Pack;
using gpu::acc_t;

// The weights (a_i, b_i) of out[i] = a_i x[i] + b_i x[src[i]] (see common/mixup_args.h).
template <typename A>
__device__ __forceinline__ void weights(const BlendArgs& a, int64_t i, A& wa, A& wb) {
  if (a.lam == nullptr) {
    wa = static_cast<A>(a.lam_scalar);
    wb = static_cast<A>(1.0 - a.lam_scalar);
  } else {
    const A* lam = static_cast<const A*>(a.lam);
    wa = lam[i];
    wb = A(1) - lam[a.lam_from_source ? a.src[i] : i];
  }
}

// a*x + b*y rounded as the CPU kernels round it, fma(a, x, b*y): written out, because nvcc may
// contract `a*x + b*y` either way round and the two backends would differ in the last bit.
template <typename A>
__device__ __forceinline__ A blend(A a, A x, A b, A y) {
  return fma(a, x, b * y);
}

template <typename T, int VEC>
__global__ void blend_kernel(const BlendArgs a) {
  using A = acc_t<T>;
  using P = Pack<T, VEC>;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t nvec = a.n / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = blockIdx.y; i < a.batch; i += gridDim.y) {
    const int64_t s = a.src[i];
    A ai, bi;
    weights(a, i, ai, bi);
    if (!a.pairs) {
      const P* xi = reinterpret_cast<const P*>(x + i * a.x_stride);
      const P* xs = reinterpret_cast<const P*>(x + s * a.x_stride);
      P* oi = reinterpret_cast<P*>(out + i * a.out_stride);
      for (int64_t k = first; k < nvec; k += step) {
        const P p = xi[k], q = xs[k];
        P r;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          r.v[e] = static_cast<T>(blend(ai, static_cast<A>(p.v[e]), bi, static_cast<A>(q.v[e])));
        }
        oi[k] = r;
      }
      continue;
    }
    if (s < i) continue;  // the leader of the pair does both rows
    P* oi = reinterpret_cast<P*>(out + i * a.out_stride);
    P* os = reinterpret_cast<P*>(out + s * a.out_stride);
    A as_, bs;
    weights(a, s, as_, bs);
    for (int64_t k = first; k < nvec; k += step) {
      const P p = oi[k], q = os[k];
      P r, t;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A u = static_cast<A>(p.v[e]), w = static_cast<A>(q.v[e]);
        r.v[e] = static_cast<T>(blend(ai, u, bi, w));
        t.v[e] = static_cast<T>(blend(as_, w, bs, u));
      }
      oi[k] = r;
      if (s != i) os[k] = t;
    }
  }
}

template <typename T>
void launch_blend(const BlendArgs& a) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = a.n % kVec == 0 && a.x_stride % kVec == 0 && a.out_stride % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  const int vec = aligned ? kVec : 1;
  const int64_t nvec = a.n / vec;
  const dim3 grid(static_cast<unsigned>(std::min(kMaxGridX, (nvec + kThreads - 1) / kThreads)),
                  static_cast<unsigned>(std::min(kMaxGridY, a.batch)));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (aligned) {
    blend_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a);
  } else {
    blend_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- cutmix --------------------------------------------------------------------------------

struct RowPos {
  int64_t i, h;   // sample, row within the plane
  int64_t base;   // element offset of the row within a sample
};

__device__ __forceinline__ RowPos row_pos(const CutmixArgs& a, int64_t r) {
  const int64_t per_sample = a.planes * a.rows;
  RowPos p;
  int64_t pr;  // plane * rows + h
  if (r <= UINT32_MAX && per_sample <= UINT32_MAX) {  // the usual case: 32-bit divisions
    const auto r32 = static_cast<uint32_t>(r), ps32 = static_cast<uint32_t>(per_sample);
    p.i = r32 / ps32;
    pr = r32 - static_cast<uint32_t>(p.i) * ps32;
    p.h = static_cast<uint32_t>(pr) % static_cast<uint32_t>(a.rows);
  } else {
    p.i = r / per_sample;
    pr = r - p.i * per_sample;
    p.h = pr % a.rows;
  }
  p.base = pr * a.row_len;
  return p;
}

__device__ __forceinline__ const int64_t* box_of(const CutmixArgs& a, int64_t i) {
  return a.boxes ? a.boxes + 4 * i : a.box;
}

// The box's columns [c0, c1) in elements of a row, clamped to the row.
struct Cols {
  int64_t c0, c1;
};

__device__ __forceinline__ Cols box_cols(const CutmixArgs& a, const int64_t* b) {
  int64_t c0 = b[2] * a.col_unit, c1 = b[3] * a.col_unit;
  c0 = c0 < 0 ? 0 : (c0 > a.row_len ? a.row_len : c0);
  c1 = c1 < c0 ? c0 : (c1 > a.row_len ? a.row_len : c1);
  return {c0, c1};
}

constexpr int kWarps = kThreads / 32;  // rows in flight per block

// Rows of all planes of all samples, one per warp; `body(r, lane)` for each.
template <typename Body>
__device__ __forceinline__ void for_each_row(const CutmixArgs& a, Body body) {
  const int64_t nrows = a.batch * a.planes * a.rows;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < nrows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    body(r, lane);
  }
}

// dst[0, n) = src[0, n) by one warp: 16-byte words between the first and last 16-byte
// boundaries when src and dst are aligned alike, element words elsewhere.
template <typename U>
__device__ __forceinline__ void warp_copy(const U* __restrict__ src, U* __restrict__ dst,
                                          int64_t n, int lane) {
  int64_t done = 0;
  const auto ms = reinterpret_cast<uintptr_t>(src) % 16;
  if (sizeof(U) < 16 && ms % sizeof(U) == 0 && ms == reinterpret_cast<uintptr_t>(dst) % 16) {
    int64_t head = ms == 0 ? 0 : static_cast<int64_t>((16 - ms) / sizeof(U));
    head = head < n ? head : n;
    for (int64_t j = lane; j < head; j += 32) dst[j] = src[j];
    const int64_t words = (n - head) * static_cast<int64_t>(sizeof(U)) / 16;
    const auto* s4 = reinterpret_cast<const uint4*>(src + head);
    auto* d4 = reinterpret_cast<uint4*>(dst + head);
    for (int64_t k = lane; k < words; k += 32) d4[k] = s4[k];
    done = head + words * 16 / static_cast<int64_t>(sizeof(U));
  }
  for (int64_t j = done + lane; j < n; j += 32) dst[j] = src[j];
}

// out = x outside the box, x[src] inside: every element written once (U: element-sized word).
// out != x (and does not overlap it): each element read once, from the sample it comes from.
template <typename U>
__global__ void cutmix_paste_kernel(const CutmixArgs a) {
  const U* x = static_cast<const U*>(a.x);
  U* out = static_cast<U*>(a.out);
  for_each_row(a, [&](int64_t r, int lane) {
    const RowPos p = row_pos(a, r);
    const int64_t* b = box_of(a, p.i);
    const U* xi = x + p.i * a.x_stride + p.base;
    U* o = out + p.i * a.out_stride + p.base;
    if (!(p.h >= b[0] && p.h < b[1])) {
      warp_copy(xi, o, a.row_len, lane);
      return;
    }
    const Cols c = box_cols(a, b);
    const U* xs = x + a.src[p.i] * a.x_stride + p.base;
    warp_copy(xi, o, c.c0, lane);
    warp_copy(xs + c.c0, o + c.c0, c.c1 - c.c0, lane);
    warp_copy(xi + c.c1, o + c.c1, a.row_len - c.c1, lane);
  });
}

// In place, pairs (i, j = src[i]): the thread of an element reads it from both samples and
// writes it where it falls in a box, so the swap needs no buffer and touches only the boxes.
template <typename U>
__global__ void cutmix_swap_kernel(const CutmixArgs a) {
  U* out = static_cast<U*>(a.out);
  for_each_row(a, [&](int64_t r, int lane) {
    const RowPos p = row_pos(a, r);
    const int64_t j = a.src[p.i];
    if (j <= p.i) return;  // the pair's leader does the work; fixed points stay
    const int64_t* bi = box_of(a, p.i);
    const int64_t* bj = box_of(a, j);
    const bool row_i = p.h >= bi[0] && p.h < bi[1];
    const bool row_j = p.h >= bj[0] && p.h < bj[1];
    if (!row_i && !row_j) return;
    const Cols ci = box_cols(a, bi), cj = box_cols(a, bj);
    U* ri = out + p.i * a.out_stride + p.base;
    U* rj = out + j * a.out_stride + p.base;
    // only the union of the two boxes' columns in this row
    const int64_t lo = !row_j ? ci.c0 : (!row_i ? cj.c0 : (ci.c0 < cj.c0 ? ci.c0 : cj.c0));
    const int64_t hi = !row_j ? ci.c1 : (!row_i ? cj.c1 : (ci.c1 > cj.c1 ? ci.c1 : cj.c1));
    for (int64_t c = lo + lane; c < hi; c += 32) {
      const bool in_i = row_i && c >= ci.c0 && c < ci.c1;
      const bool in_j = row_j && c >= cj.c0 && c < cj.c1;
      if (!in_i && !in_j) continue;
      const U vi = ri[c], vj = rj[c];
      if (in_i) ri[c] = vj;
      if (in_j) rj[c] = vi;
    }
  });
}

// d x[j] = g[j] outside box_j + g[s] inside box_s, s = src[j] = inverse(perm)[j].
template <typename T>
__global__ void cutmix_backward_kernel(const CutmixArgs a) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  for_each_row(a, [&](int64_t r, int lane) {
    const RowPos p = row_pos(a, r);
    const int64_t s = a.src[p.i];
    const int64_t* bj = box_of(a, p.i);
    const int64_t* bs = box_of(a, s);
    const bool row_j = p.h >= bj[0] && p.h < bj[1];
    const bool row_s = p.h >= bs[0] && p.h < bs[1];
    const T* gj = g + p.i * a.x_stride + p.base;
    T* o = out + p.i * a.out_stride + p.base;
    if (!row_j && !row_s) {  // the row passes through unchanged
      warp_copy(gj, o, a.row_len, lane);
      return;
    }
    const Cols cj = box_cols(a, bj), cs = box_cols(a, bs);
    const T* gs = g + s * a.x_stride + p.base;
    for (int64_t c = lane; c < a.row_len; c += 32) {
      const bool in_j = row_j && c >= cj.c0 && c < cj.c1;
      const bool in_s = row_s && c >= cs.c0 && c < cs.c1;
      if (!in_s) {
        o[c] = in_j ? T(0) : gj[c];
      } else {
        const A v = (in_j ? A(0) : static_cast<A>(gj[c])) + static_cast<A>(gs[c]);
        o[c] = static_cast<T>(v);
      }
    }
  });
}

template <typename U>
void launch_cutmix_words(const CutmixArgs& a, const dim3& grid, cudaStream_t stream) {
  if (a.mode == CutmixMode::kPaste) {
    cutmix_paste_kernel<U><<<grid, kThreads, 0, stream>>>(a);
  } else {
    cutmix_swap_kernel<U><<<grid, kThreads, 0, stream>>>(a);
  }
}

void launch_cutmix(const CutmixArgs& a) {
  const int64_t nrows = a.batch * a.planes * a.rows;
  if (nrows == 0 || a.row_len == 0) return;
  // one warp per row, kWarps rows per block; more rows than the grid holds loop
  constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;
  const dim3 grid(static_cast<unsigned>(std::min(kMaxRowBlocks, (nrows + kWarps - 1) / kWarps)));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (a.mode == CutmixMode::kBackward) {
    switch (a.dtype) {
      case at::kFloat: cutmix_backward_kernel<float><<<grid, kThreads, 0, stream>>>(a); break;
      case at::kDouble: cutmix_backward_kernel<double><<<grid, kThreads, 0, stream>>>(a); break;
      case at::kHalf: cutmix_backward_kernel<c10::Half><<<grid, kThreads, 0, stream>>>(a); break;
      case at::kBFloat16:
        cutmix_backward_kernel<c10::BFloat16><<<grid, kThreads, 0, stream>>>(a);
        break;
      default: TORCH_INTERNAL_ASSERT(false, "cutmix: unexpected dtype ", a.dtype);
    }
  } else {
    // A paste moves whole elements: a word of the element's size is enough.
    switch (c10::elementSize(a.dtype)) {
      case 2: launch_cutmix_words<uint16_t>(a, grid, stream); break;
      case 4: launch_cutmix_words<uint32_t>(a, grid, stream); break;
      case 8: launch_cutmix_words<uint64_t>(a, grid, stream); break;
      default: TORCH_INTERNAL_ASSERT(false, "cutmix: unexpected dtype ", a.dtype);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaDevice {
  static at::Tensor alloc(at::IntArrayRef sizes, at::IntArrayRef strides,
                          const at::TensorOptions& options) {
    return at::empty_strided(sizes, strides, options);
  }
  static void blend(const BlendArgs& a) {
    switch (a.dtype) {
      case at::kFloat: return launch_blend<float>(a);
      case at::kDouble: return launch_blend<double>(a);
      case at::kHalf: return launch_blend<c10::Half>(a);
      case at::kBFloat16: return launch_blend<c10::BFloat16>(a);
      default: TORCH_INTERNAL_ASSERT(false, "mixup: unexpected dtype ", a.dtype);
    }
  }
  static void cutmix(const CutmixArgs& a) { launch_cutmix(a); }
};

namespace impl = mixup_impl;
using OptT = std::optional<at::Tensor>;

at::Tensor mixup_cuda(const at::Tensor& x, const at::Tensor& perm, const OptT& lam, double l) {
  const gpu::DeviceGuard guard(x);
  return impl::mixup<CudaDevice>(x, perm, lam, l);
}

void mixup_out_cuda(const at::Tensor& x, const at::Tensor& perm, const OptT& lam, double l,
                    at::Tensor& out) {
  const gpu::DeviceGuard guard(x);
  impl::mixup_out<CudaDevice>(x, perm, lam, l, out);
}

void mixup_inplace_cuda(at::Tensor& x, const at::Tensor& perm, const OptT& lam, double l) {
  const gpu::DeviceGuard guard(x);
  impl::mixup_inplace<CudaDevice>(x, perm, lam, l);
}

at::Tensor mixup_backward_cuda(const at::Tensor& grad, const at::Tensor& perm, const OptT& lam,
                               double l) {
  const gpu::DeviceGuard guard(grad);
  return impl::mixup_backward<CudaDevice>(grad, perm, lam, l);
}

at::Tensor cutmix_cuda(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                       at::IntArrayRef box) {
  const gpu::DeviceGuard guard(x);
  return impl::cutmix<CudaDevice>(x, perm, boxes, box);
}

void cutmix_out_cuda(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                     at::IntArrayRef box, at::Tensor& out) {
  const gpu::DeviceGuard guard(x);
  impl::cutmix_out<CudaDevice>(x, perm, boxes, box, out);
}

void cutmix_inplace_cuda(at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                         at::IntArrayRef box) {
  const gpu::DeviceGuard guard(x);
  impl::cutmix_inplace<CudaDevice>(x, perm, boxes, box);
}

at::Tensor cutmix_backward_cuda(const at::Tensor& grad, const at::Tensor& perm, const OptT& boxes,
                                at::IntArrayRef box) {
  const gpu::DeviceGuard guard(grad);
  return impl::cutmix_backward<CudaDevice>(grad, perm, boxes, box);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CUDA, m) {
  m.impl("mixup", &mixup_cuda);
  m.impl("mixup.out", &mixup_out_cuda);
  m.impl("mixup_", &mixup_inplace_cuda);
  m.impl("mixup_backward", &mixup_backward_cuda);
  m.impl("cutmix", &cutmix_cuda);
  m.impl("cutmix.out", &cutmix_out_cuda);
  m.impl("cutmix_", &cutmix_inplace_cuda);
  m.impl("cutmix_backward", &cutmix_backward_cuda);
}

}  // namespace fastcore_train
