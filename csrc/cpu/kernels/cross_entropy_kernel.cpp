// Label-smoothed cross-entropy on the CPU, one or two targets (mixup).
//
// With q = (1-eps)*(lam*onehot(a) + (1-lam)*onehot(b)) + eps/C  (b = a, lam = 1 for one target):
//   loss_i = lse_i - (1-eps)*(lam*z_ia + (1-lam)*z_ib) - (eps/C) * sum_j z_ij
//   dloss_i/dz_ij = softmax_ij - q_ij
// computed from differences with the row max m (see RowStats). Forward reads each row once
// (one pass against a pivot when the logits allow it, else an online log-sum-exp over L1-sized
// chunks) and saves only m and log(sum_j exp(z_j - m)) per row; backward reads the row once
// more and writes the gradient once. Accumulation is float32 (float64 for float64 logits,
// used by gradcheck).
//
// This file is compiled once per ISA (see setup.py); CPU_CAPABILITY names the namespace.
#include "cpu/kernels/cross_entropy_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

inline RowTargets row_targets(const CrossEntropyArgs& p, int64_t r) {
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

// What a row's forward computes: m = max_j z_j, L = log(sum_j exp(z_j - m)) and
// zm = sum_j (z_j - m). The loss is assembled from differences with m,
//   loss = L + (1-eps)*(m - z_t) - (eps/C)*zm,
// which equals torch's lse - (1-eps)*z_t - (eps/C)*sum_j z_j but keeps float32's relative
// precision at any offset of the logits (lse = m + L in float32 loses L once |m| >> 1, and
// sum_j z_j overflows for logits near 1e38).
template <typename acc_t>
struct RowStats {
  acc_t m, L, zm;
};

// A row with a NaN or +inf logit, or only -inf ones, has a NaN log_softmax in torch, so a NaN
// loss and gradient across the row: L = NaN carries that through forward and backward.
template <typename acc_t>
inline acc_t log_sum(acc_t m, acc_t s) {
  return std::isfinite(m) ? std::log(s) : std::numeric_limits<acc_t>::quiet_NaN();
}

// The one-pass form below sums exp(z - p) for a pivot p known before the pass (0, or a logit
// from the start of the row) and keeps the result when |m - p| <= kOnePassMaxShift for the row
// max m: then no term overflows, even summed over C classes, every term that underflows is
// below 2^-24 of the largest one, and the vector exp's range reduction (one float32 ln 2,
// ~2e-9 relative per unit of argument) costs L at most ~1e-7, where torch's own float32 loss
// is off by ~1e-6.
constexpr float kOnePassMaxShift = 40.f;
static_assert(kOnePassMaxShift <= 70.f, "exp(-87) / exp(-shift) must stay below 2^-24");

// The shifted online form, exact for any values: per L1-sized chunk, the max, then
// exp(z - m) and z - m against the running max (the chunk is read twice, the second time
// from L1). Sums kept so far are rescaled when the max grows.
template <typename T>
RowStats<float> row_stats_shifted(const T* x, int64_t C) {
  float m = kNegInf, s = 0.f, zm = 0.f;
  int64_t n = 0;  // elements summed into zm
  alignas(64) float buf[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t nc = std::min(kChunk, C - c0);
    const int64_t nv = nc - nc % kStep;
    // Pass A (from memory): convert to float into buf, chunk max.
    Vec vmax0(kNegInf), vmax1(kNegInf);
    for (int64_t j = 0; j < nv; j += kStep) {
      Vec a, b;
      load2(x + c0 + j, a, b);
      vmax0 = at::vec::maximum(vmax0, a);
      vmax1 = at::vec::maximum(vmax1, b);
      if constexpr (!std::is_same_v<T, float>) {
        a.store(buf + j);
        b.store(buf + j + kV);
      }
    }
    float cmax = at::vec::vec_reduce_all<float>(
        [](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, at::vec::maximum(vmax0, vmax1));
    for (int64_t j = nv; j < nc; ++j) {
      const float v = static_cast<float>(x[c0 + j]);
      cmax = nan_max(cmax, v);
      buf[j] = v;
    }
    const float new_m = nan_max(m, cmax);
    if (new_m == kNegInf) {  // everything so far is -inf: s stays 0, zm becomes -inf below
      n += nc;
      continue;
    }
    if (new_m != m) {  // rescale to the new max (-inf for -inf elements seen before it)
      s *= std::exp(m - new_m);
      if (n > 0) zm += static_cast<float>(n) * (m - new_m);
      m = new_m;
    }
    // Pass B (from L1): sum of exp(z - m) and of z - m.
    const float* src = std::is_same_v<T, float> ? reinterpret_cast<const float*>(x + c0) : buf;
    const Vec vm(m);
    Vec e0(0.f), e1(0.f), d0(0.f), d1(0.f);
    for (int64_t j = 0; j < nv; j += kStep) {
      const Vec a = Vec::loadu(src + j) - vm, b = Vec::loadu(src + j + kV) - vm;
      e0 = e0 + a.exp_u20();
      e1 = e1 + b.exp_u20();
      d0 = d0 + a;
      d1 = d1 + b;
    }
    float es = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, e0 + e1);
    float ds = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, d0 + d1);
    for (int64_t j = nv; j < nc; ++j) {
      es += std::exp(src[j] - m);
      ds += src[j] - m;
    }
    s += es;
    zm += ds;
    n += nc;
  }
  return {m, log_sum(m, s), zm};
}

// log(es) - d for es = sum_j exp(z_j - p) and d = m - p, i.e. L = log(sum_j exp(z_j - m)),
// without rounding L away against d (|d| <= kOnePassMaxShift): es is scaled by 2^-k,
// k = round(d / ln 2), which is exact, so that logf sees a number near s = exp(L), and the small
// remainder k*ln 2 - d is formed in double. One libm call per row, as before the fix:
// log(es * exp(-d)) costs a second one, which stalls the stream of rows from memory at each
// row boundary (-6% on 32 KB rows).
inline float log_minus(float es, float d) {
  const float t = d * 1.44269504f;  // d / ln 2
  const int k = static_cast<int>(t + (t >= 0.f ? 0.5f : -0.5f));
  const uint32_t bits = static_cast<uint32_t>(127 - k) << 23;  // 2^-k, a normal float
  float two_to_minus_k;
  std::memcpy(&two_to_minus_k, &bits, sizeof bits);  // std::bit_cast, in C++17
  return std::log(es * two_to_minus_k) +
         static_cast<float>(k * 0.69314718055994531 - static_cast<double>(d));
}

// One pass over the row: its max, sum_j exp(z_j - p) and sum_j (z_j - p); kShift false means
// p = 0 and no subtraction (one vector operation less per element: ~7% of the forward).
template <bool kShift, typename T>
inline void one_pass_sums(const T* x, int64_t C, float p, float* m_out, float* es_out,
                          float* ds_out) {
  const Vec vp(p);
  const int64_t nv = C - C % kStep;
  Vec vmax0(kNegInf), vmax1(kNegInf), vd0(0.f), vd1(0.f), e0(0.f), e1(0.f);
  for (int64_t j = 0; j < nv; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    vmax0 = at::vec::maximum(vmax0, a);
    vmax1 = at::vec::maximum(vmax1, b);
    if constexpr (kShift) {
      a = a - vp;
      b = b - vp;
    }
    vd0 = vd0 + a;
    vd1 = vd1 + b;
    e0 = e0 + a.exp_u20();
    e1 = e1 + b.exp_u20();
  }
  float m = at::vec::vec_reduce_all<float>(
      [](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, at::vec::maximum(vmax0, vmax1));
  float ds = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, vd0 + vd1);
  float es = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, e0 + e1);
  for (int64_t j = nv; j < C; ++j) {
    const float v = static_cast<float>(x[j]);
    m = nan_max(m, v);
    const float d = kShift ? v - p : v;
    ds += d;
    es += std::exp(d);
  }
  *m_out = m;
  *es_out = es;
  *ds_out = ds;
}

// GCC 12 takes the _mm512_undefined_ps() inside at::vec's reductions for uninitialized reads
// once they are inlined into a function of their own: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
// One pass against the pivot p (an element of the row, or 0), kept when the max is close
// enough to it (see kOnePassMaxShift), else the shifted form. Out of line: the common case
// below stays compact.
template <typename T>
[[gnu::noinline]] RowStats<float> row_stats_pivoted(const T* x, int64_t C, float p) {
  float m, es, ds;
  one_pass_sums<true>(x, C, p, &m, &es, &ds);
  const float d = m - p;
  if (std::abs(d) <= kOnePassMaxShift) {  // false for NaN
    return {m, log_minus(es, d), ds - static_cast<float>(C) * d};
  }
  return row_stats_shifted(x, C);
}
#pragma GCC diagnostic pop

// The row's stats, in one pass for almost any row. Logits of everyday size, judged by the
// row's first one, take exp(z) unshifted (no subtraction per element); when the max turns out
// to be beyond kOnePassMaxShift the row is read once more against that max. Other rows take
// as pivot the max of their first vector step: an element, so m >= p, usually close to m.
// Only the start of the row is read ahead of the pass: with a read further in (the target's
// logit as pivot) the pass measured ~6% slower on rows streamed from memory.
template <typename T>
RowStats<float> row_stats(const T* x, int64_t C) {
  if (std::abs(static_cast<float>(x[0])) <= kOnePassMaxShift) {
    float m, es, ds;
    one_pass_sums<false>(x, C, 0.f, &m, &es, &ds);
    if (std::abs(m) <= kOnePassMaxShift) {  // false for NaN
      return {m, log_minus(es, m), ds - static_cast<float>(C) * m};
    }
    return std::isfinite(m) ? row_stats_pivoted(x, C, m) : row_stats_shifted(x, C);
  }
  float p = kNegInf;
  if (C >= kStep) {
    Vec a, b;
    load2(x, a, b);
    p = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return at::vec::maximum(u, v); },
                                       at::vec::maximum(a, b));
  } else {
    for (int64_t j = 0; j < C; ++j) p = nan_max(p, static_cast<float>(x[j]));
  }
  if (p == kNegInf) p = 0.f;  // masked throughout the first step: hope for the rest
  return std::isfinite(p) ? row_stats_pivoted(x, C, p) : row_stats_shifted(x, C);  // NaN, +inf
}

// loss = L + (1-eps)*(m - z_t) - (eps/C)*zm with m - z_t = lam*(m - z_a) + (1-lam)*(m - z_b).
// Without smoothing zm is not part of the loss: a -inf (masked) logit must not turn it into
// 0 * -inf = NaN (torch gives the finite loss).
template <typename acc_t>
inline acc_t row_loss(const RowStats<acc_t>& st, acc_t za, acc_t zb, const RowTargets& t,
                      acc_t eps, int64_t C) {
  const acc_t lam = static_cast<acc_t>(t.lam);
  const acc_t da = st.m - za;
  const acc_t dt = t.a == t.b ? da : lam * da + (acc_t(1) - lam) * (st.m - zb);
  return st.L + (acc_t(1) - eps) * dt - (eps != acc_t(0) ? eps / static_cast<acc_t>(C) * st.zm
                                                         : acc_t(0));
}

template <typename T>
void forward_vec(const CrossEntropyArgs& p) {
  const T* logits = static_cast<const T*>(p.logits);
  float* loss = static_cast<float*>(p.loss);
  float* stats = static_cast<float*>(p.stats);
  const int64_t C = p.classes;
  const float eps = static_cast<float>(p.smoothing);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, r);
      if (t.ignored) {
        loss[r] = 0.f;
        stats[2 * r] = 0.f;
        stats[2 * r + 1] = 0.f;
        continue;
      }
      const T* x = logits + r * p.row_stride;
      const RowStats<float> st = row_stats(x, C);
      stats[2 * r] = st.m;
      stats[2 * r + 1] = st.L;
      loss[r] = row_loss(st, static_cast<float>(x[t.a]), static_cast<float>(x[t.b]), t, eps, C);
    }
  });
}

template <typename T>
void backward_vec(const CrossEntropyArgs& p) {
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad_logits);
  const float* stats = static_cast<const float*>(p.stats_in);
  const float* gl = static_cast<const float*>(p.grad_loss);
  const int64_t C = p.classes;
  const float eps = static_cast<float>(p.smoothing);
  const int64_t nv = C - C % kStep;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    // 1/s = exp(-L) of the next row is computed during this row's pass: at the start of its
    // own row it would hold up that row's stores (-5% on 32 KB rows streamed from memory).
    float next_inv_s = std::exp(-stats[2 * begin + 1]);
    for (int64_t r = begin; r < end; ++r) {
      const float inv_s = next_inv_s;
      if (r + 1 < end) next_inv_s = std::exp(-stats[2 * (r + 1) + 1]);
      const RowTargets t = row_targets(p, r);
      T* out = grad + r * C;
      if (t.ignored) {
        std::fill(out, out + C, T(0.f));
        continue;
      }
      const T* x = logits + r * p.row_stride;
      const float g = gl[r * p.grad_loss_stride];
      const float m = stats[2 * r];
      if (std::isnan(stats[2 * r + 1])) {
        // a NaN row (see log_sum), written directly: the vector exp does not propagate NaN
        std::fill(out, out + C, T(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      const float off = g * eps / static_cast<float>(C);
      // grad = g*softmax - g*eps/C everywhere, softmax = exp(z - m) / s with 1/s folded into
      // g (no more work per element than exp(z - lse)); the target columns are fixed up below.
      const float gs = g * inv_s;
      const Vec vm(m), vgs(gs), voff(off);
      auto prob = [&](const T& z) { return std::exp(static_cast<float>(z) - m) * inv_s; };
      auto scalar = [&](int64_t j) {
        out[j] = static_cast<T>(std::exp(static_cast<float>(x[j]) - m) * gs - off);
      };
      if (p.stream_stores) {
        const int64_t mis = reinterpret_cast<uintptr_t>(out) % kStreamAlign;
        const int64_t head = std::min<int64_t>(C, mis ? (kStreamAlign - mis) / sizeof(T) : 0);
        int64_t j = 0;
        for (; j < head; ++j) scalar(j);
        for (; j + kStep <= C; j += kStep) {
          Vec a, b;
          load2(x + j, a, b);
          stream2(out + j, (a - vm).exp_u20() * vgs - voff, (b - vm).exp_u20() * vgs - voff);
        }
        for (; j < C; ++j) scalar(j);
      } else {
        for (int64_t j = 0; j < nv; j += kStep) {
          Vec a, b;
          load2(x + j, a, b);
          store2(out + j, (a - vm).exp_u20() * vgs - voff, (b - vm).exp_u20() * vgs - voff);
        }
        for (int64_t j = nv; j < C; ++j) scalar(j);
      }
      // Target columns, the largest entries (near -(1-eps)): recomputed in double from the
      // float softmax so that each is rounded once, not three times.
      const double gd = g, offd = gd * p.smoothing / static_cast<double>(C);
      const double wa = t.a == t.b ? 1.0 : t.lam;
      out[t.a] = static_cast<T>(gd * prob(x[t.a]) - offd - gd * (1.0 - p.smoothing) * wa);
      if (t.b != t.a) {
        out[t.b] = static_cast<T>(gd * prob(x[t.b]) - offd - gd * (1.0 - p.smoothing) *
                                                                  (1.0 - t.lam));
      }
    }
    if (p.stream_stores) stream_fence();  // publish before another thread reads
  });
}

// ---- float64, scalar (gradcheck) ----

void forward_f64(const CrossEntropyArgs& p) {
  const double* logits = static_cast<const double*>(p.logits);
  double* loss = static_cast<double*>(p.loss);
  double* stats = static_cast<double*>(p.stats);
  const int64_t C = p.classes;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, r);
      if (t.ignored) {
        loss[r] = 0.0;
        stats[2 * r] = 0.0;
        stats[2 * r + 1] = 0.0;
        continue;
      }
      const double* x = logits + r * p.row_stride;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < C; ++j) m = nan_max(m, x[j]);
      RowStats<double> st{m, 0.0, 0.0};
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double d = x[j] - m;  // NaN everywhere for a non-finite m: L is NaN then
        s += std::exp(d);
        st.zm += d;
      }
      st.L = log_sum(m, s);
      stats[2 * r] = st.m;
      stats[2 * r + 1] = st.L;
      loss[r] = row_loss(st, x[t.a], x[t.b], t, p.smoothing, C);
    }
  });
}

void backward_f64(const CrossEntropyArgs& p) {
  const double* logits = static_cast<const double*>(p.logits);
  double* grad = static_cast<double*>(p.grad_logits);
  const double* stats = static_cast<const double*>(p.stats_in);
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
      const double m = stats[2 * r], L = stats[2 * r + 1];
      const double off = g * p.smoothing / static_cast<double>(C);
      for (int64_t j = 0; j < C; ++j) out[j] = g * std::exp((x[j] - m) - L) - off;
      out[t.a] -= g * (1.0 - p.smoothing) * t.lam;
      out[t.b] -= g * (1.0 - p.smoothing) * (1.0 - t.lam);
    }
  });
}

}  // namespace

void cross_entropy_forward_kernel(const CrossEntropyArgs& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return forward_vec<float>(p);
    case c10::ScalarType::Half: return forward_vec<c10::Half>(p);
    case c10::ScalarType::BFloat16: return forward_vec<c10::BFloat16>(p);
    case c10::ScalarType::Double: return forward_f64(p);
    default: TORCH_INTERNAL_ASSERT(false, "cross_entropy: unexpected dtype ", p.dtype);
  }
}

void cross_entropy_backward_kernel(const CrossEntropyArgs& p) {
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
