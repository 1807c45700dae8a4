// CPU kernels of fastcore_train::binary_cross_entropy{,_backward}: the device-independent
// logic (checks, preparation, allocation, reduction) lives in common/row_loss_launch.h; this
// file checks the target and lam values by reading them and calls the per-ISA kernels
// (cpu/kernels/bce_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/row_loss_launch.h"
#include "cpu/isa.h"
#include "cpu/kernels/bce_kernel.h"
#include "cpu/row_loss.h"

namespace fastcore_train {
namespace {

struct CpuBce : cpu::RowLossDevice {
  // B values each: nothing next to the (B, C) pass, and the error names the bad one.
  static void check_values(const LossInputs& in, int64_t classes) {
    auto check_range = [&](const at::Tensor& t) {
      const int64_t* p = t.const_data_ptr<int64_t>();
      for (int64_t i = 0, n = t.numel(); i < n; ++i) {
        TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < classes, "binary_cross_entropy: target ", p[i],
                          " is out of range for ", classes, " classes (row ", i, ")");
      }
    };
    check_range(in.target);
    if (in.target_b.defined()) check_range(in.target_b);
    if (!in.lam.defined()) return;
    AT_DISPATCH_FLOATING_TYPES(in.lam.scalar_type(), "binary_cross_entropy_lam", [&] {
      const scalar_t* p = in.lam.const_data_ptr<scalar_t>();
      for (int64_t i = 0, n = in.lam.numel(); i < n; ++i) {
        TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= 1,
                          "binary_cross_entropy: lam must be in [0, 1], got ",
                          static_cast<double>(p[i]), " (row ", i, ")");
      }
    });
  }

  static void forward(const BceArgs& a) {
    if (a.elementwise) {
      FT_ISA_CALL(bce_forward_elementwise_kernel, a);
    } else {
      FT_ISA_CALL(bce_forward_rows_kernel, a);
    }
  }

  // The kernels take one upstream value as a host double and a per-element gradient by pointer.
  static void backward(const BceArgs& a) {
    BceArgs p = a;
    if (!a.grad_per_element) {
      p.grad_scalar = a.dtype == at::kDouble ? *static_cast<const double*>(a.grad_loss)
                                             : *static_cast<const float*>(a.grad_loss);
      p.grad_loss = nullptr;
    }
    p.stream_stores = stream_stores_for(a.rows, a.classes, a.dtype);
    FT_ISA_CALL(bce_backward_kernel, p);
  }
};

namespace impl = row_loss_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("binary_cross_entropy", &impl::binary_cross_entropy<CpuBce>);
  m.impl("binary_cross_entropy_backward", &impl::binary_cross_entropy_backward<CpuBce>);
}

}  // namespace fastcore_train
