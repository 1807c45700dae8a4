// Input checks of the cross-entropy op shared by the CPU and CUDA implementations.
// The messages match fastcore_train/ops/cross_entropy.py, so both backends say the same.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/py_dtype.h"

namespace fastcore_train {

inline void check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& target_b,
                                       const std::optional<at::Tensor>& lam, double lam_scalar,
                                       double label_smoothing) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "cross_entropy: logits must be 2-D (batch, classes), got ",
              logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "cross_entropy: logits must be float32, float16, bfloat16 or float64, got ",
              py_dtype(dt));
  const int64_t B = logits.size(0);
  auto check_target = [&](const at::Tensor& t, const char* name) {
    // int64 and uint8, exactly the index dtypes torch's cross_entropy takes
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kByte,
                     "cross_entropy: ", name,
                     " must be int64 (torch.long) class indices, got ", py_dtype(t.scalar_type()),
                     at::isFloatingType(t.scalar_type())
                         ? " (probability targets are not supported; for mixup pass target_b "
                           "and lam)"
                         : "");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, "cross_entropy: ", name, " must have shape (",
                B, ",) to match logits, got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == logits.device(), "cross_entropy: ", name, " is on ", t.device(),
                " but logits is on ", logits.device());
  };
  check_target(target, "target");
  TORCH_CHECK_VALUE(!lam.has_value() || target_b.has_value(),
              "cross_entropy: target_b and lam must be given together");
  if (target_b.has_value()) check_target(*target_b, "target_b");
  if (lam.has_value()) {
    TORCH_CHECK_TYPE(lam->is_floating_point(), "cross_entropy: lam must be a float tensor, got ",
                lam->scalar_type());
    TORCH_CHECK_VALUE(lam->dim() == 1 && lam->size(0) == B, "cross_entropy: lam must have shape (", B,
                ",) to match logits, got ", lam->sizes());
    TORCH_CHECK_VALUE(lam->device() == logits.device(), "cross_entropy: lam is on ", lam->device(),
                " but logits is on ", logits.device());
  }
  TORCH_CHECK_VALUE(lam_scalar >= 0.0 && lam_scalar <= 1.0, "cross_entropy: lam must be in [0, 1], got ",
              lam_scalar);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
}

// torch's at::Reduction values, used by the op's `reduction` argument.
enum CrossEntropyReduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

inline void check_cross_entropy_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= kReduceNone && reduction <= kReduceSum,
                    "cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

inline void check_cross_entropy_backward_shapes(const at::Tensor& grad_loss,
                                               const at::Tensor& stats, int64_t B,
                                               int64_t reduction) {
  if (reduction == kReduceNone) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == B,
                      "cross_entropy_backward: grad_loss must have shape (", B, ",), got ",
                      grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1,
                      "cross_entropy_backward: grad_loss of a reduced loss must have one "
                      "element, got shape ", grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == B && stats.size(1) == 2,
                    "cross_entropy_backward: stats must have shape (", B, ", 2), got ",
                    stats.sizes());
}

inline at::ScalarType cross_entropy_acc_type(at::ScalarType logits_type) {
  return logits_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastcore_train
