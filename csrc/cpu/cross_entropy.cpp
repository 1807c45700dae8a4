// CPU implementation of fastcore_train::cross_entropy{,_backward}: checks, layout, dispatch
// to the per-ISA kernel (cpu/kernels/cross_entropy_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/cross_entropy_checks.h"
#include "common/loss_inputs.h"
#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "cpu/kernels/cross_entropy_kernel.h"

namespace fastcore_train {
namespace {

// Value checks that need the data: cheap next to the (B, C) pass. Returns the number of rows
// that are not ignored (the denominator of the mean).
int64_t check_values(const at::Tensor& target, const at::Tensor& target_b, const at::Tensor& lam,
                     int64_t classes, int64_t ignore_index) {
  auto check_range = [&](const at::Tensor& t) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      const int64_t v = p[i];
      TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < classes), "cross_entropy: target ", v,
                  " is out of range for ", classes, " classes (row ", i, ")");
    }
  };
  check_range(target);
  if (target_b.defined()) check_range(target_b);
  if (lam.defined()) {
    AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "cross_entropy_lam", [&] {
      const scalar_t* p = lam.data_ptr<scalar_t>();
      for (int64_t i = 0, n = lam.numel(); i < n; ++i) {
        TORCH_CHECK_VALUE(p[i] >= 0 && p[i] <= 1, "cross_entropy: lam must be in [0, 1], got ",
                    static_cast<double>(p[i]), " (row ", i, ")");
      }
    });
  }
  const int64_t* a = target.const_data_ptr<int64_t>();
  const int64_t* b = target_b.defined() ? target_b.const_data_ptr<int64_t>() : a;
  int64_t valid = 0;
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {
    valid += a[i] != ignore_index && b[i] != ignore_index;
  }
  return valid;
}

cpu::CrossEntropyParams make_params(const at::Tensor& x, const at::Tensor& target,
                                    const at::Tensor& target_b, const at::Tensor& lam,
                                    double lam_scalar, double smoothing, int64_t ignore_index) {
  cpu::CrossEntropyParams p;
  p.logits = x.const_data_ptr();
  p.row_stride = x.stride(0);
  p.rows = x.size(0);
  p.classes = x.size(1);
  p.dtype = x.scalar_type();
  p.target = target.const_data_ptr<int64_t>();
  p.target_b = target_b.defined() ? target_b.const_data_ptr<int64_t>() : nullptr;
  p.lam = lam.defined() ? lam.const_data_ptr() : nullptr;
  p.lam_scalar = lam_scalar;
  p.smoothing = smoothing;
  p.ignore_index = ignore_index;
  return p;
}

// Non-temporal stores pay off once the output is far larger than the last-level cache, where a
// normal store's read-for-ownership doubles the traffic. FASTCORE_TRAIN_NT_STORES=0 disables.
bool stream_stores_for(size_t nbytes) {
  constexpr size_t kMinBytes = size_t(64) << 20;
  const char* env = std::getenv("FASTCORE_TRAIN_NT_STORES");
  return nbytes >= kMinBytes && (env == nullptr || std::strcmp(env, "0") != 0);
}

struct Prepared : LossInputs {
  int64_t valid = 0;  // rows not ignored
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& target_b, const std::optional<at::Tensor>& lam,
                 double lam_scalar, double smoothing, int64_t ignore_index) {
  check_cross_entropy_inputs(logits, target, target_b, lam, lam_scalar, smoothing);
  Prepared r;
  static_cast<LossInputs&>(r) = prepare_loss_inputs(
      logits, target, target_b, lam, std::nullopt, cross_entropy_acc_type(logits.scalar_type()));
  r.valid = check_values(r.target, r.target_b, r.lam, logits.size(1), ignore_index);
  return r;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& target_b,
    const std::optional<at::Tensor>& lam, double lam_scalar, double label_smoothing,
    int64_t ignore_index, int64_t reduction) {
  check_cross_entropy_reduction(reduction);
  Prepared in = prepare(logits, target, target_b, lam, lam_scalar, label_smoothing, ignore_index);
  const int64_t B = logits.size(0);
  const auto acc = cross_entropy_acc_type(logits.scalar_type());
  at::Tensor rows = at::empty({B}, logits.options().dtype(acc));
  at::Tensor stats = at::empty({B, 2}, logits.options().dtype(acc));
  if (B > 0) {
    auto p = make_params(in.x, in.target, in.target_b, in.lam, lam_scalar, label_smoothing,
                         ignore_index);
    p.loss = rows.data_ptr();
    p.stats = stats.data_ptr();
    FT_ISA_CALL(cross_entropy_forward_kernel, p);
  }
  if (reduction == kReduceNone) return {rows, stats};
  // The reduction over B rows is done here rather than by separate torch ops: at small sizes
  // their dispatch and autograd nodes cost as much as the kernel.
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "cross_entropy_reduce", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    double total = 0.0;
    for (int64_t i = 0; i < B; ++i) total += r[i];
    // the mean is over rows not ignored; none at all gives 0/0 = NaN, as in torch
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(
        reduction == kReduceMean ? total / static_cast<double>(in.valid) : total);
  });
  return {loss, stats};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target,
                                      const std::optional<at::Tensor>& target_b,
                                      const std::optional<at::Tensor>& lam, double lam_scalar,
                                      const at::Tensor& stats, double label_smoothing,
                                      int64_t ignore_index, int64_t reduction) {
  check_cross_entropy_reduction(reduction);
  Prepared in = prepare(logits, target, target_b, lam, lam_scalar, label_smoothing, ignore_index);
  const int64_t B = logits.size(0);
  const auto acc = cross_entropy_acc_type(logits.scalar_type());
  check_cross_entropy_backward_shapes(grad_loss, stats, B, reduction);
  at::Tensor grad = cpu::empty_large({B, logits.size(1)}, logits.options());
  if (grad.numel() == 0) return grad;
  at::Tensor st = stats.to(acc).contiguous();
  auto p = make_params(in.x, in.target, in.target_b, in.lam, lam_scalar, label_smoothing,
                       ignore_index);
  // Per-row upstream gradient: a (B,) tensor for reduction none, else one value for every row.
  at::Tensor g;
  double g_value = 0.0;
  float g_value_f = 0.f;
  if (reduction == kReduceNone) {
    g = grad_loss.to(acc);
    p.grad_loss = g.const_data_ptr();
    p.grad_loss_stride = g.stride(0);
  } else {
    g_value = grad_loss.item<double>();
    if (reduction == kReduceMean) g_value /= static_cast<double>(in.valid);
    g_value_f = static_cast<float>(g_value);
    p.grad_loss = acc == at::kDouble ? static_cast<const void*>(&g_value)
                                     : static_cast<const void*>(&g_value_f);
    p.grad_loss_stride = 0;
  }
  p.stats_in = st.const_data_ptr();
  p.grad_logits = grad.data_ptr();
  p.stream_stores = stream_stores_for(grad.nbytes());
  FT_ISA_CALL(cross_entropy_backward_kernel, p);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace fastcore_train
