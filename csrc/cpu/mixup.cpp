// CPU implementation of the fastcore_train mixup and cutmix operators: the device-independent
// logic lives in common/mixup_launch.h; this file supplies the allocation (huge pages for
// big outputs), the per-ISA blend kernel and the cutmix kernel.
//
// Cutmix moves bytes and never does arithmetic except in its backward, so its kernel is plain
// memcpy over row segments, compiled once (memcpy is already vectorised by the C library).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/mixup_launch.h"
#include "cpu/alloc.h"
#include "cpu/isa.h"
#include "cpu/kernels/mixup_kernel.h"

namespace fastcore_train {
namespace {

// Below this many bytes per thread the cutmix kernel stays on one thread.
constexpr int64_t kSerialBytes = 256 << 10;

template <typename T>
void add_row(char* out, const char* g, int64_t n) {
  T* o = reinterpret_cast<T*>(out);
  const T* s = reinterpret_cast<const T*>(g);
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    for (int64_t k = 0; k < n; ++k) o[k] += s[k];
  } else {
    for (int64_t k = 0; k < n; ++k) o[k] = static_cast<T>(static_cast<float>(o[k]) + static_cast<float>(s[k]));
  }
}

void add_row(at::ScalarType t, char* out, const char* g, int64_t n) {
  switch (t) {
    case at::kFloat: return add_row<float>(out, g, n);
    case at::kDouble: return add_row<double>(out, g, n);
    case at::kHalf: return add_row<c10::Half>(out, g, n);
    case at::kBFloat16: return add_row<c10::BFloat16>(out, g, n);
    default: TORCH_INTERNAL_ASSERT(false, "cutmix: unexpected dtype ", t);
  }
}

void cutmix_kernel(const CutmixArgs& a) {
  const int64_t es = static_cast<int64_t>(c10::elementSize(a.dtype));
  const int64_t row_bytes = a.row_len * es;
  const int64_t plane = a.rows * a.row_len;  // elements
  const char* x = static_cast<const char*>(a.x);
  char* out = static_cast<char*>(a.out);
  auto box_of = [&](int64_t i) { return a.boxes ? a.boxes + 4 * i : a.box; };
  // Pointer to row h of plane p of sample i of x / out.
  auto xrow = [&](int64_t i, int64_t p, int64_t h) {
    return x + ((i * a.x_stride) + p * plane + h * a.row_len) * es;
  };
  auto orow = [&](int64_t i, int64_t p, int64_t h) {
    return out + ((i * a.out_stride) + p * plane + h * a.row_len) * es;
  };
  const int64_t grain = std::max<int64_t>(1, kSerialBytes / std::max<int64_t>(1, plane * es));

  if (a.mode == CutmixMode::kPaste) {
    // One pass: every output element is copied once, from x[i] or, inside the box, x[src[i]].
    at::parallel_for(0, a.batch * a.planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t i = u / a.planes, p = u % a.planes, s = a.src[i];
        const int64_t* b = box_of(i);
        const int64_t c0 = b[2] * a.col_unit * es, c1 = b[3] * a.col_unit * es;
        if (b[0] == b[1] || c0 == c1 || s == i) {
          std::memcpy(orow(i, p, 0), xrow(i, p, 0), plane * es);
          continue;
        }
        std::memcpy(orow(i, p, 0), xrow(i, p, 0), b[0] * row_bytes);
        for (int64_t h = b[0]; h < b[1]; ++h) {
          char* o = orow(i, p, h);
          const char* xi = xrow(i, p, h);
          std::memcpy(o, xi, c0);
          std::memcpy(o + c0, xrow(s, p, h) + c0, c1 - c0);
          std::memcpy(o + c1, xi + c1, row_bytes - c1);
        }
        std::memcpy(orow(i, p, b[1]), xrow(i, p, b[1]), (a.rows - b[1]) * row_bytes);
      }
    });
    return;
  }

  if (a.mode == CutmixMode::kSwapPairs) {
    // In place, pairs (i, j = src[i]): only the rows and columns of box_i and box_j are read
    // and written. Row by row: save x_i's part under box_j, paste x_j into box_i (x_j is still
    // intact), then paste the saved part into box_j.
    std::vector<int64_t> leaders;
    for (int64_t i = 0; i < a.batch; ++i) {
      if (a.src[i] > i) leaders.push_back(i);
    }
    const int64_t units = static_cast<int64_t>(leaders.size()) * a.planes;
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      std::vector<char> tmp(static_cast<size_t>(row_bytes));
      for (int64_t u = begin; u < end; ++u) {
        const int64_t i = leaders[u / a.planes], p = u % a.planes, j = a.src[i];
        const int64_t* bi = box_of(i);
        const int64_t* bj = box_of(j);
        const int64_t ci0 = bi[2] * a.col_unit * es, ci1 = bi[3] * a.col_unit * es;
        const int64_t cj0 = bj[2] * a.col_unit * es, cj1 = bj[3] * a.col_unit * es;
        const int64_t h0 = std::min(bi[0], bj[0]), h1 = std::max(bi[1], bj[1]);
        for (int64_t h = h0; h < h1; ++h) {
          const bool in_i = bi[0] <= h && h < bi[1] && ci0 < ci1;
          const bool in_j = bj[0] <= h && h < bj[1] && cj0 < cj1;
          char* ri = orow(i, p, h);
          char* rj = orow(j, p, h);
          if (in_j) std::memcpy(tmp.data(), ri + cj0, cj1 - cj0);
          if (in_i) std::memcpy(ri + ci0, rj + ci0, ci1 - ci0);
          if (in_j) std::memcpy(rj + cj0, tmp.data(), cj1 - cj0);
        }
      }
    });
    return;
  }

  TORCH_INTERNAL_ASSERT(a.mode == CutmixMode::kBackward);
  // d x[j] = g[j] with box_j zeroed, plus g[s] inside box_s, s = src[j] = inverse(perm)[j].
  at::parallel_for(0, a.batch * a.planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t j = u / a.planes, p = u % a.planes, s = a.src[j];
      const int64_t* bj = box_of(j);
      const int64_t* bs = box_of(s);
      std::memcpy(orow(j, p, 0), xrow(j, p, 0), plane * es);
      const int64_t cj0 = bj[2] * a.col_unit, cj1 = bj[3] * a.col_unit;
      for (int64_t h = bj[0]; h < bj[1]; ++h) {
        std::memset(orow(j, p, h) + cj0 * es, 0, (cj1 - cj0) * es);
      }
      const int64_t cs0 = bs[2] * a.col_unit, cs1 = bs[3] * a.col_unit;
      for (int64_t h = bs[0]; h < bs[1]; ++h) {
        add_row(a.dtype, orow(j, p, h) + cs0 * es, xrow(s, p, h) + cs0 * es, cs1 - cs0);
      }
    }
  });
}

struct CpuDevice {
  static at::Tensor alloc(at::IntArrayRef sizes, at::IntArrayRef strides,
                          const at::TensorOptions& options) {
    return cpu::empty_large(sizes, strides, options);
  }
  static void blend(const BlendArgs& a) { FT_ISA_CALL(mixup_blend_kernel, a); }
  static void cutmix(const CutmixArgs& a) { cutmix_kernel(a); }
};

namespace impl = mixup_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("mixup", &impl::mixup<CpuDevice>);
  m.impl("mixup.out", &impl::mixup_out<CpuDevice>);
  m.impl("mixup_", &impl::mixup_inplace<CpuDevice>);
  m.impl("mixup_backward", &impl::mixup_backward<CpuDevice>);
  m.impl("cutmix", &impl::cutmix<CpuDevice>);
  m.impl("cutmix.out", &impl::cutmix_out<CpuDevice>);
  m.impl("cutmix_", &impl::cutmix_inplace<CpuDevice>);
  m.impl("cutmix_backward", &impl::cutmix_backward<CpuDevice>);
}

}  // namespace fastcore_train
