// Raw-pointer interface of the CPU binary cross-entropy kernels, compiled once per ISA.
// Kept free of at::Tensor so the per-ISA translation units stay small.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

namespace fastcore_train::cpu {

struct BceParams {
  const void* logits = nullptr;  // (rows, classes), classes contiguous, dtype `dtype`
  int64_t row_stride = 0;        // in elements
  int64_t rows = 0;
  int64_t classes = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;  // logits dtype; acc is float64 iff Double
  const int64_t* target = nullptr;    // (rows,), each in [0, classes)
  const int64_t* target_b = nullptr;  // null: one target
  const void* lam = nullptr;          // acc dtype, (rows,), contiguous; null: lam_scalar
  double lam_scalar = 1.0;
  double smoothing = 0.0;
  const void* pos_weight = nullptr;   // acc dtype, (classes,), contiguous; null: all 1
  // forward output, acc dtype: the loss of each row (rows,) for bce_forward_rows_kernel, the
  // elementwise loss (rows, classes) contiguous for bce_forward_elementwise_kernel
  void* loss = nullptr;
  // backward: the upstream gradient, acc dtype (rows, classes) contiguous, or null for one
  // value `grad_scalar` for every element (reduction mean or sum, the mean's 1/(B*C) folded in)
  const void* grad_loss = nullptr;
  double grad_scalar = 0.0;
  void* grad_logits = nullptr;  // (rows, classes) contiguous, logits dtype
  bool stream_stores = false;   // write grad_logits with non-temporal stores
};

}  // namespace fastcore_train::cpu

FT_ISA_DECLARE(void, bce_forward_rows_kernel, (const BceParams& p))
FT_ISA_DECLARE(void, bce_forward_elementwise_kernel, (const BceParams& p))
FT_ISA_DECLARE(void, bce_backward_kernel, (const BceParams& p))
