// Input checks of the mixup and cutmix ops, shared by the CPU and CUDA implementations.
// The messages match fastcore_train/ops/mixup.py word for word (and the exception types:
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_INDEX ->
// IndexError), so both backends report a bad input the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common/py_dtype.h"

namespace fastcore_train {

inline bool mixup_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline bool is_integral_dtype(at::ScalarType t) {
  return t == at::kLong || t == at::kInt || t == at::kShort || t == at::kChar ||
         t == at::kByte;
}

// x and perm (metadata only). `op` is "mixup" or "cutmix".
inline void check_blend_inputs(const char* op, const at::Tensor& x, const at::Tensor& perm) {
  TORCH_CHECK_TYPE(mixup_supported_dtype(x.scalar_type()), op,
                   ": x must be float32, float16, bfloat16 or float64, got ",
                   py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, op,
                    ": x must have a batch dimension (at least 1-D), got a 0-D tensor");
  const int64_t B = x.size(0);
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, op, ": perm must be int64 (torch.long), got ",
                   py_dtype(perm.scalar_type()));
  TORCH_CHECK_VALUE(perm.dim() == 1 && perm.size(0) == B, op, ": perm must have shape (", B,
                    ",) to match the batch of x, got ", perm.sizes());
  TORCH_CHECK_VALUE(perm.device() == x.device(), op, ": perm is on ", perm.device(),
                    " but x is on ", x.device());
}

inline void check_lam(const at::Tensor& x, const std::optional<at::Tensor>& lam,
                      double lam_scalar) {
  if (lam.has_value()) {
    const int64_t B = x.size(0);
    TORCH_CHECK_TYPE(lam->is_floating_point(), "mixup: lam must be a float tensor, got ",
                     py_dtype(lam->scalar_type()));
    TORCH_CHECK_VALUE(lam->dim() == 1 && lam->size(0) == B, "mixup: lam must have shape (", B,
                      ",) to match the batch of x, got ", lam->sizes());
    TORCH_CHECK_VALUE(lam->device() == x.device(), "mixup: lam is on ", lam->device(),
                      " but x is on ", x.device());
  } else {
    TORCH_CHECK_VALUE(lam_scalar >= 0.0 && lam_scalar <= 1.0,
                      "mixup: lam must be in [0, 1], got ", lam_scalar);
  }
}

// Every per-sample lam in [0, 1] (NaN is refused too); lam_host is a contiguous float64 host copy.
inline void check_lam_values(const char* op, const at::Tensor& lam_host) {
  const double* l = lam_host.const_data_ptr<double>();
  for (int64_t i = 0; i < lam_host.numel(); ++i) {
    TORCH_CHECK_VALUE(l[i] >= 0.0 && l[i] <= 1.0, op, ": lam must be in [0, 1], got ", l[i],
                      " (row ", i, ")");
  }
}

// out= of a blend: same shape, dtype and device as x.
inline void check_out(const char* op, const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), op, ": out must have the shape of x, ", x.sizes(),
                    ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": out must have the dtype of x, ",
                   py_dtype(x.scalar_type()), ", got ", py_dtype(out.scalar_type()));
  TORCH_CHECK_VALUE(out.device() == x.device(), op, ": out is on ", out.device(),
                    " but x is on ", x.device());
}

// perm (host copy, contiguous int64) must be a permutation of range(B). With
// `need_involution` (in place), also perm[perm[i]] == i. O(B) time, B bytes.
inline void check_perm_values(const char* op, const int64_t* p, int64_t B, bool need_involution) {
  std::vector<int64_t> first(static_cast<size_t>(B), -1);  // where each value was seen
  for (int64_t i = 0; i < B; ++i) {
    const int64_t v = p[i];
    TORCH_CHECK_INDEX(v >= 0 && v < B, op, ": perm[", i, "] = ", v,
                      " is out of range for a batch of ", B);
    TORCH_CHECK_VALUE(first[v] < 0, op, ": perm is not a permutation: ", v,
                      " appears twice (perm[", first[v], "] and perm[", i, "])");
    first[v] = i;
  }
  if (!need_involution) return;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t j = p[i];
    TORCH_CHECK_VALUE(p[j] == i, op,
                      ": in place (out=x) needs perm to be an involution (perm[perm[i]] == i: "
                      "a flip or pair swaps), but perm[",
                      i, "] = ", j, " and perm[", j, "] = ", p[j]);
  }
}

// ---- cutmix boxes --------------------------------------------------------------------------

inline void check_cutmix_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "cutmix: x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
}

inline void check_box_list(at::IntArrayRef box) {
  TORCH_CHECK_VALUE(box.size() == 4, "cutmix: box must be 4 ints (y0, y1, x0, x1), got ",
                    box.size());
}

inline void check_boxes_meta(const at::Tensor& x, const at::Tensor& boxes) {
  const int64_t B = x.size(0);
  TORCH_CHECK_TYPE(is_integral_dtype(boxes.scalar_type()),
                   "cutmix: boxes must be an integer tensor, got ", py_dtype(boxes.scalar_type()));
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(0) == B && boxes.size(1) == 4,
                    "cutmix: boxes must have shape (", B, ", 4), got ", boxes.sizes());
  TORCH_CHECK_VALUE(boxes.device() == x.device(), "cutmix: boxes is on ", boxes.device(),
                    " but x is on ", x.device());
}

// One box (y0, y1, x0, x1) against an HxW image; `sample` < 0 for the batch box.
inline void check_box_value(const int64_t* b, int64_t H, int64_t W, int64_t sample) {
  const bool ok = 0 <= b[0] && b[0] <= b[1] && b[1] <= H && 0 <= b[2] && b[2] <= b[3] && b[3] <= W;
  if (ok) return;
  std::ostringstream what;
  if (sample >= 0) what << "box of sample " << sample;
  else what << "box";
  TORCH_CHECK_VALUE(false, "cutmix: ", what.str(), " (y0, y1, x0, x1) = (", b[0], ", ", b[1], ", ",
                    b[2], ", ", b[3], ") is outside the ", H, "x", W, " image (need 0 <= y0 <= y1 <= ",
                    H, " and 0 <= x0 <= x1 <= ", W, ")");
}

}  // namespace fastcore_train
