// CPU implementation of fastcore_train::binary_cross_entropy{,_backward}: checks, layout,
// dispatch to the per-ISA kernels (cpu/kernels/bce_kernel.cpp), the reduction over rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/bce_checks.h"
#include "common/loss_inputs.h"
#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "cpu/kernels/bce_kernel.h"

namespace fastcore_train {
namespace {

using Prepared = LossInputs;

// Value checks that need the data: B values, nothing next to the (B, C) pass.
void check_values(const Prepared& in, int64_t classes) {
  auto check_range = [&](const at::Tensor& t) {
    const int64_t* p = t.const_data_ptr<int64_t>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < classes, "binary_cross_entropy: target ", p[i],
                        " is out of range for ", classes, " classes (row ", i, ")");
    }
  };
  check_range(in.target);
  if (in.target_b.defined()) check_range(in.target_b);
  if (in.lam.defined()) {
    AT_DISPATCH_FLOATING_TYPES(in.lam.scalar_type(), "binary_cross_entropy_lam", [&] {
      const scalar_t* p = in.lam.const_data_ptr<scalar_t>();
      for (int64_t i = 0, n = in.lam.numel(); i < n; ++i) {
        TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= 1, "binary_cross_entropy: lam must be in [0, 1], got ",
                          static_cast<double>(p[i]), " (row ", i, ")");
      }
    });
  }
}

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& target_b, const std::optional<at::Tensor>& lam,
                 double lam_scalar, double smoothing, const std::optional<at::Tensor>& pos_weight) {
  check_bce_inputs(logits, target, target_b, lam, lam_scalar, smoothing, pos_weight);
  Prepared r = prepare_loss_inputs(logits, target, target_b, lam, pos_weight,
                                   bce_acc_type(logits.scalar_type()));
  check_values(r, logits.size(1));
  return r;
}

cpu::BceParams make_params(const Prepared& in, double lam_scalar, double smoothing) {
  cpu::BceParams p;
  p.logits = in.x.const_data_ptr();
  p.row_stride = in.x.stride(0);
  p.rows = in.x.size(0);
  p.classes = in.x.size(1);
  p.dtype = in.x.scalar_type();
  p.target = in.target.const_data_ptr<int64_t>();
  p.target_b = in.target_b.defined() ? in.target_b.const_data_ptr<int64_t>() : nullptr;
  p.lam = in.lam.defined() ? in.lam.const_data_ptr() : nullptr;
  p.lam_scalar = lam_scalar;
  p.smoothing = smoothing;
  p.pos_weight = in.pos_weight.defined() ? in.pos_weight.const_data_ptr() : nullptr;
  return p;
}

// Non-temporal stores pay off once the output is far larger than the last-level cache (as in
// cross_entropy.cpp). FASTCORE_TRAIN_NT_STORES=0 disables them.
bool stream_stores_for(size_t nbytes) {
  constexpr size_t kMinBytes = size_t(64) << 20;
  const char* env = std::getenv("FASTCORE_TRAIN_NT_STORES");
  return nbytes >= kMinBytes && (env == nullptr || std::strcmp(env, "0") != 0);
}

at::Tensor bce_cpu(const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& target_b, const std::optional<at::Tensor>& lam,
                   double lam_scalar, double label_smoothing,
                   const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_bce_reduction(reduction);
  Prepared in = prepare(logits, target, target_b, lam, lam_scalar, label_smoothing, pos_weight);
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto acc = bce_acc_type(logits.scalar_type());
  auto p = make_params(in, lam_scalar, label_smoothing);
  if (reduction == kBceNone) {
    at::Tensor out = cpu::empty_large({B, C}, logits.options().dtype(acc));
    if (out.numel() > 0) {
      p.loss = out.data_ptr();
      FT_ISA_CALL(bce_forward_elementwise_kernel, p);
    }
    return out;
  }
  // B > 0 and C == 0 cannot get here: every target would be out of range
  at::Tensor rows = at::empty({B}, logits.options().dtype(acc));
  if (B > 0) {
    p.loss = rows.data_ptr();
    FT_ISA_CALL(bce_forward_rows_kernel, p);
  }
  // The sum over B rows is done here rather than by torch ops: at small sizes their dispatch
  // costs as much as the kernel.
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "binary_cross_entropy_reduce", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    double total = 0.0;
    for (int64_t i = 0; i < B; ++i) total += r[i];
    // the mean is over B x C elements, as torch's; none at all gives 0/0 = NaN, as in torch
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(
        reduction == kBceMean ? total / static_cast<double>(B * C) : total);
  });
  return loss;
}

at::Tensor bce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const std::optional<at::Tensor>& target_b,
                            const std::optional<at::Tensor>& lam, double lam_scalar,
                            double label_smoothing, const std::optional<at::Tensor>& pos_weight,
                            int64_t reduction) {
  check_bce_reduction(reduction);
  Prepared in = prepare(logits, target, target_b, lam, lam_scalar, label_smoothing, pos_weight);
  check_bce_grad_loss(grad_loss, logits, reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto acc = bce_acc_type(logits.scalar_type());
  at::Tensor grad = cpu::empty_large({B, C}, logits.options());
  if (grad.numel() == 0) return grad;
  auto p = make_params(in, lam_scalar, label_smoothing);
  at::Tensor g;
  if (reduction == kBceNone) {
    g = grad_loss.to(acc).contiguous();
    p.grad_loss = g.const_data_ptr();
  } else {
    p.grad_scalar = grad_loss.item<double>();
    if (reduction == kBceMean) p.grad_scalar /= static_cast<double>(B * C);
  }
  p.grad_logits = grad.data_ptr();
  p.stream_stores = stream_stores_for(grad.nbytes());
  FT_ISA_CALL(bce_backward_kernel, p);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("binary_cross_entropy", &bce_cpu);
  m.impl("binary_cross_entropy_backward", &bce_backward_cpu);
}

}  // namespace fastcore_train
