// Binary cross-entropy with logits on the CPU, against label-smoothed one-hot targets, one or
// two targets (mixup). Maths and names as in fastcore_train/ops/binary_cross_entropy.py:
//
//   q = off everywhere but the target columns (q_a, q_b there), w = 1 + (pw - 1) q
//   loss = c |z| + w log1p(exp(-|z|)),      c = 1 - q (z >= 0),  pw q (z < 0)
//   dloss/dz = (1 - q) - w sigmoid(-z) (z >= 0),   w sigmoid(z) - pw q (z < 0)
//
// Both loss terms are >= 0, so the float32 result keeps its relative precision at any |z|. The
// vector loops evaluate q = off only; the one or two target columns of a row are left out of the
// forward's sums (their lanes masked) and computed apart in double, and the backward writes them
// over what the vector loop wrote. Forward reads each logit once and writes one value per row
// (or the (B, C) loss for reduction none); backward reads each logit once and writes its
// gradient once. Accumulation is float32 within blocks of kBlock columns, double across them
// (float64 throughout for float64 logits, used by gradcheck).
//
// This file is compiled once per ISA (see setup.py); CPU_CAPABILITY names the namespace.
#include "cpu/kernels/bce_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/kernels/vec_io.h"

namespace fastcore_train::cpu {
namespace CPU_CAPABILITY {
namespace {

using IVec = at::vec::Vectorized<int32_t>;
static_assert(IVec::size() == kV);

// Columns summed in float32 vector registers before the partial sums go to double: each lane
// adds kBlock / kStep terms, all of one sign, so its rounding error stays below ~2^-19.
constexpr int64_t kBlock = 1024;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- vector maths ---------------------------------------------------------------------------

// 2^n from t = n + 1.5 * 2^23 + 127 with n an integer in [-126, 0]: the low mantissa bits of t
// hold n + 127, moved into the exponent field.
inline Vec pow2_from_shifted(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i biased = _mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(0xff));
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(biased, 23)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i biased = _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0xff));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
#else
  const IVec biased = at::vec::cast<int32_t>(t) & IVec(0xff);
  return at::vec::cast<float>(biased << IVec(23));
#endif
}

// exp(x) for x <= 0 to about one ulp, NaN propagated, 0 below ln(FLT_MIN) (no denormals).
// x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2; ln2 is split in two (ln2_hi has 16
// significant bits, so n * ln2_hi is exact) to form r without rounding; exp(r) is its Taylor
// polynomial of degree 7 (remainder < (ln2/2)^8 / 8! = 5e-9 relative); 2^n goes into the exponent
// bits: adding 1.5 * 2^23 + 127 to x / ln2 leaves round(x / ln2) + 127 (in [1, 127] here) in the
// low mantissa bits, so no float-to-int conversion is needed. at::vec's exp_u20 is as fast but
// ~5 ulp off and turns NaN into a number; Sleef's exp costs ~40% more here.
inline Vec exp_nonpos(const Vec& x) {
  const Vec shift(12582912.f + 127.f);
  const Vec t = at::vec::fmadd(x, Vec(1.44269504088896341f), shift);
  const Vec n = t - shift;
  Vec r = at::vec::fmadd(n, Vec(-0.693145751953125f), x);
  r = at::vec::fmadd(n, Vec(-1.428606765330187045e-06f), r);
  Vec e = Vec(1.f / 5040.f);
  e = at::vec::fmadd(e, r, Vec(1.f / 720.f));
  e = at::vec::fmadd(e, r, Vec(1.f / 120.f));
  e = at::vec::fmadd(e, r, Vec(1.f / 24.f));
  e = at::vec::fmadd(e, r, Vec(1.f / 6.f));
  e = at::vec::fmadd(e, r, Vec(0.5f));
  e = at::vec::fmadd(e, r, Vec(1.f));
  e = at::vec::fmadd(e, r, Vec(1.f));
  return Vec::blendv(e * pow2_from_shifted(t), Vec(0.f), x < Vec(-87.3f));
}

// 1 / d for d in [1, 3], to about one ulp: the hardware's reciprocal estimate (14 bits with
// AVX-512, 12 with AVX2) and one Newton step r (2 - d r), which squares its relative error. A
// division costs several times more (its throughput, not its latency, bounds these loops).
inline Vec recip_1_3(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const Vec r(_mm512_rcp14_ps(d));
#else
  const Vec r(_mm256_rcp_ps(d));
#endif
  return r * at::vec::fnmadd(d, r, Vec(2.f));
#else
  return Vec(1.f) / d;
#endif
}

// log1p(e) for e in [0, 1] to about two ulp: log1p(e) = 2 atanh(s) with s = e / (2 + e) in
// [0, 1/3] ((1 + s) / (1 - s) = 1 + e), by the series 2 (s + s^3/3 + ... + s^13/13) (remainder
// < (1/9)^7 / 15 relative). About half the cost of Sleef's log1p, and exact for tiny e, where
// log(1 + e) would round 1 + e to 1.
inline Vec log1p_unit(const Vec& e) {
  const Vec s = e * recip_1_3(Vec(2.f) + e);
  const Vec s2 = s * s;
  Vec p = Vec(1.f / 13.f);
  p = at::vec::fmadd(p, s2, Vec(1.f / 11.f));
  p = at::vec::fmadd(p, s2, Vec(1.f / 9.f));
  p = at::vec::fmadd(p, s2, Vec(1.f / 7.f));
  p = at::vec::fmadd(p, s2, Vec(1.f / 5.f));
  p = at::vec::fmadd(p, s2, Vec(1.f / 3.f));
  p = at::vec::fmadd(p, s2, Vec(1.f));
  return (s + s) * p;
}

// log1p(exp(-|z|)) = softplus(-|z|), the second loss term.
inline Vec softplus_neg_abs(const Vec& z) {
  return log1p_unit(exp_nonpos(Vec(0.f) - z.abs()));
}

// sigmoid(z) from e = exp(-|z|): 1 / (1 + e) for z >= 0, e / (1 + e) below (never exp of a
// positive number, so nothing overflows). NaN stays NaN (through e).
inline Vec sigmoid(const Vec& z) {
  const Vec e = exp_nonpos(Vec(0.f) - z.abs());
  const Vec r = recip_1_3(Vec(1.f) + e);
  return Vec::blendv(e * r, r, z >= Vec(0.f));
}

// ---- one element, in acc_t (the target columns, the scalar tails, float64 logits) ------------

template <typename acc_t>
inline acc_t elem_loss(acc_t z, acc_t q, acc_t pw) {
  if (z == -std::numeric_limits<acc_t>::infinity()) {
    return std::numeric_limits<acc_t>::quiet_NaN();  // torch's value: its form adds -inf + inf
  }
  const acc_t w = 1 + (pw - 1) * q;
  const acc_t a = std::abs(z);
  const acc_t c = z >= 0 ? 1 - q : pw * q;  // NaN z: c * NaN
  return c * a + w * std::log1p(std::exp(-a));
}

template <typename acc_t>
inline acc_t elem_grad(acc_t z, acc_t q, acc_t pw) {
  const acc_t w = 1 + (pw - 1) * q;
  const acc_t e = std::exp(-std::abs(z));
  const acc_t s = e / (1 + e);  // sigmoid(-|z|)
  return z >= 0 ? (1 - q) - w * s : w * s - pw * q;
}

// ---- the targets of a row ----------------------------------------------------------------------

struct RowTargets {
  int64_t a, b;   // b == a for one target (or two equal ones)
  double qa, qb;  // q at columns a and b
};

struct Smoothing {
  double off, on;
  explicit Smoothing(const BceArgs& p)
      : off(p.classes > 0 ? p.smoothing / static_cast<double>(p.classes) : 0.0),
        on(1.0 - p.smoothing + off) {}
};

inline RowTargets row_targets(const BceArgs& p, const Smoothing& sm, int64_t r) {
  RowTargets t;
  t.a = p.target[r];
  t.b = p.target_b ? p.target_b[r] : t.a;
  if (t.a == t.b) {  // lam * on + (1 - lam) * on is on; taken as such, not rounded
    t.qa = t.qb = sm.on;
    return t;
  }
  double lam = p.lam_scalar;
  if (p.lam != nullptr) {
    lam = p.dtype == c10::ScalarType::Double ? static_cast<const double*>(p.lam)[r]
                                             : static_cast<const float*>(p.lam)[r];
  }
  t.qa = lam * sm.on + (1.0 - lam) * sm.off;
  t.qb = (1.0 - lam) * sm.on + lam * sm.off;
  return t;
}

template <typename acc_t>
inline acc_t pw_at(const BceArgs& p, int64_t j) {
  return p.pos_weight ? static_cast<const acc_t*>(p.pos_weight)[j] : acc_t(1);
}

inline int64_t grain_for(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// GCC 12 takes the _mm512_undefined_ps() inside at::vec's reductions for uninitialized reads
// once they are inlined into a function of their own: a false positive (as in the CE kernel).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// ---- forward, reduced: the loss of each row ----------------------------------------------------
//
// Over the columns with q = off:
//   sum_j loss_j = (1 - off) (P + L) + offN + off PL
// with P = sum relu(z), offN = sum off pw relu(-z), L = sum log1p(exp(-|z|)), PL = sum pw log1p(..)
// (no pw in offN, and PL = L, without pos_weight): c |z| is (1 - off) relu(z) + off pw relu(-z)
// and w = (1 - off) + off pw. Sums of terms >= 0 (for pw >= 0), each rounded once. off is
// folded into offN as it is summed (an fma, no extra work): relu(-z) summed alone overflows for a
// few logits near -FLT_MAX, where off relu(-z) and torch's loss stay finite.

template <bool kPw>
struct VecSums {
  Vec P{0.f}, offN{0.f}, L{0.f}, PL{0.f};  // offN summed with its sign (min(z, 0) <= 0)
};

template <bool kPw, bool kDrop>
inline void add_terms(VecSums<kPw>& s, const Vec& z, const Vec& pw, const Vec& off,
                      const Vec& drop) {
  const Vec zero(0.f);
  Vec pos = at::vec::maximum(z, zero);  // propagates NaN: the row's loss becomes NaN
  // pw z only where z < 0 (blended, so that pw = inf at z > 0 does not give inf * 0)
  Vec neg = kPw ? Vec::blendv(pw * z, zero, z >= zero) : at::vec::minimum(z, zero);
  Vec l = softplus_neg_abs(z);
  Vec pl = kPw ? pw * l : l;
  if constexpr (kDrop) {  // a target column: summed apart, in double
    pos = Vec::blendv(pos, zero, drop);
    neg = Vec::blendv(neg, zero, drop);
    l = Vec::blendv(l, zero, drop);
    pl = Vec::blendv(pl, zero, drop);
  }
  s.P = s.P + pos;
  s.offN = at::vec::fmadd(neg, off, s.offN);
  s.L = s.L + l;
  if constexpr (kPw) s.PL = s.PL + pl;
}

// Lanes of the step starting at column j that hold column t (none when t is elsewhere).
inline void target_lanes(int64_t t, int64_t j, Vec& d0, Vec& d1) {
  const int64_t k = t - j;
  if (k < 0 || k >= kStep) return;
  const Vec iota = Vec::arange(0.f, 1.f);
  if (k < kV) {
    d0 = d0 | (iota == Vec(static_cast<float>(k)));
  } else {
    d1 = d1 | (iota == Vec(static_cast<float>(k - kV)));
  }
}

template <typename T, bool kPw>
double row_loss_vec(const BceArgs& p, const Smoothing& sm, const RowTargets& t, const T* x) {
  const int64_t C = p.classes;
  const float* pw = static_cast<const float*>(p.pos_weight);
  const int64_t nv = C - C % kStep;
  // the steps that hold a target column (at most two) take the masked path
  const int64_t sa = t.a < nv ? t.a - t.a % kStep : -1;
  const int64_t sb = t.b < nv ? t.b - t.b % kStep : -1;
  const Vec voff(static_cast<float>(sm.off));
  double P = 0, offN = 0, L = 0, PL = 0;
  for (int64_t j0 = 0; j0 < nv; j0 += kBlock) {
    const int64_t j1 = std::min(nv, j0 + kBlock);
    VecSums<kPw> s;
    for (int64_t j = j0; j < j1; j += kStep) {
      Vec z0, z1, w0(1.f), w1(1.f);
      load2(x + j, z0, z1);
      if constexpr (kPw) load2(pw + j, w0, w1);
      if (j == sa || j == sb) [[unlikely]] {
        Vec d0(0.f), d1(0.f);
        target_lanes(t.a, j, d0, d1);
        target_lanes(t.b, j, d0, d1);
        add_terms<kPw, true>(s, z0, w0, voff, d0);
        add_terms<kPw, true>(s, z1, w1, voff, d1);
      } else {
        add_terms<kPw, false>(s, z0, w0, voff, z0);  // (no lanes dropped)
        add_terms<kPw, false>(s, z1, w1, voff, z1);
      }
    }
    P += hsum(s.P);
    offN -= hsum(s.offN);
    L += hsum(s.L);
    PL += kPw ? hsum(s.PL) : 0.0;
  }
  if (!kPw) PL = L;
  // offN is +inf (NaN without smoothing) when a logit is -inf, where torch's loss is NaN; it
  // can also overflow from large finite logits (a huge pos_weight), so look before deciding.
  if (!std::isfinite(offN)) {
    for (int64_t j = 0; j < nv; ++j) {
      const bool target = j == t.a || j == t.b;
      if (!target && static_cast<float>(x[j]) == -std::numeric_limits<float>::infinity()) {
        return kNaN;
      }
    }
  }
  // without smoothing PL is not part of the loss (w = 1) and offN is 0 (or NaN from 0 * inf)
  double loss = (1.0 - sm.off) * (P + L) + (sm.off != 0.0 ? offN + sm.off * PL : 0.0);
  for (int64_t j = nv; j < C; ++j) {  // scalar tail
    if (j == t.a || j == t.b) continue;
    loss += elem_loss<double>(static_cast<float>(x[j]), sm.off, kPw ? pw[j] : 1.0);
  }
  loss += elem_loss<double>(static_cast<float>(x[t.a]), t.qa, kPw ? pw[t.a] : 1.0);
  if (t.b != t.a) {
    loss += elem_loss<double>(static_cast<float>(x[t.b]), t.qb, kPw ? pw[t.b] : 1.0);
  }
  return loss;
}

template <typename T, bool kPw>
void forward_rows_vec(const BceArgs& p) {
  const Smoothing sm(p);
  const T* logits = static_cast<const T*>(p.logits);
  float* loss = static_cast<float*>(p.loss);
  at::parallel_for(0, p.rows, grain_for(p.classes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, sm, r);
      loss[r] = static_cast<float>(row_loss_vec<T, kPw>(p, sm, t, logits + r * p.row_stride));
    }
  });
}

// ---- forward, reduction none: the (B, C) loss ---------------------------------------------------

template <typename T, bool kPw>
void forward_elementwise_vec(const BceArgs& p) {
  const Smoothing sm(p);
  const T* logits = static_cast<const T*>(p.logits);
  float* loss = static_cast<float*>(p.loss);
  const float* pw = static_cast<const float*>(p.pos_weight);
  const int64_t C = p.classes;
  const int64_t nv = C - C % kStep;
  const float off = static_cast<float>(sm.off);
  const Vec zero(0.f), voff(off), v1moff(static_cast<float>(1.0 - sm.off));
  const Vec nan(std::numeric_limits<float>::quiet_NaN());
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  // c |z| + w log1p(exp(-|z|)) with q = off; NaN at -inf, as torch gives
  auto term = [&](const Vec& z, const Vec& w_pos) {
    const Vec c = Vec::blendv(kPw ? w_pos * voff : voff, v1moff, z >= zero);
    const Vec w = kPw ? at::vec::fmadd(w_pos, voff, v1moff) : Vec(1.f);
    const Vec v = at::vec::fmadd(c, z.abs(), w * softplus_neg_abs(z));
    return Vec::blendv(v, nan, z == neg_inf);
  };
  at::parallel_for(0, p.rows, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, sm, r);
      const T* x = logits + r * p.row_stride;
      float* out = loss + r * C;
      for (int64_t j = 0; j < nv; j += kStep) {
        Vec z0, z1, w0(1.f), w1(1.f);
        load2(x + j, z0, z1);
        if constexpr (kPw) load2(pw + j, w0, w1);
        store2(out + j, term(z0, w0), term(z1, w1));
      }
      for (int64_t j = nv; j < C; ++j) {
        out[j] = static_cast<float>(
            elem_loss<double>(static_cast<float>(x[j]), sm.off, kPw ? pw[j] : 1.0));
      }
      // the target columns, over what the loop wrote
      out[t.a] = static_cast<float>(
          elem_loss<double>(static_cast<float>(x[t.a]), t.qa, kPw ? pw[t.a] : 1.0));
      if (t.b != t.a) {
        out[t.b] = static_cast<float>(
            elem_loss<double>(static_cast<float>(x[t.b]), t.qb, kPw ? pw[t.b] : 1.0));
      }
    }
  });
}

// ---- backward -------------------------------------------------------------------------------------
//
// grad = g * (w sigmoid(z) - pw off) with q = off in the vector loop (sigmoid(z) - off without
// pos_weight); the target columns are written afterwards, in double, from the exact form of the
// file's header (which keeps 1 - q where torch's sigmoid(z) - q rounds it away).

template <typename T, bool kPw, bool kPerElement>
void backward_vec(const BceArgs& p) {
  const Smoothing sm(p);
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad_logits);
  const float* gl = static_cast<const float*>(p.grad_loss);
  const float* pw = static_cast<const float*>(p.pos_weight);
  const int64_t C = p.classes;
  const float off = static_cast<float>(sm.off);
  const Vec voff(off), v1moff(static_cast<float>(1.0 - sm.off));
  const float g_all = static_cast<float>(p.grad_scalar);
  at::parallel_for(0, p.rows, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, sm, r);
      const T* x = logits + r * p.row_stride;
      T* out = grad + r * C;
      const float* g_row = kPerElement ? gl + r * C : nullptr;
      const Vec vg(g_all);
      auto value = [&](const Vec& z, const Vec& w_pos, const Vec& g) {
        const Vec s = sigmoid(z);
        Vec d;
        if constexpr (kPw) {
          // w = (1 - off) + off pw;  w s - pw off
          d = at::vec::fmadd(at::vec::fmadd(w_pos, voff, v1moff), s, Vec(0.f) - w_pos * voff);
        } else {
          d = s - voff;
        }
        return d * g;
      };
      auto vec_step = [&](int64_t j, auto&& store) {
        Vec z0, z1, w0(1.f), w1(1.f), g0 = vg, g1 = vg;
        load2(x + j, z0, z1);
        if constexpr (kPw) load2(pw + j, w0, w1);
        if constexpr (kPerElement) load2(g_row + j, g0, g1);
        store(out + j, value(z0, w0, g0), value(z1, w1, g1));
      };
      auto scalar = [&](int64_t j) {
        const double g = kPerElement ? g_row[j] : p.grad_scalar;
        out[j] = static_cast<T>(
            g * elem_grad<double>(static_cast<float>(x[j]), sm.off, kPw ? pw[j] : 1.0));
      };
      if (p.stream_stores) {
        const int64_t mis = reinterpret_cast<uintptr_t>(out) % kStreamAlign;
        const int64_t head = std::min<int64_t>(C, mis ? (kStreamAlign - mis) / sizeof(T) : 0);
        int64_t j = 0;
        for (; j < head; ++j) scalar(j);
        for (; j + kStep <= C; j += kStep) {
          vec_step(j, [](T* o, const Vec& a, const Vec& b) { stream2(o, a, b); });
        }
        for (; j < C; ++j) scalar(j);
      } else {
        const int64_t nv = C - C % kStep;
        for (int64_t j = 0; j < nv; j += kStep) {
          vec_step(j, [](T* o, const Vec& a, const Vec& b) { store2(o, a, b); });
        }
        for (int64_t j = nv; j < C; ++j) scalar(j);
      }
      // the target columns, over what the loops wrote (as the cross-entropy kernel does, also
      // after non-temporal stores: a thread sees its own stores in order)
      const double ga = kPerElement ? g_row[t.a] : p.grad_scalar;
      out[t.a] = static_cast<T>(
          ga * elem_grad<double>(static_cast<float>(x[t.a]), t.qa, kPw ? pw[t.a] : 1.0));
      if (t.b != t.a) {
        const double gb = kPerElement ? g_row[t.b] : p.grad_scalar;
        out[t.b] = static_cast<T>(
            gb * elem_grad<double>(static_cast<float>(x[t.b]), t.qb, kPw ? pw[t.b] : 1.0));
      }
    }
    if (p.stream_stores) stream_fence();  // publish before another thread reads
  });
}

#pragma GCC diagnostic pop

// ---- float64, scalar (gradcheck) -------------------------------------------------------------------

inline double q_at(const RowTargets& t, const Smoothing& sm, int64_t j) {
  return j == t.a ? t.qa : (j == t.b ? t.qb : sm.off);
}

void forward_f64(const BceArgs& p, bool elementwise) {
  const Smoothing sm(p);
  const double* logits = static_cast<const double*>(p.logits);
  double* loss = static_cast<double*>(p.loss);
  const int64_t C = p.classes;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, sm, r);
      const double* x = logits + r * p.row_stride;
      double total = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double v = elem_loss<double>(x[j], q_at(t, sm, j), pw_at<double>(p, j));
        if (elementwise) {
          loss[r * C + j] = v;
        } else {
          total += v;
        }
      }
      if (!elementwise) loss[r] = total;
    }
  });
}

void backward_f64(const BceArgs& p) {
  const Smoothing sm(p);
  const double* logits = static_cast<const double*>(p.logits);
  const double* gl = static_cast<const double*>(p.grad_loss);
  double* grad = static_cast<double*>(p.grad_logits);
  const int64_t C = p.classes;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowTargets t = row_targets(p, sm, r);
      const double* x = logits + r * p.row_stride;
      for (int64_t j = 0; j < C; ++j) {
        const double g = gl ? gl[r * C + j] : p.grad_scalar;
        grad[r * C + j] = g * elem_grad<double>(x[j], q_at(t, sm, j), pw_at<double>(p, j));
      }
    }
  });
}

template <typename T>
void backward_dispatch(const BceArgs& p) {
  const bool pw = p.pos_weight != nullptr, per_element = p.grad_loss != nullptr;
  if (pw && per_element) return backward_vec<T, true, true>(p);
  if (pw) return backward_vec<T, true, false>(p);
  if (per_element) return backward_vec<T, false, true>(p);
  return backward_vec<T, false, false>(p);
}

}  // namespace

void bce_forward_rows_kernel(const BceArgs& p) {
  const bool pw = p.pos_weight != nullptr;
  switch (p.dtype) {
    case c10::ScalarType::Float:
      return pw ? forward_rows_vec<float, true>(p) : forward_rows_vec<float, false>(p);
    case c10::ScalarType::Half:
      return pw ? forward_rows_vec<c10::Half, true>(p) : forward_rows_vec<c10::Half, false>(p);
    case c10::ScalarType::BFloat16:
      return pw ? forward_rows_vec<c10::BFloat16, true>(p)
                : forward_rows_vec<c10::BFloat16, false>(p);
    case c10::ScalarType::Double: return forward_f64(p, false);
    default: TORCH_INTERNAL_ASSERT(false, "binary_cross_entropy: unexpected dtype ", p.dtype);
  }
}

void bce_forward_elementwise_kernel(const BceArgs& p) {
  const bool pw = p.pos_weight != nullptr;
  switch (p.dtype) {
    case c10::ScalarType::Float:
      return pw ? forward_elementwise_vec<float, true>(p)
                : forward_elementwise_vec<float, false>(p);
    case c10::ScalarType::Half:
      return pw ? forward_elementwise_vec<c10::Half, true>(p)
                : forward_elementwise_vec<c10::Half, false>(p);
    case c10::ScalarType::BFloat16:
      return pw ? forward_elementwise_vec<c10::BFloat16, true>(p)
                : forward_elementwise_vec<c10::BFloat16, false>(p);
    case c10::ScalarType::Double: return forward_f64(p, true);
    default: TORCH_INTERNAL_ASSERT(false, "binary_cross_entropy: unexpected dtype ", p.dtype);
  }
}

void bce_backward_kernel(const BceArgs& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return backward_dispatch<float>(p);
    case c10::ScalarType::Half: return backward_dispatch<c10::Half>(p);
    case c10::ScalarType::BFloat16: return backward_dispatch<c10::BFloat16>(p);
    case c10::ScalarType::Double: return backward_f64(p);
    default: TORCH_INTERNAL_ASSERT(false, "binary_cross_entropy: unexpected dtype ", p.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastcore_train::cpu
