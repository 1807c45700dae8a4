// Raw-pointer descriptions of one mixup blend and one cutmix paste, the interface between the
// launchers (common/mixup_launch.h) and the CPU and CUDA kernels. Free of at::Tensor so the
// per-ISA CPU translation units stay small.
//
// Every sample is a dense block of `n` elements laid out the same way in x and out (NCHW,
// NHWC, ... : the launcher guarantees it), so a blend is a 1-D loop over each sample.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastcore_train {

// out[i] = a_i * x[i] + b_i * x[src[i]], with
//   a_i = lam_i,   b_i = 1 - lam_{src[i]} if lam_from_source else 1 - lam_i
// (lam_i = lam[i], or lam_scalar when lam is null). The forward is src = perm; the backward
// is src = inverse(perm) with lam_from_source, since d out[i] / d x[perm[i]] = 1 - lam_i.
struct BlendArgs {
  const void* x = nullptr;
  int64_t x_stride = 0;  // between samples, in elements (0 allowed: an expanded x)
  void* out = nullptr;
  int64_t out_stride = 0;
  int64_t batch = 0;
  int64_t n = 0;  // elements per sample
  c10::ScalarType dtype = c10::ScalarType::Float;
  const int64_t* src = nullptr;  // (batch,), on the device of x
  const void* lam = nullptr;     // (batch,) float32 (float64 for float64 x), or null
  double lam_scalar = 1.0;
  bool lam_from_source = false;
  // In place: out == x and src is an involution. Each pair (i, src[i]) is read and written
  // by the same thread from the same two loaded rows, so no sample is overwritten before its
  // partner has read it.
  bool pairs = false;
};

enum class CutmixMode : int {
  kPaste = 0,      // out[i] = x[i] outside box_i, x[src[i]] inside (out != x): one read, one write
  kSwapPairs = 1,  // in place, src an involution: only the box regions are read and written
  kBackward = 2,   // out[j] = x[j] outside box_j + x[src[j]] inside box_{src[j]}, src = inverse
};

// A sample is `planes` planes of `rows` rows of `row_len` elements, dense; the box columns
// [x0, x1) of a row are elements [x0 * col_unit, x1 * col_unit).
//   NCHW: planes = C, rows = H, row_len = W,     col_unit = 1
//   NHWC: planes = 1, rows = H, row_len = W * C, col_unit = C
struct CutmixArgs {
  const void* x = nullptr;
  int64_t x_stride = 0;  // between samples, in elements
  void* out = nullptr;
  int64_t out_stride = 0;
  int64_t batch = 0;
  int64_t planes = 0, rows = 0, row_len = 0, col_unit = 1;
  c10::ScalarType dtype = c10::ScalarType::Float;
  const int64_t* src = nullptr;    // (batch,), on the device of x
  const int64_t* boxes = nullptr;  // (batch, 4) contiguous (y0, y1, x0, x1), or null: `box`
  int64_t box[4] = {0, 0, 0, 0};
  CutmixMode mode = CutmixMode::kPaste;
};

}  // namespace fastcore_train
