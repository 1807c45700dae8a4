// The row losses (cross_entropy, binary_cross_entropy and their backwards), written once for
// every device: argument checks, input preparation, allocation, the reduction and the form of
// the upstream gradient; the device supplies the kernels and two small primitives.
//
//   struct Device {
//     using Guard = ...;  // makes logits' device current (nothing on the CPU)
//     static at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options);
//     // The sum of `rows` (acc dtype, (B,)), over count(c) when `mean`: a 0-dim tensor.
//     static at::Tensor reduce(const at::Tensor& rows, const RowCount& c, bool mean);
//     // grad_loss (one element) over count(c), one acc-dtype element where the kernels read it.
//     static at::Tensor scale_grad(const at::Tensor& grad_loss, const RowCount& c,
//                                  at::ScalarType acc);
//   };
//   struct CrossEntropyDevice : Device {
//     static void check_values(const LossInputs& in, int64_t classes, int64_t ignore_index);
//     static void forward(const CrossEntropyArgs& a);   // a.rows > 0, a.classes > 0
//     static void backward(const CrossEntropyArgs& a);  // a.rows > 0, a.classes > 0
//   };
//   struct BceDevice : Device {
//     static void check_values(const LossInputs& in, int64_t classes);
//     static void forward(const BceArgs& a);            // a.rows > 0
//     static void backward(const BceArgs& a);           // a.rows > 0, a.classes > 0
//   };
//
// Values (targets in range, lam in [0, 1]) are checked before a kernel reads through them. On
// the CPU check_values reads them and names the bad one; on a GPU it does nothing and the
// kernels assert on the device (as torch's own CUDA losses do): naming the value would stall
// the stream on every call. The mean's denominator of cross-entropy (rows not ignored) is
// counted where the rows are, so no call reads a device value on the host.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/bce_checks.h"
#include "common/cross_entropy_checks.h"
#include "common/loss_inputs.h"
#include "common/row_loss_args.h"

namespace fastcore_train::row_loss_impl {

using OptT = std::optional<at::Tensor>;

inline RowCount fixed_count(int64_t n) {
  RowCount c;
  c.fixed = n;
  return c;
}

// Rows whose targets are both not ignore_index.
inline RowCount valid_rows(const LossInputs& in, int64_t ignore_index) {
  RowCount c;
  c.target = in.target.const_data_ptr<int64_t>();
  c.target_b = in.target_b.defined() ? in.target_b.const_data_ptr<int64_t>() : nullptr;
  c.rows = in.target.numel();
  c.ignore_index = ignore_index;
  return c;
}

// The same rows as a bool tensor on the targets' device (for the degenerate C == 0 only).
inline at::Tensor valid_rows_mask(const LossInputs& in, int64_t ignore_index) {
  at::Tensor v = in.target.ne(ignore_index);
  if (in.target_b.defined()) v.logical_and_(in.target_b.ne(ignore_index));
  return v;
}

// The upstream gradient of a loss reduced to one value: grad_loss itself for a sum, over the
// count for a mean.
template <class Device>
at::Tensor reduced_grad(const at::Tensor& grad_loss, bool mean, const RowCount& c,
                        at::ScalarType acc) {
  return mean ? Device::scale_grad(grad_loss, c, acc) : grad_loss.to(acc).reshape({1});
}

// ---- cross-entropy -------------------------------------------------------------------------

inline LossInputs prepare_ce(const at::Tensor& logits, const at::Tensor& target,
                             const OptT& target_b, const OptT& lam, double lam_scalar,
                             double smoothing, int64_t reduction) {
  check_cross_entropy_reduction(reduction);
  check_cross_entropy_inputs(logits, target, target_b, lam, lam_scalar, smoothing);
  return prepare_loss_inputs(logits, target, target_b, lam, std::nullopt,
                             cross_entropy_acc_type(logits.scalar_type()));
}

// The inputs both losses read, as their kernels take them.
inline void set_row_inputs(RowLossInputs& a, const LossInputs& in, double lam_scalar,
                           double smoothing) {
  a.logits = in.x.const_data_ptr();
  a.row_stride = in.x.stride(0);
  a.rows = in.x.size(0);
  a.classes = in.x.size(1);
  a.dtype = in.x.scalar_type();
  a.target = in.target.const_data_ptr<int64_t>();
  a.target_b = in.target_b.defined() ? in.target_b.const_data_ptr<int64_t>() : nullptr;
  a.lam = in.lam.defined() ? in.lam.const_data_ptr() : nullptr;
  a.lam_scalar = lam_scalar;
  a.smoothing = smoothing;
}

inline CrossEntropyArgs ce_args(const LossInputs& in, double lam_scalar, double smoothing,
                                int64_t ignore_index) {
  CrossEntropyArgs a;
  set_row_inputs(a, in, lam_scalar, smoothing);
  a.ignore_index = ignore_index;
  return a;
}

template <class Device>
std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits,
                                                 const at::Tensor& target, const OptT& target_b,
                                                 const OptT& lam, double lam_scalar,
                                                 double label_smoothing, int64_t ignore_index,
                                                 int64_t reduction) {
  const LossInputs in = prepare_ce(logits, target, target_b, lam, lam_scalar, label_smoothing,
                                   reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  Device::check_values(in, C, ignore_index);
  typename Device::Guard guard(logits);
  const auto acc = cross_entropy_acc_type(logits.scalar_type());
  at::Tensor rows = at::empty({B}, logits.options().dtype(acc));
  at::Tensor stats = at::empty({B, 2}, logits.options().dtype(acc));
  if (B > 0 && C == 0) {
    // Degenerate, as in torch: every row must be ignored (any other target is out of range;
    // the CPU's check_values has said which) and each gives 0. A host read is fine here.
    TORCH_CHECK_INDEX(!valid_rows_mask(in, ignore_index).any().item<bool>(),
                      "cross_entropy: a target is out of range for 0 classes");
    rows.zero_();
    stats.zero_();
  } else if (B > 0) {
    CrossEntropyArgs a = ce_args(in, lam_scalar, label_smoothing, ignore_index);
    a.loss = rows.mutable_data_ptr();
    a.stats = stats.mutable_data_ptr();
    Device::forward(a);
  }
  if (reduction == kReduceNone) return {rows, stats};
  // the mean is over rows not ignored; none at all gives 0/0 = NaN, as in torch
  return {Device::reduce(rows, valid_rows(in, ignore_index), reduction == kReduceMean), stats};
}

template <class Device>
at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& target, const OptT& target_b,
                                  const OptT& lam, double lam_scalar, const at::Tensor& stats,
                                  double label_smoothing, int64_t ignore_index,
                                  int64_t reduction) {
  const LossInputs in = prepare_ce(logits, target, target_b, lam, lam_scalar, label_smoothing,
                                   reduction);
  // grad_loss and stats are read by the kernels too: on another device than logits they would
  // be a host pointer in a device kernel (or the reverse)
  auto check_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == logits.device(), "cross_entropy_backward: ", name, " is on ",
                      t.device(), " but logits is on ", logits.device());
  };
  check_device(grad_loss, "grad_loss");
  check_device(stats, "stats");
  const int64_t B = logits.size(0), C = logits.size(1);
  check_cross_entropy_backward_shapes(grad_loss, stats, B, reduction);
  Device::check_values(in, C, ignore_index);
  typename Device::Guard guard(logits);
  const auto acc = cross_entropy_acc_type(logits.scalar_type());
  at::Tensor grad = Device::alloc({B, C}, logits.options());
  if (grad.numel() == 0) return grad;
  // per-row upstream gradient; stride 0 when every row shares one value
  const at::Tensor g =
      reduction == kReduceNone
          ? grad_loss.to(acc)
          : reduced_grad<Device>(grad_loss, reduction == kReduceMean,
                                 valid_rows(in, ignore_index), acc);
  const at::Tensor st = stats.to(acc).contiguous();
  CrossEntropyArgs a = ce_args(in, lam_scalar, label_smoothing, ignore_index);
  a.stats_in = st.const_data_ptr();
  a.grad_loss = g.const_data_ptr();
  a.grad_loss_stride = reduction == kReduceNone ? g.stride(0) : 0;
  a.grad_logits = grad.mutable_data_ptr();
  Device::backward(a);
  return grad;
}

// ---- binary cross-entropy ------------------------------------------------------------------

inline LossInputs prepare_bce(const at::Tensor& logits, const at::Tensor& target,
                              const OptT& target_b, const OptT& lam, double lam_scalar,
                              double smoothing, const OptT& pos_weight, int64_t reduction) {
  check_bce_reduction(reduction);
  check_bce_inputs(logits, target, target_b, lam, lam_scalar, smoothing, pos_weight);
  return prepare_loss_inputs(logits, target, target_b, lam, pos_weight,
                             bce_acc_type(logits.scalar_type()));
}

inline BceArgs bce_args(const LossInputs& in, double lam_scalar, double smoothing) {
  BceArgs a;
  set_row_inputs(a, in, lam_scalar, smoothing);
  a.pos_weight = in.pos_weight.defined() ? in.pos_weight.const_data_ptr() : nullptr;
  return a;
}

template <class Device>
at::Tensor binary_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                const OptT& target_b, const OptT& lam, double lam_scalar,
                                double label_smoothing, const OptT& pos_weight,
                                int64_t reduction) {
  const LossInputs in = prepare_bce(logits, target, target_b, lam, lam_scalar, label_smoothing,
                                    pos_weight, reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  Device::check_values(in, C);
  typename Device::Guard guard(logits);
  const auto acc = bce_acc_type(logits.scalar_type());
  BceArgs a = bce_args(in, lam_scalar, label_smoothing);
  a.elementwise = reduction == kBceNone;
  at::Tensor out = a.elementwise ? Device::alloc({B, C}, logits.options().dtype(acc))
                                 : at::empty({B}, logits.options().dtype(acc));
  // B > 0 with C == 0 has every target out of range: check_values or the kernel says so
  if (B > 0) {
    a.loss = out.mutable_data_ptr();
    Device::forward(a);
  }
  if (a.elementwise) return out;
  // the mean is over B x C elements, as torch's; none at all gives 0/0 = NaN, as in torch
  return Device::reduce(out, fixed_count(B * C), reduction == kBceMean);
}

template <class Device>
at::Tensor binary_cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& target, const OptT& target_b,
                                         const OptT& lam, double lam_scalar,
                                         double label_smoothing, const OptT& pos_weight,
                                         int64_t reduction) {
  const LossInputs in = prepare_bce(logits, target, target_b, lam, lam_scalar, label_smoothing,
                                    pos_weight, reduction);
  check_bce_grad_loss(grad_loss, logits, reduction);
  const int64_t B = logits.size(0), C = logits.size(1);
  Device::check_values(in, C);
  typename Device::Guard guard(logits);
  const auto acc = bce_acc_type(logits.scalar_type());
  at::Tensor grad = Device::alloc({B, C}, logits.options());
  if (grad.numel() == 0) return grad;
  BceArgs a = bce_args(in, lam_scalar, label_smoothing);
  a.grad_per_element = reduction == kBceNone;
  const at::Tensor g =
      a.grad_per_element
          ? grad_loss.to(acc).contiguous()
          : reduced_grad<Device>(grad_loss, reduction == kBceMean, fixed_count(B * C), acc);
  a.grad_loss = g.const_data_ptr();
  a.grad_logits = grad.mutable_data_ptr();
  Device::backward(a);
  return grad;
}

}  // namespace fastcore_train::row_loss_impl
