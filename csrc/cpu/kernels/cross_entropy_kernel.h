// Raw-pointer interface of the CPU cross-entropy kernels, compiled once per ISA.
// Kept free of at::Tensor so the per-ISA translation units stay small.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

namespace fastcore_train::cpu {

struct CrossEntropyParams {
  const void* logits = nullptr;  // (rows, classes), classes contiguous, dtype `dtype`
  int64_t row_stride = 0;        // in elements
  int64_t rows = 0;
  int64_t classes = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;  // logits dtype; acc is float64 iff Double
  const int64_t* target = nullptr;
  const int64_t* target_b = nullptr;  // null: one target
  const void* lam = nullptr;          // acc dtype, (rows,), contiguous; null: lam_scalar
  double lam_scalar = 1.0;
  double smoothing = 0.0;
  int64_t ignore_index = -100;
  // forward outputs, acc dtype: loss (rows,); stats (rows, 2) contiguous, per row the max m and
  // log(sum_j exp(z_j - m)), kept apart (m + log s rounds log s away once |m| >> 1)
  void* loss = nullptr;
  void* stats = nullptr;
  // backward inputs/outputs
  const void* stats_in = nullptr;   // acc dtype, (rows, 2), contiguous, as the forward wrote it
  const void* grad_loss = nullptr;  // acc dtype, (rows,), stride grad_loss_stride (0 allowed)
  int64_t grad_loss_stride = 1;
  void* grad_logits = nullptr;      // (rows, classes) contiguous, logits dtype
  bool stream_stores = false;       // write grad_logits with non-temporal stores
};

}  // namespace fastcore_train::cpu

FT_ISA_DECLARE(void, cross_entropy_forward_kernel, (const CrossEntropyParams& p))
FT_ISA_DECLARE(void, cross_entropy_backward_kernel, (const CrossEntropyParams& p))
