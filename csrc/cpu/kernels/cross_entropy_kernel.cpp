// Label-smoothed cross-entropy on the CPU, one or two targets (mixup).
//
// With q = (1-eps)*(lam*onehot(a) + (1-lam)*onehot(b)) + eps/C  (b = a, lam = 1 for one target):
//   loss_i = lse_i - (1-eps)*(lam*z_ia + (1-lam)*z_ib) - (eps/C) * sum_j z_ij
//   dloss_i/dz_ij = softmax_ij - q_ij
// Forward reads each row once (one unshifted pass when the logits allow it, else an online
// log-sum-exp over L1-sized chunks) and saves only lse;
// backward reads the row once more and writes the gradient once. Accumulation is float32
// (float64 for float64 logits, used by gradcheck).
//
// This file is compiled once per ISA (see setup.py); CPU_CAPABILITY names the namespace.
#include "cpu/kernels/cross_entropy_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/kernels/vec_io.h"

namespace fastcore_train::cpu {
namespace CPU_CAPABILITY {
namespace {

// Elements per online-softmax chunk: 16 KiB of float32, so the exp pass reads from L1.
constexpr int64_t kChunk = 4096;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max that propagates NaN, like torch's max reduction.
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (std::isnan(a) || a > b) ? a : b;
}

struct RowTargets {
  int64_t a, b;
  double lam;  // weight of a; b gets 1 - lam
  bool ignored;
};

inline RowTargets row_targets(const CrossEntropyParams& p, int64_t r) {
  RowTargets t;
  t.a = p.target[r];
  t.b = p.target_b ? p.target_b[r] : t.a;
  if (p.lam == nullptr) {
    t.lam = p.lam_scalar;
  } else if (p.dtype == c10::ScalarType::Double) {
    t.lam = static_cast<const double*>(p.lam)[r];
  } else {
    t.lam = static_cast<const float*>(p.lam)[r];
  }
  t.ignored = t.a == p.ignore_index || t.b == p.ignore_index;
  return t;
}

// ---- float32 accumulation, vectorised (float, Half, BFloat16 logits) ----

// The unshifted form below is used when the row max lies in [kUnshiftedMinMax, hi(C)]: then no
// exp(z) overflows, even summed over C terms, and every term that underflows is below 2^-24 of
// the largest one (exp(-70 - 17) is still a normal float).
constexpr float kUnshiftedMinMax = -70.f;

inline float unshifted_max_limit(int64_t C) {
  return 87.f - std::log(static_cast<float>(std::max<int64_t>(C, 1)));
}

// Returns lse of the row and sets *zsum_out to sum_j z_j: the shifted online form, exact for
// any values (chunks of the row are read twice, the second time from L1).
template <typename T>
float row_lse_shifted(const T* x, int64_t C, float* zsum_out) {
  float m = kNegInf, s = 0.f, zsum = 0.f;
  alignas(64) float buf[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const int64_t nv = n - n % kStep;
    // Pass A (from memory): convert to float into buf, chunk max and sum.
    Vec vmax0(kNegInf), vmax1(kNegInf), vsum0(0.f), vsum1(0.f);
    for (int64_t j = 0; j < nv; j += kStep) {
      Vec a, b;
      load2(x + c0 + j, a, b);
      vmax0 = at::vec::maximum(vmax0, a);
      vmax1 = at::vec::maximum(vmax1, b);
      vsum0 = vsum0 + a;
      vsum1 = vsum1 + b;
      if constexpr (!std::is_same_v<T, float>) {
        a.store(buf + j);
        b.store(buf + j + kV);
      }
    }
    float cmax = at::vec::vec_reduce_all<float>(
        [](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, at::vec::maximum(vmax0, vmax1));
    float csum = at::vec::vec_reduce_all<float>(
        [](Vec& u, Vec& v) { return u + v; }, vsum0 + vsum1);
    for (int64_t j = nv; j < n; ++j) {
      const float v = static_cast<float>(x[c0 + j]);
      cmax = nan_max(cmax, v);
      csum += v;
      buf[j] = v;
    }
    zsum += csum;
    const float new_m = nan_max(m, cmax);
    if (new_m == kNegInf) continue;  // everything so far is -inf: s stays 0
    s *= std::exp(m - new_m);
    m = new_m;
    // Pass B (from L1): sum of exp(z - m).
    const float* src = std::is_same_v<T, float> ? reinterpret_cast<const float*>(x + c0) : buf;
    const Vec vm(m);
    Vec e0(0.f), e1(0.f);
    for (int64_t j = 0; j < nv; j += kStep) {
      e0 = e0 + (Vec::loadu(src + j) - vm).exp_u20();
      e1 = e1 + (Vec::loadu(src + j + kV) - vm).exp_u20();
    }
    float es = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, e0 + e1);
    for (int64_t j = nv; j < n; ++j) es += std::exp(src[j] - m);
    s += es;
  }
  *zsum_out = zsum;
  return m + std::log(s);
}

// Returns lse of the row and sets *zsum_out to sum_j z_j. One pass: sum_j exp(z_j) with no
// shift by the max, the max and the sum of z alongside -- a third less work than the shifted
// form, which redoes the row when the max is outside the range where that is exact (huge or
// tiny logits, +-inf, NaN).
template <typename T>
float row_lse(const T* x, int64_t C, float max_limit, float* zsum_out) {
  const int64_t nv = C - C % kStep;
  Vec vmax0(kNegInf), vmax1(kNegInf), vz0(0.f), vz1(0.f), e0(0.f), e1(0.f);
  for (int64_t j = 0; j < nv; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    vmax0 = at::vec::maximum(vmax0, a);
    vmax1 = at::vec::maximum(vmax1, b);
    vz0 = vz0 + a;
    vz1 = vz1 + b;
    e0 = e0 + a.exp_u20();
    e1 = e1 + b.exp_u20();
  }
  float m = at::vec::vec_reduce_all<float>(
      [](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, at::vec::maximum(vmax0, vmax1));
  float zsum = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, vz0 + vz1);
  float es = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, e0 + e1);
  for (int64_t j = nv; j < C; ++j) {
    const float v = static_cast<float>(x[j]);
    m = nan_max(m, v);
    zsum += v;
    es += std::exp(v);
  }
  if (m >= kUnshiftedMinMax && m <= max_limit) {  // false for NaN
    *zsum_out = zsum;
    return std::log(es);
  }
  return row_lse_shifted(x, C, zsum_out);
}

template <typename T>
void forward_vec(const CrossEntropyParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  float* loss = static_cast<float*>(p.loss);
  float* lse = static_cast<float*>(p.lse);
  const int64_t C = p.classes;
  const float eps = static_cast<float>(p.smoothing);
  const float max_limit = unshifted_max_limit(C);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, r);
      if (t.ignored) {
        loss[r] = 0.f;
        lse[r] = 0.f;
        continue;
      }
      const T* x = logits + r * p.row_stride;
      float zsum;
      const float l = row_lse(x, C, max_limit, &zsum);
      const float lam = static_cast<float>(t.lam);
      const float za = static_cast<float>(x[t.a]);
      const float zb = static_cast<float>(x[t.b]);
      const float zt = t.a == t.b ? za : lam * za + (1.f - lam) * zb;
      lse[r] = l;
      // Without smoothing the sum of the logits is not part of the loss: a -inf (masked)
      // logit must not turn it into 0 * -inf = NaN (torch gives the finite loss). A +inf
      // logit makes torch's log_softmax, and so the loss, NaN.
      loss[r] = l == std::numeric_limits<float>::infinity()
                    ? std::numeric_limits<float>::quiet_NaN()
                    : l - (1.f - eps) * zt - (eps != 0.f ? eps / static_cast<float>(C) * zsum : 0.f);
    }
  });
}

template <typename T>
void backward_vec(const CrossEntropyParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad_logits);
  const float* lse = static_cast<const float*>(p.lse_in);
  const float* gl = static_cast<const float*>(p.grad_loss);
  const int64_t C = p.classes;
  const float eps = static_cast<float>(p.smoothing);
  const int64_t nv = C - C % kStep;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, r);
      T* out = grad + r * C;
      if (t.ignored) {
        std::fill(out, out + C, T(0.f));
        continue;
      }
      const T* x = logits + r * p.row_stride;
      const float g = gl[r * p.grad_loss_stride];
      const float l = lse[r];
      const float off = g * eps / static_cast<float>(C);
      // grad = g*softmax - g*eps/C everywhere; the target columns are fixed up below.
      const Vec vl(l), vg(g), voff(off);
      auto scalar = [&](int64_t j) {
        out[j] = static_cast<T>(g * std::exp(static_cast<float>(x[j]) - l) - off);
      };
      if (p.stream_stores) {
        const int64_t mis = reinterpret_cast<uintptr_t>(out) % kStreamAlign;
        const int64_t head = std::min<int64_t>(C, mis ? (kStreamAlign - mis) / sizeof(T) : 0);
        int64_t j = 0;
        for (; j < head; ++j) scalar(j);
        for (; j + kStep <= C; j += kStep) {
          Vec a, b;
          load2(x + j, a, b);
          stream2(out + j, (a - vl).exp_u20() * vg - voff, (b - vl).exp_u20() * vg - voff);
        }
        for (; j < C; ++j) scalar(j);
      } else {
        for (int64_t j = 0; j < nv; j += kStep) {
          Vec a, b;
          load2(x + j, a, b);
          store2(out + j, (a - vl).exp_u20() * vg - voff, (b - vl).exp_u20() * vg - voff);
        }
        for (int64_t j = nv; j < C; ++j) scalar(j);
      }
      // Target columns, recomputed in float so each is rounded once.
      const float lam = static_cast<float>(t.lam);
      const float wa = t.a == t.b ? 1.f : lam;
      out[t.a] = static_cast<T>(g * std::exp(static_cast<float>(x[t.a]) - l) - off -
                                g * (1.f - eps) * wa);
      if (t.b != t.a) {
        out[t.b] = static_cast<T>(g * std::exp(static_cast<float>(x[t.b]) - l) - off -
                                  g * (1.f - eps) * (1.f - lam));
      }
    }
    if (p.stream_stores) stream_fence();  // publish before another thread reads
  });
}

// ---- float64, scalar (gradcheck) ----

void forward_f64(const CrossEntropyParams& p) {
  const double* logits = static_cast<const double*>(p.logits);
  double* loss = static_cast<double*>(p.loss);
  double* lse = static_cast<double*>(p.lse);
  const int64_t C = p.classes;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, r);
      if (t.ignored) {
        loss[r] = 0.0;
        lse[r] = 0.0;
        continue;
      }
      const double* x = logits + r * p.row_stride;
      double m = -std::numeric_limits<double>::infinity(), zsum = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        m = nan_max(m, x[j]);
        zsum += x[j];
      }
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) s += std::exp(x[j] - m);
      const double l = m + std::log(s);
      const double zt = t.a == t.b ? x[t.a] : t.lam * x[t.a] + (1.0 - t.lam) * x[t.b];
      const double eps = p.smoothing;
      lse[r] = l;
      loss[r] = l == std::numeric_limits<double>::infinity()
                    ? std::numeric_limits<double>::quiet_NaN()
                    : l - (1.0 - eps) * zt - (eps != 0.0 ? eps / static_cast<double>(C) * zsum : 0.0);
    }
  });
}

void backward_f64(const CrossEntropyParams& p) {
  const double* logits = static_cast<const double*>(p.logits);
  double* grad = static_cast<double*>(p.grad_logits);
  const double* lse = static_cast<const double*>(p.lse_in);
  const double* gl = static_cast<const double*>(p.grad_loss);
  const int64_t C = p.classes;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, r);
      double* out = grad + r * C;
      if (t.ignored) {
        std::fill(out, out + C, 0.0);
        continue;
      }
      const double* x = logits + r * p.row_stride;
      const double g = gl[r * p.grad_loss_stride];
      const double off = g * p.smoothing / static_cast<double>(C);
      for (int64_t j = 0; j < C; ++j) out[j] = g * std::exp(x[j] - lse[r]) - off;
      out[t.a] -= g * (1.0 - p.smoothing) * t.lam;
      out[t.b] -= g * (1.0 - p.smoothing) * (1.0 - t.lam);
    }
  });
}

}  // namespace

void cross_entropy_forward_kernel(const CrossEntropyParams& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return forward_vec<float>(p);
    case c10::ScalarType::Half: return forward_vec<c10::Half>(p);
    case c10::ScalarType::BFloat16: return forward_vec<c10::BFloat16>(p);
    case c10::ScalarType::Double: return forward_f64(p);
    default: TORCH_INTERNAL_ASSERT(false, "cross_entropy: unexpected dtype ", p.dtype);
  }
}

void cross_entropy_backward_kernel(const CrossEntropyParams& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return backward_vec<float>(p);
    case c10::ScalarType::Half: return backward_vec<c10::Half>(p);
    case c10::ScalarType::BFloat16: return backward_vec<c10::BFloat16>(p);
    case c10::ScalarType::Double: return backward_f64(p);
    default: TORCH_INTERNAL_ASSERT(false, "cross_entropy: unexpected dtype ", p.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastcore_train::cpu
