// Raw-pointer description of one fused uint8 normalize (+ mixup or cutmix), the interface
// between the launcher (common/normalize_mixup_launch.h) and the CPU and CUDA kernels.
//
//   norm(v, c) = (float(v) - mean[c]) / std[c]                       (float32, as torch's eager)
//   kNormalize: out[i] = norm(x[i])
//   kMixup:     out[i] = wa_i * norm(x[i]) + wb_i * norm(x[src[i]])
//               (wa_i = lam_i, wb_i = 1 - lam_i in lam's float32, or the float32 roundings of
//               a Python lam and of 1 - lam computed in double, as torch's scalar ops take them)
//   kCutmix:    out[i] = norm(x[src[i]]) inside box_i, norm(x[i]) outside
//
// A sample is `planes` planes of `rows` rows of `row_len` elements, dense, laid out the same in
// x and out (common/mixup_args.h's CutmixArgs geometry):
//   NCHW: planes = C, rows = H, row_len = W,     col_unit = 1  (channel = plane)
//   NHWC: planes = 1, rows = H, row_len = W * C, col_unit = C  (channel = element % C)
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastcore_train {

enum class NormMixMode : int { kNormalize = 0, kMixup = 1, kCutmix = 2 };

struct NormMixArgs {
  const uint8_t* x = nullptr;
  int64_t x_stride = 0;  // between samples, in elements
  void* out = nullptr;
  int64_t out_stride = 0;
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t planes = 0, rows = 0, row_len = 0, col_unit = 1;
  c10::ScalarType out_dtype = c10::ScalarType::Float;
  NormMixMode mode = NormMixMode::kNormalize;
  const int64_t* src = nullptr;  // (batch,) on x's device; null for kNormalize
  const float* lam = nullptr;    // (batch,) float32 on x's device, or null: lam_scalar
  double lam_scalar = 1.0;
  const int64_t* boxes = nullptr;  // (batch, 4) (y0, y1, x0, x1), or null: `box`
  int64_t box[4] = {0, 0, 0, 0};
  const float* mean = nullptr;  // (channels,) float32 on x's device
  const float* std = nullptr;
};

}  // namespace fastcore_train
