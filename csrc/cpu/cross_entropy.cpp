// CPU kernels of fastcore_train::cross_entropy{,_backward}: the device-independent logic
// (checks, preparation, allocation, reduction) lives in common/row_loss_launch.h; this file
// checks the target and lam values by reading them and calls the per-ISA kernels
// (cpu/kernels/cross_entropy_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/row_loss_launch.h"
#include "cpu/isa.h"
#include "cpu/kernels/cross_entropy_kernel.h"
#include "cpu/row_loss.h"

namespace fastcore_train {
namespace {

struct CpuCrossEntropy : cpu::RowLossDevice {
  // B values each: cheap next to the (B, C) pass, and the error names the bad one.
  static void check_values(const LossInputs& in, int64_t classes, int64_t ignore_index) {
    auto check_range = [&](const at::Tensor& t) {
      const int64_t* p = t.const_data_ptr<int64_t>();
      for (int64_t i = 0, n = t.numel(); i < n; ++i) {
        const int64_t v = p[i];
        TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < classes), "cross_entropy: target ",
                          v, " is out of range for ", classes, " classes (row ", i, ")");
      }
    };
    check_range(in.target);
    if (in.target_b.defined()) check_range(in.target_b);
    if (!in.lam.defined()) return;
    AT_DISPATCH_FLOATING_TYPES(in.lam.scalar_type(), "cross_entropy_lam", [&] {
      const scalar_t* p = in.lam.const_data_ptr<scalar_t>();
      for (int64_t i = 0, n = in.lam.numel(); i < n; ++i) {
        TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= 1, "cross_entropy: lam must be in [0, 1], got ",
                          static_cast<double>(p[i]), " (row ", i, ")");
      }
    });
  }

  static void forward(const CrossEntropyArgs& a) { FT_ISA_CALL(cross_entropy_forward_kernel, a); }

  static void backward(const CrossEntropyArgs& a) {
    CrossEntropyArgs p = a;
    p.stream_stores = stream_stores_for(a.rows, a.classes, a.dtype);
    FT_ISA_CALL(cross_entropy_backward_kernel, p);
  }
};

namespace impl = row_loss_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("cross_entropy", &impl::cross_entropy<CpuCrossEntropy>);
  m.impl("cross_entropy_backward", &impl::cross_entropy_backward<CpuCrossEntropy>);
}

}  // namespace fastcore_train
