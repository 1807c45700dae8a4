// Input checks of the binary cross-entropy op shared by the CPU and CUDA implementations.
// The messages match fastcore_train/ops/binary_cross_entropy.py, so both backends say the same.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/py_dtype.h"

namespace fastcore_train {

inline void check_bce_inputs(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& target_b,
                             const std::optional<at::Tensor>& lam, double lam_scalar,
                             double label_smoothing, const std::optional<at::Tensor>& pos_weight) {
  TORCH_CHECK_VALUE(logits.dim() == 2,
                    "binary_cross_entropy: logits must be 2-D (batch, classes), got ", logits.dim(),
                    "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   "binary_cross_entropy: logits must be float32, float16, bfloat16 or float64, "
                   "got ", py_dtype(dt));
  const int64_t B = logits.size(0), C = logits.size(1);
  auto check_target = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kByte,
                     "binary_cross_entropy: ", name, " must be int64 or uint8 class indices, got ",
                     py_dtype(t.scalar_type()),
                     at::isFloatingType(t.scalar_type())
                         ? " (probability targets are not supported: pass class indices, and "
                           "target_b and lam for mixup)"
                         : "");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, "binary_cross_entropy: ", name,
                      " must have shape (", B, ",) to match logits, got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == logits.device(), "binary_cross_entropy: ", name, " is on ",
                      t.device(), " but logits is on ", logits.device());
  };
  check_target(target, "target");
  if (target_b.has_value()) check_target(*target_b, "target_b");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "binary_cross_entropy: label_smoothing must be in [0, 1], got ",
                    label_smoothing);
  if (pos_weight.has_value()) {
    // The Python layer turns integer weights and broadcastable shapes into a (C,) float tensor.
    TORCH_CHECK_TYPE(pos_weight->is_floating_point(),
                     "binary_cross_entropy: pos_weight must be a float tensor, got ",
                     py_dtype(pos_weight->scalar_type()));
    TORCH_CHECK_VALUE(pos_weight->dim() == 1 && pos_weight->size(0) == C,
                      "binary_cross_entropy: pos_weight must have shape (", C,
                      ",) (one weight per class), got ", pos_weight->sizes());
    TORCH_CHECK_VALUE(pos_weight->device() == logits.device(),
                      "binary_cross_entropy: pos_weight is on ", pos_weight->device(),
                      " but logits is on ", logits.device());
  }
  // a per-row lam needs its second target; target_b alone uses lam_scalar
  TORCH_CHECK_VALUE(!lam.has_value() || target_b.has_value(),
                    "binary_cross_entropy: target_b and lam must be given together");
  if (lam.has_value()) {
    TORCH_CHECK_TYPE(lam->is_floating_point(),
                     "binary_cross_entropy: lam must be a float tensor, got ",
                     py_dtype(lam->scalar_type()));
    TORCH_CHECK_VALUE(lam->device() == logits.device(), "binary_cross_entropy: lam is on ",
                      lam->device(), " but logits is on ", logits.device());
    TORCH_CHECK_VALUE(lam->dim() == 1 && lam->size(0) == B,
                      "binary_cross_entropy: lam must have shape (", B,
                      ",) to match logits, got ", lam->sizes());
  }
  TORCH_CHECK_VALUE(lam_scalar >= 0.0 && lam_scalar <= 1.0,
                    "binary_cross_entropy: lam must be in [0, 1], got ", lam_scalar);
}

// torch's at::Reduction values, used by the op's `reduction` argument.
enum BceReduction : int64_t { kBceNone = 0, kBceMean = 1, kBceSum = 2 };

inline void check_bce_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= kBceNone && reduction <= kBceSum,
                    "binary_cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

inline void check_bce_grad_loss(const at::Tensor& grad_loss, const at::Tensor& logits,
                                int64_t reduction) {
  if (reduction == kBceNone) {
    TORCH_CHECK_VALUE(grad_loss.sizes() == logits.sizes(),
                      "binary_cross_entropy_backward: grad_loss must have the logits' shape ",
                      logits.sizes(), " for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1,
                      "binary_cross_entropy_backward: grad_loss of a reduced loss must have one "
                      "element, got shape ", grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(grad_loss.device() == logits.device(),
                    "binary_cross_entropy_backward: grad_loss is on ", grad_loss.device(),
                    " but logits is on ", logits.device());
}

inline at::ScalarType bce_acc_type(at::ScalarType logits_type) {
  return logits_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastcore_train
