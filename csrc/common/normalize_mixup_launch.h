// The fused uint8 normalize + mixup/cutmix operators, written once for every device: checks,
// layout, allocation; the device supplies the kernel.
//
//   struct Device {
//     static at::Tensor alloc(at::IntArrayRef sizes, at::IntArrayRef strides,
//                             const at::TensorOptions& options);
//     static void normalize(const NormMixArgs& a);   // a.batch > 0, non-empty sample
//   };
//
// Layout, values and fallbacks as in common/mixup_launch.h (whose helpers this reuses): the
// output has x's memory format (contiguous or channels_last); x whose samples are not dense is
// first copied (as uint8) into that layout; a user's out= the kernel cannot write row by row gets
// the result through a temporary. perm, per-sample lam, boxes, mean and std are checked on the
// CPU by reading them, on a GPU by device-side asserts (no host sync).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "common/mixup_launch.h"
#include "common/normalize_mixup_args.h"
#include "common/normalize_mixup_checks.h"

namespace fastcore_train::normmix_impl {

using OptT = std::optional<at::Tensor>;
using mixup_impl::geometry;
using mixup_impl::Geometry;

struct Inputs {
  at::Tensor mean, std;  // contiguous float32 on x's device
  at::Tensor lam;        // contiguous float32, or undefined
  double lam_scalar = 1.0;
  at::Tensor boxes;      // (B, 4) contiguous int64, or undefined
  int64_t box[4] = {0, 0, 0, 0};
};

// Checks in three phases, the order of the Python checks: metadata (and the Python values: a
// scalar lam, a batch box), then out=, then the tensors' values.

inline void check_stats_meta(const char* op, const at::Tensor& x, Inputs& in,
                             const at::Tensor& mean, const at::Tensor& std) {
  check_normmix_stats(op, x, mean, "mean");
  check_normmix_stats(op, x, std, "std");
  in.mean = mean.contiguous();
  in.std = std.contiguous();
}

inline void check_stats_values(const char* op, const Inputs& in) {
  if (in.mean.numel() == 0) return;
  if (in.mean.is_cpu()) {
    check_normmix_stat_values(op, in.mean.const_data_ptr<float>(), in.std.const_data_ptr<float>(),
                              in.mean.numel());
  } else {  // on the device: no host read
    at::_assert_async((at::isfinite(in.mean).all() & at::isfinite(in.std).all() &
                       in.std.ne(0).all()),
                      std::string(op) + ": mean and std must be finite and std non-zero");
  }
}

inline void check_lam_meta(const char* op, const at::Tensor& x, Inputs& in, const OptT& lam,
                           double lam_scalar) {
  check_normmix_lam(op, x, lam, lam_scalar);
  if (lam.has_value()) in.lam = lam->to(at::kFloat).contiguous();
  in.lam_scalar = lam_scalar;
}

inline void check_boxes_meta(const char* op, const at::Tensor& x, Inputs& in, const OptT& boxes,
                             at::IntArrayRef box) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  if (boxes.has_value()) {
    TORCH_CHECK_TYPE(is_integral_dtype(boxes->scalar_type()), op,
                     ": boxes must be an integer tensor, got ", py_dtype(boxes->scalar_type()));
    TORCH_CHECK_VALUE(boxes->dim() == 2 && boxes->size(0) == B && boxes->size(1) == 4, op,
                      ": boxes must have shape (", B, ", 4), got ", boxes->sizes());
    TORCH_CHECK_VALUE(boxes->device() == x.device(), op, ": boxes is on ", boxes->device(),
                      " but x is on ", x.device());
    in.boxes = boxes->to(at::kLong).contiguous();
  } else {
    TORCH_CHECK_VALUE(box.size() == 4, op, ": box must be 4 ints (y0, y1, x0, x1), got ",
                      box.size());
    std::copy(box.begin(), box.end(), in.box);
    check_normmix_box_value(op, in.box, H, W, -1);
  }
}

inline void check_boxes_values(const char* op, const at::Tensor& x, const Inputs& in) {
  if (!in.boxes.defined() || in.boxes.numel() == 0) return;
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  if (in.boxes.is_cpu()) {
    const int64_t* p = in.boxes.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) check_normmix_box_value(op, p + 4 * i, H, W, i);
  } else {  // on the device: no host read
    const at::Tensor y0 = in.boxes.select(1, 0), y1 = in.boxes.select(1, 1);
    const at::Tensor x0 = in.boxes.select(1, 2), x1 = in.boxes.select(1, 3);
    at::_assert_async(((y0 >= 0) & (y0 <= y1) & (y1 <= H) & (x0 >= 0) & (x0 <= x1) & (x1 <= W))
                          .all(),
                      std::string(op) + ": a box (y0, y1, x0, x1) is outside the image");
  }
}

inline void check_out(const char* op, const at::Tensor& x, const at::Tensor& out,
                      at::ScalarType out_dtype) {
  check_normmix_out(op, x, out, out_dtype);
  TORCH_CHECK_VALUE(!mixup_impl::memory_overlaps(x, out), op,
                    ": out overlaps x; pass a tensor that shares no memory with x");
}

template <class D>
at::Tensor alloc_out(const at::Tensor& x, at::ScalarType out_dtype) {
  return D::alloc(x.sizes(), mixup_impl::format_strides(x.sizes(), x.suggest_memory_format()),
                  x.options().dtype(out_dtype));
}

// out (dense samples, NCHW or NHWC: geometry g) <- the op on x.
template <class D>
void run_into(const at::Tensor& x, const OptT& perm, const Inputs& in, NormMixMode mode,
              const at::Tensor& out, const Geometry& g) {
  const at::Tensor xk = mixup_impl::with_layout_of(x, out);
  const at::Tensor p = perm.has_value() ? perm->contiguous() : at::Tensor();
  NormMixArgs a;
  a.x = xk.const_data_ptr<uint8_t>();
  a.x_stride = xk.size(0) > 1 ? xk.stride(0) : 0;
  a.out = out.data_ptr();
  a.out_stride = out.size(0) > 1 ? out.stride(0) : 0;
  a.batch = out.size(0);
  a.channels = out.size(1);
  a.planes = g.planes;
  a.rows = g.rows;
  a.row_len = g.row_len;
  a.col_unit = g.col_unit;
  a.out_dtype = out.scalar_type();
  a.mode = mode;
  a.src = p.defined() ? p.const_data_ptr<int64_t>() : nullptr;
  a.lam = in.lam.defined() ? in.lam.const_data_ptr<float>() : nullptr;
  a.lam_scalar = in.lam_scalar;
  a.boxes = in.boxes.defined() ? in.boxes.const_data_ptr<int64_t>() : nullptr;
  std::copy(in.box, in.box + 4, a.box);
  a.mean = in.mean.const_data_ptr<float>();
  a.std = in.std.const_data_ptr<float>();
  D::normalize(a);
}

template <class D>
void run_out(const at::Tensor& x, const OptT& perm, const Inputs& in, NormMixMode mode,
             at::Tensor& out) {
  if (out.numel() == 0) return;
  const Geometry g = mixup_impl::rows_writable(out) ? geometry(out) : Geometry{};
  if (g.ok) {
    run_into<D>(x, perm, in, mode, out, g);
    return;
  }
  at::Tensor tmp = alloc_out<D>(x, out.scalar_type());
  const Geometry gt = geometry(tmp);
  TORCH_INTERNAL_ASSERT(gt.ok, "normalize_mixup: unexpected output layout ", tmp.strides());
  run_into<D>(x, perm, in, mode, tmp, gt);
  out.copy_(tmp);
}

template <class D>
at::Tensor run_new(const at::Tensor& x, const OptT& perm, const Inputs& in, NormMixMode mode,
                   at::ScalarType out_dtype) {
  at::Tensor out = alloc_out<D>(x, out_dtype);
  if (out.numel() == 0) return out;
  const Geometry g = geometry(out);
  TORCH_INTERNAL_ASSERT(g.ok, "normalize_mixup: unexpected output layout ", out.strides());
  run_into<D>(x, perm, in, mode, out, g);
  return out;
}

// ---- normalize_mixup (perm absent: normalize only) ----------------------------------------

inline Inputs check_mixup(const at::Tensor& x, const OptT& perm, const OptT& lam,
                          double lam_scalar, const at::Tensor& mean, const at::Tensor& std,
                          at::ScalarType out_dtype, const at::Tensor* out) {
  constexpr const char* op = "normalize_mixup";
  check_normmix_x(op, x);
  check_normmix_out_dtype(op, out_dtype);
  if (perm.has_value()) check_normmix_perm(op, x, *perm);
  Inputs in;
  check_lam_meta(op, x, in, lam, lam_scalar);
  check_stats_meta(op, x, in, mean, std);
  if (out != nullptr) check_out(op, x, *out, out_dtype);
  mixup_impl::check_lam_tensor(op, lam);
  check_stats_values(op, in);
  if (perm.has_value()) mixup_impl::check_perm(op, *perm, false);
  return in;
}

inline NormMixMode mixup_mode(const OptT& perm) {
  return perm.has_value() ? NormMixMode::kMixup : NormMixMode::kNormalize;
}

template <class D>
at::Tensor normalize_mixup(const at::Tensor& x, const OptT& perm, const OptT& lam,
                           double lam_scalar, const at::Tensor& mean, const at::Tensor& std,
                           at::ScalarType out_dtype) {
  const Inputs in = check_mixup(x, perm, lam, lam_scalar, mean, std, out_dtype, nullptr);
  return run_new<D>(x, perm, in, mixup_mode(perm), out_dtype);
}

template <class D>
void normalize_mixup_out(const at::Tensor& x, const OptT& perm, const OptT& lam, double lam_scalar,
                         const at::Tensor& mean, const at::Tensor& std, at::ScalarType out_dtype,
                         at::Tensor& out) {
  const Inputs in = check_mixup(x, perm, lam, lam_scalar, mean, std, out_dtype, &out);
  run_out<D>(x, perm, in, mixup_mode(perm), out);
}

// ---- normalize_cutmix ---------------------------------------------------------------------

inline Inputs check_cutmix(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                           at::IntArrayRef box, const at::Tensor& mean, const at::Tensor& std,
                           at::ScalarType out_dtype, const at::Tensor* out) {
  constexpr const char* op = "normalize_cutmix";
  check_normmix_x(op, x);
  check_normmix_out_dtype(op, out_dtype);
  check_normmix_perm(op, x, perm);
  Inputs in;
  check_boxes_meta(op, x, in, boxes, box);
  check_stats_meta(op, x, in, mean, std);
  if (out != nullptr) check_out(op, x, *out, out_dtype);
  check_boxes_values(op, x, in);
  check_stats_values(op, in);
  mixup_impl::check_perm(op, perm, false);
  return in;
}

template <class D>
at::Tensor normalize_cutmix(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                            at::IntArrayRef box, const at::Tensor& mean, const at::Tensor& std,
                            at::ScalarType out_dtype) {
  const Inputs in = check_cutmix(x, perm, boxes, box, mean, std, out_dtype, nullptr);
  return run_new<D>(x, perm, in, NormMixMode::kCutmix, out_dtype);
}

template <class D>
void normalize_cutmix_out(const at::Tensor& x, const at::Tensor& perm, const OptT& boxes,
                          at::IntArrayRef box, const at::Tensor& mean, const at::Tensor& std,
                          at::ScalarType out_dtype, at::Tensor& out) {
  const Inputs in = check_cutmix(x, perm, boxes, box, mean, std, out_dtype, &out);
  run_out<D>(x, perm, in, NormMixMode::kCutmix, out);
}

}  // namespace fastcore_train::normmix_impl
