// Raw-pointer descriptions of one call of the row losses (cross-entropy, binary
// cross-entropy): the interface between their launcher (common/row_loss_launch.h) and the CPU
// and CUDA kernels. Free of at::Tensor so the per-ISA CPU translation units stay small.
//
// Logits are (rows, classes) with classes contiguous and rows `row_stride` apart; targets are
// int64 class indices; lam and pos_weight are in the accumulation dtype (float64 for float64
// logits, else float32), contiguous. Gradients are written (rows, classes) contiguous.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastcore_train {

// What both losses read: the logits, one or two targets per row and mixup's lam.
struct RowLossInputs {
  const void* logits = nullptr;  // (rows, classes), classes contiguous, dtype `dtype`
  int64_t row_stride = 0;        // in elements
  int64_t rows = 0;
  int64_t classes = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;  // logits dtype; acc is float64 iff Double
  const int64_t* target = nullptr;    // (rows,)
  const int64_t* target_b = nullptr;  // null: one target
  const void* lam = nullptr;          // acc dtype, (rows,), contiguous; null: lam_scalar
  double lam_scalar = 1.0;
  double smoothing = 0.0;
};

struct CrossEntropyArgs : RowLossInputs {
  int64_t ignore_index = -100;
  // forward outputs, acc dtype: loss (rows,); stats (rows, 2) contiguous, per row the max m and
  // log(sum_j exp(z_j - m)), kept apart (m + log s rounds log s away once |m| >> 1)
  void* loss = nullptr;
  void* stats = nullptr;
  // backward inputs/outputs
  const void* stats_in = nullptr;   // acc dtype, (rows, 2), contiguous, as the forward wrote it
  const void* grad_loss = nullptr;  // acc dtype, (rows,), stride grad_loss_stride (0: one value)
  int64_t grad_loss_stride = 1;
  void* grad_logits = nullptr;      // (rows, classes) contiguous, logits dtype
  bool stream_stores = false;       // CPU: write grad_logits with non-temporal stores
};

struct BceArgs : RowLossInputs {  // targets each in [0, classes)
  const void* pos_weight = nullptr;   // acc dtype, (classes,), contiguous; null: all 1
  // forward output, acc dtype: the loss of each row (rows,), or with `elementwise` the loss of
  // each element (rows, classes) contiguous
  void* loss = nullptr;
  bool elementwise = false;
  // backward: the upstream gradient in acc dtype, (rows, classes) contiguous when
  // `grad_per_element`, else one value for every element (the mean's 1/(B*C) folded in)
  const void* grad_loss = nullptr;
  bool grad_per_element = false;
  double grad_scalar = 0.0;     // CPU kernels: that one value, read on the host
  void* grad_logits = nullptr;  // (rows, classes) contiguous, logits dtype
  bool stream_stores = false;   // CPU: write grad_logits with non-temporal stores
};

// The denominator of a mean over rows: the rows whose targets are not `ignore_index` (cross-
// entropy), or a fixed count when `target` is null (binary cross-entropy: B * C elements).
struct RowCount {
  const int64_t* target = nullptr;
  const int64_t* target_b = nullptr;  // null: one target
  int64_t rows = 0;
  int64_t ignore_index = 0;
  int64_t fixed = 0;
};

}  // namespace fastcore_train
