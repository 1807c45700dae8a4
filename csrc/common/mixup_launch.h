// The mixup and cutmix operators, written once for every device: checks, layout, allocation
// and the choice between a fused pass and the fallback; the device supplies the kernels.
//
//   struct Device {
//     static at::Tensor alloc(at::IntArrayRef sizes, at::IntArrayRef strides,
//                             const at::TensorOptions& options);
//     static void blend(const BlendArgs& a);     // a.batch > 0, a.n > 0
//     static void cutmix(const CutmixArgs& a);   // a.batch > 0, non-empty sample
//   };
//
// Layout: the output has x's memory format as torch suggests it (contiguous, channels_last or
// channels_last_3d, so a fake kernel can predict it). A kernel needs every sample to be one
// dense block with the same element order in x and out; x that is not (e.g. a slice along a
// spatial dimension) is first copied into out's layout. A user's out= that is not gets the
// result through a temporary, and in place falls back the same way: correct, not fused.
//
// Values (perm, per-sample lam, per-sample boxes) are checked before any kernel reads through
// them. On the CPU the check reads them and names the bad one. On a GPU reading them would
// stall the stream every step, so the same conditions are asserted on the device
// (at::_assert_async, as torch's own index kernels do): a bad value is a device-side assert at
// the next synchronisation, and no call waits for the device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/mixup_args.h"
#include "common/mixup_checks.h"

namespace fastcore_train::mixup_impl {

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::vector<int64_t> format_strides(at::IntArrayRef sizes, at::MemoryFormat fmt) {
  // A meta tensor computes the strides of a memory format without allocating.
  return at::empty(sizes, at::TensorOptions().device(at::kMeta).dtype(at::kByte), fmt)
      .strides()
      .vec();
}

inline int64_t sample_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Each sample of t is a dense block (requires t.size(0) > 0).
inline bool sample_dense(const at::Tensor& t) {
  return t.select(0, 0).is_non_overlapping_and_dense();
}

// Samples are dense and disjoint: t can be written row by row.
inline bool rows_writable(const at::Tensor& t) {
  return sample_dense(t) && (t.size(0) == 1 || t.stride(0) >= sample_numel(t));
}

inline bool same_inner_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 1; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Whether the memory of a and b intersects (by address range, as the Python check does).
inline bool memory_overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (a.storage().data() != b.storage().data()) return false;
  auto span = [](const at::Tensor& t) {
    int64_t lo = t.storage_offset(), hi = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t ext = (t.size(d) - 1) * t.stride(d);
      if (ext >= 0) hi += ext; else lo += ext;
    }
    return std::make_pair(lo * t.element_size(), (hi + 1) * t.element_size());
  };
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

inline void check_no_overlap(const char* op, const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK_VALUE(!memory_overlaps(x, out), op,
                    ": out overlaps x but is not x; pass out=x to work in place, or a "
                    "non-overlapping tensor");
}

// x with the inner strides of `ref` (a tensor whose samples are dense): x itself when it has
// them, else a copy.
inline at::Tensor with_layout_of(const at::Tensor& x, const at::Tensor& ref) {
  if (sample_dense(x) && same_inner_strides(x, ref)) return x;
  std::vector<int64_t> strides = ref.strides().vec();
  strides[0] = sample_numel(ref);
  at::Tensor y = at::empty_strided(x.sizes(), strides, x.options());
  y.copy_(x);
  return y;
}

// perm is a permutation of range(B) (an involution when `involution`: in place).
inline void check_perm(const char* op, const at::Tensor& perm, bool involution) {
  const int64_t B = perm.numel();
  if (perm.is_cpu()) {
    at::Tensor p = perm.contiguous();
    check_perm_values(op, p.const_data_ptr<int64_t>(), B, involution);
    return;
  }
  if (B == 0) return;
  const at::Tensor idx = at::arange(B, perm.options());
  at::_assert_async(((perm >= 0) & (perm < B)).all(),
                    std::string(op) + ": perm has a value outside [0, batch)");
  // perm is a bijection iff inv[perm[i]] == i for every i, with inv[perm[i]] = i scattered
  // (a repeated value keeps one of its positions, so another position fails)
  const at::Tensor p = perm.clamp(0, B - 1);
  const at::Tensor inv = at::empty_like(p).scatter_(0, p, idx);
  at::_assert_async(inv.index_select(0, p).eq(idx).all(),
                    std::string(op) + ": perm is not a permutation (a value appears twice)");
  if (involution) {
    at::_assert_async(p.index_select(0, p).eq(idx).all(),
                      std::string(op) + ": in place (out=x) needs perm to be an involution "
                      "(perm[perm[i]] == i)");
  }
}

// Every per-sample lam in [0, 1] (NaN refused too).
inline void check_lam_tensor(const char* op, const std::optional<at::Tensor>& lam) {
  if (!lam.has_value() || lam->numel() == 0) return;
  if (lam->is_cpu()) {
    check_lam_values(op, lam->to(at::kDouble).contiguous());
  } else {
    at::_assert_async(((*lam >= 0) & (*lam <= 1)).all(),
                      std::string(op) + ": lam must be in [0, 1]");
  }
}

// inverse(perm) on perm's device (perm already checked).
inline at::Tensor inverse_perm(const at::Tensor& perm) {
  const int64_t B = perm.numel();
  if (!perm.is_cpu()) {
    return at::empty_like(perm).scatter_(0, perm, at::arange(B, perm.options()));
  }
  at::Tensor p = perm.contiguous();
  at::Tensor inv = at::empty({B}, p.options());
  const int64_t* src = p.const_data_ptr<int64_t>();
  int64_t* q = inv.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) q[src[i]] = i;
  return inv;
}

template <class D>
at::Tensor alloc_like(const at::Tensor& x) {
  return D::alloc(x.sizes(), format_strides(x.sizes(), x.suggest_memory_format()), x.options());
}

// ---- mixup -------------------------------------------------------------------------------

template <class D>
void blend_into(const at::Tensor& x, const at::Tensor& src, const std::optional<at::Tensor>& lam,
                double lam_scalar, bool lam_from_source, const at::Tensor& out, bool pairs) {
  at::Tensor xk = pairs ? x : with_layout_of(x, out);
  at::Tensor s = src.contiguous();
  at::Tensor l = lam.has_value() ? lam->to(acc_type(x.scalar_type())).contiguous() : at::Tensor();
  BlendArgs a;
  a.x = xk.const_data_ptr();
  a.x_stride = xk.size(0) > 1 ? xk.stride(0) : 0;
  a.out = out.data_ptr();
  a.out_stride = out.size(0) > 1 ? out.stride(0) : 0;
  a.batch = out.size(0);
  a.n = sample_numel(out);
  a.dtype = out.scalar_type();
  a.src = s.const_data_ptr<int64_t>();
  a.lam = l.defined() ? l.const_data_ptr() : nullptr;
  a.lam_scalar = lam_scalar;
  a.lam_from_source = lam_from_source;
  a.pairs = pairs;
  D::blend(a);
}

template <class D>
at::Tensor mixup(const at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& lam,
                 double lam_scalar) {
  check_blend_inputs("mixup", x, perm);
  check_lam(x, lam, lam_scalar);
  check_perm("mixup", perm, false);
  check_lam_tensor("mixup", lam);
  at::Tensor out = alloc_like<D>(x);
  if (out.numel() == 0) return out;
  blend_into<D>(x, perm, lam, lam_scalar, false, out, false);
  return out;
}

template <class D>
void mixup_out(const at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& lam,
               double lam_scalar, at::Tensor& out) {
  check_blend_inputs("mixup", x, perm);
  check_lam(x, lam, lam_scalar);
  check_out("mixup", x, out);
  check_no_overlap("mixup", x, out);
  check_perm("mixup", perm, false);
  check_lam_tensor("mixup", lam);
  if (out.numel() == 0) return;
  if (rows_writable(out)) {
    blend_into<D>(x, perm, lam, lam_scalar, false, out, false);
  } else {
    out.copy_(mixup<D>(x, perm, lam, lam_scalar));
  }
}

template <class D>
void mixup_inplace(at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& lam,
                   double lam_scalar) {
  check_blend_inputs("mixup", x, perm);
  check_lam(x, lam, lam_scalar);
  check_perm("mixup", perm, true);
  check_lam_tensor("mixup", lam);
  if (x.numel() == 0) return;
  if (rows_writable(x)) {
    blend_into<D>(x, perm, lam, lam_scalar, false, x, true);
  } else {
    x.copy_(mixup<D>(x, perm, lam, lam_scalar));
  }
}

// d x[j] = lam_j g[j] + (1 - lam_{inv j}) g[inv j]: the blend of g with the inverse
// permutation, the second weight taken from the source row.
template <class D>
at::Tensor mixup_backward(const at::Tensor& grad, const at::Tensor& perm,
                          const std::optional<at::Tensor>& lam, double lam_scalar) {
  check_blend_inputs("mixup", grad, perm);
  check_lam(grad, lam, lam_scalar);
  check_perm("mixup", perm, false);
  at::Tensor out = alloc_like<D>(grad);
  if (out.numel() == 0) return out;
  blend_into<D>(grad, inverse_perm(perm), lam, lam_scalar, true, out, false);
  return out;
}

// ---- cutmix ------------------------------------------------------------------------------

struct Geometry {
  bool ok = false;
  int64_t planes = 0, rows = 0, row_len = 0, col_unit = 1;
};

// NCHW or NHWC samples (t dense per sample); anything else is !ok.
inline Geometry geometry(const at::Tensor& t) {
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  auto is = [&](int64_t d, int64_t s) { return t.size(d) <= 1 || t.stride(d) == s; };
  Geometry g;
  if (is(1, H * W) && is(2, W) && is(3, 1)) {
    g = {true, C, H, W, 1};
  } else if (is(1, 1) && is(3, C) && is(2, W * C)) {
    g = {true, 1, H, W * C, C};
  }
  return g;
}

struct Boxes {
  at::Tensor dev;  // (B, 4) int64 contiguous on x's device, or undefined
  int64_t box[4] = {0, 0, 0, 0};
};

inline Boxes check_boxes(const at::Tensor& x, const std::optional<at::Tensor>& boxes,
                         at::IntArrayRef box) {
  const int64_t H = x.size(2), W = x.size(3);
  Boxes r;
  if (boxes.has_value()) {
    check_boxes_meta(x, *boxes);
    r.dev = boxes->to(at::kLong).contiguous();
    if (r.dev.is_cpu()) {
      const int64_t* p = r.dev.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < r.dev.size(0); ++i) check_box_value(p + 4 * i, H, W, i);
    } else if (r.dev.numel() > 0) {  // on the device: no host read (see the top of the file)
      const at::Tensor y0 = r.dev.select(1, 0), y1 = r.dev.select(1, 1);
      const at::Tensor x0 = r.dev.select(1, 2), x1 = r.dev.select(1, 3);
      at::_assert_async(((y0 >= 0) & (y0 <= y1) & (y1 <= H) & (x0 >= 0) & (x0 <= x1) & (x1 <= W))
                            .all(),
                        "cutmix: a box (y0, y1, x0, x1) is outside the image");
    }
  } else {
    check_box_list(box);
    std::copy(box.begin(), box.end(), r.box);
    check_box_value(r.box, H, W, -1);
  }
  return r;
}

inline void check_cutmix(const at::Tensor& x, const at::Tensor& perm) {
  check_blend_inputs("cutmix", x, perm);
  check_cutmix_x(x);
}

template <class D>
void cutmix_into(const at::Tensor& x, const at::Tensor& src, const Boxes& b, const at::Tensor& out,
                 const Geometry& g, CutmixMode mode) {
  at::Tensor xk = mode == CutmixMode::kSwapPairs ? x : with_layout_of(x, out);
  at::Tensor s = src.contiguous();
  CutmixArgs a;
  a.x = xk.const_data_ptr();
  a.x_stride = xk.size(0) > 1 ? xk.stride(0) : 0;
  a.out = out.data_ptr();
  a.out_stride = out.size(0) > 1 ? out.stride(0) : 0;
  a.batch = out.size(0);
  a.planes = g.planes;
  a.rows = g.rows;
  a.row_len = g.row_len;
  a.col_unit = g.col_unit;
  a.dtype = out.scalar_type();
  a.src = s.const_data_ptr<int64_t>();
  a.boxes = b.dev.defined() ? b.dev.const_data_ptr<int64_t>() : nullptr;
  std::copy(b.box, b.box + 4, a.box);
  a.mode = mode;
  D::cutmix(a);
}

template <class D>
at::Tensor cutmix(const at::Tensor& x, const at::Tensor& perm,
                  const std::optional<at::Tensor>& boxes, at::IntArrayRef box) {
  check_cutmix(x, perm);
  Boxes b = check_boxes(x, boxes, box);
  check_perm("cutmix", perm, false);
  at::Tensor out = alloc_like<D>(x);
  if (out.numel() == 0) return out;
  const Geometry g = geometry(out);
  TORCH_INTERNAL_ASSERT(g.ok, "cutmix: unexpected output layout ", out.strides());
  cutmix_into<D>(x, perm, b, out, g, CutmixMode::kPaste);
  return out;
}

template <class D>
void cutmix_out(const at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& boxes,
                at::IntArrayRef box, at::Tensor& out) {
  check_cutmix(x, perm);
  Boxes b = check_boxes(x, boxes, box);
  check_out("cutmix", x, out);
  check_no_overlap("cutmix", x, out);
  check_perm("cutmix", perm, false);
  if (out.numel() == 0) return;
  const Geometry g = rows_writable(out) ? geometry(out) : Geometry{};
  if (g.ok) {
    cutmix_into<D>(x, perm, b, out, g, CutmixMode::kPaste);
  } else {
    out.copy_(cutmix<D>(x, perm, boxes, box));
  }
}

template <class D>
void cutmix_inplace(at::Tensor& x, const at::Tensor& perm, const std::optional<at::Tensor>& boxes,
                    at::IntArrayRef box) {
  check_cutmix(x, perm);
  Boxes b = check_boxes(x, boxes, box);
  check_perm("cutmix", perm, true);
  if (x.numel() == 0) return;
  const Geometry g = rows_writable(x) ? geometry(x) : Geometry{};
  if (g.ok) {
    cutmix_into<D>(x, perm, b, x, g, CutmixMode::kSwapPairs);
  } else {
    x.copy_(cutmix<D>(x, perm, boxes, box));
  }
}

// d x[j] = g[j] outside box_j + g[inv j] inside box_{inv j}.
template <class D>
at::Tensor cutmix_backward(const at::Tensor& grad, const at::Tensor& perm,
                           const std::optional<at::Tensor>& boxes, at::IntArrayRef box) {
  check_cutmix(grad, perm);
  Boxes b = check_boxes(grad, boxes, box);
  check_perm("cutmix", perm, false);
  at::Tensor out = alloc_like<D>(grad);
  if (out.numel() == 0) return out;
  const Geometry g = geometry(out);
  TORCH_INTERNAL_ASSERT(g.ok, "cutmix: unexpected output layout ", out.strides());
  cutmix_into<D>(grad, inverse_perm(perm), b, out, g, CutmixMode::kBackward);
  return out;
}

}  // namespace fastcore_train::mixup_impl
