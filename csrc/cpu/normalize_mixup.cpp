// CPU implementation of the fused uint8 normalize + mixup/cutmix operators: the
// device-independent logic lives in common/normalize_mixup_launch.h, the per-ISA kernel in
// cpu/kernels/normalize_mixup_kernel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/normalize_mixup_launch.h"
#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "cpu/kernels/normalize_mixup_kernel.h"

namespace fastcore_train {
namespace {

struct CpuDevice {
  static at::Tensor alloc(at::IntArrayRef sizes, at::IntArrayRef strides,
                          const at::TensorOptions& options) {
    return cpu::empty_large(sizes, strides, options);
  }
  static void normalize(const NormMixArgs& a) { FT_ISA_CALL(normalize_mixup_kernel, a); }
};

namespace impl = normmix_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("normalize_mixup", &impl::normalize_mixup<CpuDevice>);
  m.impl("normalize_mixup.out", &impl::normalize_mixup_out<CpuDevice>);
  m.impl("normalize_cutmix", &impl::normalize_cutmix<CpuDevice>);
  m.impl("normalize_cutmix.out", &impl::normalize_cutmix_out<CpuDevice>);
}

}  // namespace fastcore_train
