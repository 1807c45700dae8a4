// CUDA implementation of the fused uint8 normalize + mixup/cutmix operators. Checks, layout and
// allocation are shared with the CPU (common/normalize_mixup_launch.h); this file has the kernel.
//
// blockIdx.y walks the samples, the x dimension of the grid the elements of a sample: each
// thread reads one uint8 of x[i] (and of x[perm[i]] for mixup, or inside the cutmix box) and
// writes one element. norm(v) is computed, not looked up: a division per source element is
// free next to the memory traffic. The products and the sum use the _rn intrinsics so nvcc
// cannot contract them into an FMA: the result is the one of torch's eager
// lam * norm(x) + (1 - lam) * norm(x[perm]), bit for bit, as on the CPU.
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

#include "common/normalize_mixup_launch.h"
#include "cuda/common.cuh"

namespace fastcore_train {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 1024;

__device__ __forceinline__ float norm_of(uint8_t v, float mean, float std) {
  return __fdiv_rn(__fsub_rn(static_cast<float>(v), mean), std);
}

template <typename T>
__global__ void normalize_mixup_kernel(const NormMixArgs a) {
  const uint8_t* x = a.x;
  T* out = static_cast<T*>(a.out);
  const int64_t plane = a.rows * a.row_len;
  const int64_t n = a.planes * plane;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = blockIdx.y; i < a.batch; i += gridDim.y) {
    const uint8_t* xi = x + i * a.x_stride;
    T* oi = out + i * a.out_stride;
    const uint8_t* xs = a.src ? x + a.src[i] * a.x_stride : xi;
    float wa = 1.f, wb = 0.f;
    if (a.mode == NormMixMode::kMixup) {
      // torch's weights: a Python lam as float32 with 1 - lam in double; a tensor lam in float32
      wa = a.lam ? a.lam[i] : static_cast<float>(a.lam_scalar);
      wb = a.lam ? __fsub_rn(1.f, a.lam[i]) : static_cast<float>(1.0 - a.lam_scalar);
    }
    const int64_t* b = a.boxes ? a.boxes + 4 * i : a.box;
    for (int64_t k = first; k < n; k += step) {
      const int64_t kk = k % plane;
      const int64_t h = kk / a.row_len, e = kk - h * a.row_len;
      const int64_t c = a.col_unit == 1 ? k / plane : e % a.channels;
      const float m = __ldg(a.mean + c), s = __ldg(a.std + c);
      float v;
      if (a.mode == NormMixMode::kMixup) {
        v = __fadd_rn(__fmul_rn(wa, norm_of(xi[k], m, s)), __fmul_rn(wb, norm_of(xs[k], m, s)));
      } else {
        const bool in_box = a.mode == NormMixMode::kCutmix && h >= b[0] && h < b[1] &&
                            e >= b[2] * a.col_unit && e < b[3] * a.col_unit;
        v = norm_of(in_box ? xs[k] : xi[k], m, s);
      }
      oi[k] = static_cast<T>(v);
    }
  }
}

template <typename T>
void launch(const NormMixArgs& a) {
  const int64_t n = a.planes * a.rows * a.row_len;
  const dim3 grid(static_cast<unsigned>(std::min(kMaxGridX, (n + kThreads - 1) / kThreads)),
                  static_cast<unsigned>(std::min(kMaxGridY, a.batch)));
  normalize_mixup_kernel<T><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaDevice {
  static at::Tensor alloc(at::IntArrayRef sizes, at::IntArrayRef strides,
                          const at::TensorOptions& options) {
    return at::empty_strided(sizes, strides, options);
  }
  static void normalize(const NormMixArgs& a) {
    switch (a.out_dtype) {
      case at::kFloat: return launch<float>(a);
      case at::kHalf: return launch<c10::Half>(a);
      case at::kBFloat16: return launch<c10::BFloat16>(a);
      default: TORCH_INTERNAL_ASSERT(false, "normalize_mixup: unexpected out dtype ", a.out_dtype);
    }
  }
};

namespace impl = normmix_impl;
using OptT = std::optional<at::Tensor>;

at::Tensor normalize_mixup_cuda(const at::Tensor& x, const OptT& perm, const OptT& lam, double l,
                                const at::Tensor& mean, const at::Tensor& std,
                                at::ScalarType out_dtype) {
  const gpu::DeviceGuard guard(x);
  return impl::normalize_mixup<CudaDevice>(x, perm, lam, l, mean, std, out_dtype);
}

void normalize_mixup_out_cuda(const at::Tensor& x, const OptT& perm, const OptT& lam, double l,
                              const at::Tensor& mean, const at::Tensor& std,
                              at::ScalarType out_dtype, at::Tensor& out) {
  const gpu::DeviceGuard guard(x);
  impl::normalize_mixup_out<CudaDevice>(x, perm, lam, l, mean, std, out_dtype, out);
}

at::Tensor normalize_cutmix_cuda(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                                 at::IntArrayRef box, const at::Tensor& mean,
                                 const at::Tensor& std, at::ScalarType out_dtype) {
  const gpu::DeviceGuard guard(x);
  return impl::normalize_cutmix<CudaDevice>(x, perm, boxes, box, mean, std, out_dtype);
}

void normalize_cutmix_out_cuda(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                               at::IntArrayRef box, const at::Tensor& mean, const at::Tensor& std,
                               at::ScalarType out_dtype, at::Tensor& out) {
  const gpu::DeviceGuard guard(x);
  impl::normalize_cutmix_out<CudaDevice>(x, perm, boxes, box, mean, std, out_dtype, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CUDA, m) {
  m.impl("normalize_mixup", &normalize_mixup_cuda);
  m.impl("normalize_mixup.out", &normalize_mixup_out_cuda);
  m.impl("normalize_cutmix", &normalize_cutmix_cuda);
  m.impl("normalize_cutmix.out", &normalize_cutmix_out_cuda);
}

}  // namespace fastcore_train
