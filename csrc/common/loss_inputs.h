// The inputs of the row losses (cross-entropy, binary cross-entropy) as their kernels read
// them, prepared the same way on every device: logits with unit stride along classes (rows may
// be strided, e.g. a slice), class indices as int64 (uint8 targets are B values: nothing next
// to the (B, C) pass), lam and pos_weight in the accumulation dtype, all contiguous. Each op's
// argument checks run first (common/*_checks.h); value checks that read the data stay with the
// device (the CPU names the bad value, CUDA asserts on the device without a host sync).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastcore_train {

struct LossInputs {
  at::Tensor x, target, target_b, lam, pos_weight;  // target_b, lam, pos_weight may be undefined
};

inline LossInputs prepare_loss_inputs(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& target_b,
                                      const std::optional<at::Tensor>& lam,
                                      const std::optional<at::Tensor>& pos_weight,
                                      at::ScalarType acc) {
  LossInputs r;
  r.x = (logits.size(1) <= 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
  r.target = target.to(at::kLong).contiguous();
  if (target_b.has_value()) r.target_b = target_b->to(at::kLong).contiguous();
  if (lam.has_value()) r.lam = lam->to(acc).contiguous();
  if (pos_weight.has_value()) r.pos_weight = pos_weight->to(acc).contiguous();
  return r;
}

}  // namespace fastcore_train
