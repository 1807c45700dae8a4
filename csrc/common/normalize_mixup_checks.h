// Input checks of the fused uint8 normalize + mixup/cutmix ops, shared by the CPU and CUDA
// implementations. The messages match fastcore_train/ops/normalize_mixup.py word for word, and
// the exception types too (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_INDEX -> IndexError). `op` is "normalize_mixup" or "normalize_cutmix".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "common/py_dtype.h"

namespace fastcore_train {

inline bool normmix_out_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The float op a float batch belongs to.
inline const char* normmix_float_op(const char* op) {
  return std::string(op) == "normalize_cutmix" ? "ft.ops.cutmix" : "ft.ops.mixup";
}

inline void check_normmix_x(const char* op, const at::Tensor& x) {
  if (at::isFloatingType(x.scalar_type())) {
    TORCH_CHECK_TYPE(false, op, ": x must be uint8 (an image batch as loaded), got ",
                     py_dtype(x.scalar_type()), "; a float batch is mixed by ",
                     normmix_float_op(op));
  }
  TORCH_CHECK_TYPE(x.scalar_type() == at::kByte, op,
                   ": x must be uint8 (an image batch as loaded), got ", py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
}

inline void check_normmix_out_dtype(const char* op, at::ScalarType t) {
  TORCH_CHECK_TYPE(normmix_out_dtype_ok(t), op,
                   ": out_dtype must be torch.float32, torch.bfloat16 or torch.float16, got ",
                   py_dtype(t));
}

inline void check_normmix_perm(const char* op, const at::Tensor& x, const at::Tensor& perm) {
  const int64_t B = x.size(0);
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, op, ": perm must be int64 (torch.long), got ",
                   py_dtype(perm.scalar_type()));
  TORCH_CHECK_VALUE(perm.dim() == 1 && perm.size(0) == B, op, ": perm must have shape (", B,
                    ",) to match the batch of x, got ", perm.sizes());
  TORCH_CHECK_VALUE(perm.device() == x.device(), op, ": perm is on ", perm.device(),
                    " but x is on ", x.device());
}

inline void check_normmix_lam(const char* op, const at::Tensor& x,
                              const std::optional<at::Tensor>& lam, double lam_scalar) {
  if (lam.has_value()) {
    const int64_t B = x.size(0);
    TORCH_CHECK_TYPE(lam->is_floating_point(), op, ": lam must be a float tensor, got ",
                     py_dtype(lam->scalar_type()));
    TORCH_CHECK_VALUE(lam->dim() == 1 && lam->size(0) == B, op, ": lam must have shape (", B,
                      ",) to match the batch of x, got ", lam->sizes());
    TORCH_CHECK_VALUE(lam->device() == x.device(), op, ": lam is on ", lam->device(),
                      " but x is on ", x.device());
  } else {
    TORCH_CHECK_VALUE(lam_scalar >= 0.0 && lam_scalar <= 1.0, op,
                      ": lam must be in [0, 1], got ", lam_scalar);
  }
}

// mean and std metadata: float32, shape (C,), on x's device.
inline void check_normmix_stats(const char* op, const at::Tensor& x, const at::Tensor& t,
                                const char* name) {
  const int64_t C = x.size(1);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name,
                   " must be a float32 tensor, got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (", C,
                    ",) (one value per channel of x), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
}

// mean and std values (contiguous float32 host copies of C values each).
inline void check_normmix_stat_values(const char* op, const float* mean, const float* std,
                                      int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(std::isfinite(mean[c]), op, ": mean[", c, "] = ", mean[c],
                      " is not finite");
    TORCH_CHECK_VALUE(std::isfinite(std[c]) && std[c] != 0.0f, op, ": std[", c, "] = ", std[c],
                      "; std must be finite and non-zero");
  }
}

inline void check_normmix_out(const char* op, const at::Tensor& x, const at::Tensor& out,
                              at::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), op, ": out must have the shape of x, ", x.sizes(),
                    ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == out_dtype, op, ": out must have dtype ",
                   py_dtype(out_dtype), " (out_dtype), got ", py_dtype(out.scalar_type()));
  TORCH_CHECK_VALUE(out.device() == x.device(), op, ": out is on ", out.device(),
                    " but x is on ", x.device());
}

// One box (y0, y1, x0, x1) against an HxW image; `sample` < 0 for the batch box.
inline void check_normmix_box_value(const char* op, const int64_t* b, int64_t H, int64_t W,
                                    int64_t sample) {
  const bool ok = 0 <= b[0] && b[0] <= b[1] && b[1] <= H && 0 <= b[2] && b[2] <= b[3] && b[3] <= W;
  if (ok) return;
  std::ostringstream what;
  if (sample >= 0) what << "box of sample " << sample;
  else what << "box";
  TORCH_CHECK_VALUE(false, op, ": ", what.str(), " (y0, y1, x0, x1) = (", b[0], ", ", b[1], ", ",
                    b[2], ", ", b[3], ") is outside the ", H, "x", W,
                    " image (need 0 <= y0 <= y1 <= ", H, " and 0 <= x0 <= x1 <= ", W, ")");
}

}  // namespace fastcore_train
