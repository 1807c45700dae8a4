// Fused uint8 normalize + mixup / cutmix on the CPU (see common/normalize_mixup_args.h).
//
// A uint8 has 256 values, so norm(v, c) is a table of 256 floats per channel, computed with
// the float32 operations of torch's eager (x.float() - mean) / std, hence bit-identical to it.
// Mixup folds its weights into two tables, A = wa * norm and B = wb * norm (the two roundings
// of torch's lam * a and (1 - lam) * b), so each output element is A[x[i]] + B[x[perm[i]]]:
// two table loads and one add, the same float32 result as the eager composition. The tables
// (1-2 KB per channel) stay in L1. The AVX2/AVX-512 builds compute the same values with vector
// arithmetic instead (see widen()); the tables serve the scalar build and the loop tails.
//
// Memory: one read of the uint8 source rows, one write of the result (streaming stores for a
// result larger than the last-level cache, as the mixup kernel). Work units are chunks of a
// plane (NCHW: a channel; NHWC: the whole sample, where the channel of an element cycles with
// period C and a pattern of channel offsets, periodic in C and in the vector width, supplies it).
//
// This file is compiled once per ISA (see setup.py); CPU_CAPABILITY names the namespace.
#include "cpu/kernels/normalize_mixup_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels/vec_io.h"

namespace fastcore_train::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work unit
constexpr int64_t kSerial = 65536;  // below this many elements in total: one thread
constexpr int64_t kStreamBytes = int64_t(32) << 20;  // see mixup_kernel.cpp
constexpr int64_t kTable = 256;

// The SIMD builds compute norm on kV elements at a time: widen, subtract, divide (the exact
// float32 operations, so the values equal the tables'). Measured on an AVX-512 EPYC, 256x3x224^2:
// gathers from the tables took 32 ms for a mixup, 3x the memory bound; this takes ~10 ms.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kHaveVec = true;
inline Vec widen(const uint8_t* x) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))));
}
// Keeps the compiler from contracting a product and a later sum into one FMA (torch's eager
// lam * a + (1 - lam) * b rounds both products).
inline Vec opaque(Vec v) {
  __m512 r = v;
  asm("" : "+v"(r));
  return r;
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveVec = true;
inline Vec widen(const uint8_t* x) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}
inline Vec opaque(Vec v) {
  __m256 r = v;
  asm("" : "+x"(r));
  return r;
}
#else
constexpr bool kHaveVec = false;
inline Vec widen(const uint8_t*) { return Vec(0.f); }
inline Vec opaque(Vec v) { return v; }
#endif

// The per-element channel data of a run of elements: its table offset (channel * 256), mean
// and std, for the element k places after one at phase q (0 <= q < period). Periodic in the
// channel count and in kV, so a vector read at any phase below the period stays in the arrays.
// NCHW planes have one channel each (a pattern of period kV per channel); NHWC cycles through C.
struct Pattern {
  std::vector<int32_t> off;
  std::vector<float> mean, std;
  int64_t period = 1;  // a multiple of the channel count of the pattern and of kV
  int64_t channels = 1;
  // channels [c0, c0 + n) cycling
  Pattern(const NormMixArgs& a, int64_t c0, int64_t n) : period(n * kV), channels(n) {
    const size_t len = static_cast<size_t>(period + kStep);
    off.resize(len);
    mean.resize(len);
    std.resize(len);
    for (size_t k = 0; k < len; ++k) {
      const int64_t c = c0 + static_cast<int64_t>(k) % n;
      off[k] = static_cast<int32_t>((c - c0) * kTable);
      mean[k] = a.mean[c];
      std[k] = a.std[c];
    }
  }
  int64_t phase(int64_t element) const { return element % channels; }
};

inline int64_t advance(int64_t q, int64_t by, int64_t period) {
  q += by;
  return q >= period ? q - period : q;
}

// out[k] = ta[xa[k] + off] (+ tb[xb[k] + off] when kTwo) for k < n, from phase q of `p`; the
// vector loop computes the same values as wa * norm(xa) (+ wb * norm(xb)), or norm(xa) when
// !kTwo (ta is then the plain norm table).
template <typename T, bool kTwo, bool kStream>
void norm_row(const uint8_t* xa, const uint8_t* xb, const float* ta, const float* tb, float wa,
              float wb, const Pattern& p, int64_t q, T* out, int64_t n) {
  const int32_t* off = p.off.data();
  int64_t j = 0;
  auto scalar = [&](int64_t end) {
    for (; j < end; ++j) {
      float v = ta[xa[j] + off[q]];
      if constexpr (kTwo) v = v + tb[xb[j] + off[q]];
      out[j] = static_cast<T>(v);
      q = advance(q, 1, p.period);
    }
  };
  if constexpr (kHaveVec) {
    if constexpr (kStream) {
      const uintptr_t mis = reinterpret_cast<uintptr_t>(out) % kStreamAlign;
      scalar(std::min<int64_t>(n, static_cast<int64_t>((kStreamAlign - mis) % kStreamAlign /
                                                       sizeof(T))));
    }
    const Vec va(wa), vb(wb);
    const float* pm = p.mean.data();
    const float* ps = p.std.data();
    auto norm = [&](const uint8_t* x, int64_t at) {
      return (widen(x) - Vec::loadu(pm + at)) / Vec::loadu(ps + at);
    };
    for (; j + kStep <= n; j += kStep) {
      const int64_t q1 = advance(q, kV, p.period);
      Vec v0 = norm(xa + j, q), v1 = norm(xa + j + kV, q1);
      if constexpr (kTwo) {
        v0 = opaque(va * v0) + opaque(vb * norm(xb + j, q));
        v1 = opaque(va * v1) + opaque(vb * norm(xb + j + kV, q1));
      }
      if constexpr (kStream) {
        stream2(out + j, v0, v1);
      } else {
        store2(out + j, v0, v1);
      }
      q = advance(q1, kV, p.period);
    }
  }
  scalar(n);
}

template <typename T>
void run(const NormMixArgs& a) {
  const int64_t C = a.channels;
  const bool nchw = a.col_unit == 1;  // a plane is one channel
  const int64_t plane = a.rows * a.row_len;
  std::vector<Pattern> pats;  // per plane
  for (int64_t pl = 0; pl < a.planes; ++pl) {
    if (nchw) pats.emplace_back(a, pl, 1);
    else pats.emplace_back(a, 0, C);
  }

  // norm(v, c), with the float32 operations of (x.float() - mean) / std
  std::vector<float> norm(static_cast<size_t>(C * kTable));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t v = 0; v < kTable; ++v) {
      norm[c * kTable + v] = (static_cast<float>(v) - a.mean[c]) / a.std[c];
    }
  }
  // torch's lam * a + (1 - lam) * b: a Python lam enters as float32, 1 - lam computed in
  // double; a tensor lam is float32 and 1 - lam is computed in float32
  auto weights = [&](int64_t i) {
    return a.lam ? std::make_pair(a.lam[i], 1.0f - a.lam[i])
                 : std::make_pair(static_cast<float>(a.lam_scalar),
                                  static_cast<float>(1.0 - a.lam_scalar));
  };
  // Mixup: per set of weights (one, or one per sample), the tables A then B.
  std::vector<float> mixed;
  const int64_t set = 2 * C * kTable;
  if (a.mode == NormMixMode::kMixup) {
    const int64_t sets = a.lam ? a.batch : 1;
    mixed.resize(static_cast<size_t>(sets * set));
    at::parallel_for(0, sets, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const auto [wa, wb] = weights(i);
        float* t = mixed.data() + i * set;
        for (int64_t k = 0; k < C * kTable; ++k) {
          t[k] = wa * norm[k];
          t[C * kTable + k] = wb * norm[k];
        }
      }
    });
  }

  const uint8_t* x = a.x;
  T* out = static_cast<T*>(a.out);
  const bool stream = a.batch * a.planes * plane * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  // Work units: rows-aligned chunks of a plane of a sample.
  const int64_t rows_per_unit = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, a.row_len));
  const int64_t units_per_plane = (a.rows + rows_per_unit - 1) / rows_per_unit;
  const int64_t units = a.batch * a.planes * units_per_plane;
  const int64_t unit_len = std::min(plane, rows_per_unit * a.row_len);
  const int64_t grain = std::max<int64_t>(1, kSerial / std::max<int64_t>(1, unit_len));

  auto body = [&](auto stream_tag) {
    constexpr bool kS = decltype(stream_tag)::value;
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t i = u / (a.planes * units_per_plane);
        const int64_t pl = (u / units_per_plane) % a.planes;
        const int64_t r0 = (u % units_per_plane) * rows_per_unit;
        const int64_t r1 = std::min(a.rows, r0 + rows_per_unit);
        const int64_t base = pl * plane;  // of the plane, within a sample
        const int64_t choff = nchw ? pl * kTable : 0;
        const Pattern& pat = pats[pl];
        const uint8_t* xi = x + i * a.x_stride + base;
        T* o = out + i * a.out_stride + base;
        // rows [h0, h1) of the plane, from sample s's table t, columns [e0, e1) of each row
        auto copy_rows = [&](const uint8_t* xs, const float* t, int64_t h0, int64_t h1) {
          if (h0 >= h1) return;
          const int64_t e0 = h0 * a.row_len;
          norm_row<T, false, kS>(xs + e0, nullptr, t + choff, nullptr, 1.f, 0.f, pat,
                                 pat.phase(e0), o + e0, (h1 - h0) * a.row_len);
        };
        if (a.mode == NormMixMode::kMixup) {
          const float* ta = mixed.data() + (a.lam ? i * set : 0);
          const auto [wa, wb] = weights(i);
          const int64_t e0 = r0 * a.row_len;
          norm_row<T, true, kS>(xi + e0, x + a.src[i] * a.x_stride + base + e0, ta + choff,
                                ta + C * kTable + choff, wa, wb, pat, pat.phase(e0), o + e0,
                                (r1 - r0) * a.row_len);
          continue;
        }
        const float* t = norm.data();
        if (a.mode == NormMixMode::kNormalize) {
          copy_rows(xi, t, r0, r1);
          continue;
        }
        const int64_t* b = a.boxes ? a.boxes + 4 * i : a.box;
        const uint8_t* xs = x + a.src[i] * a.x_stride + base;
        const int64_t c0 = b[2] * a.col_unit, c1 = b[3] * a.col_unit;
        if (b[0] == b[1] || c0 == c1) {
          copy_rows(xi, t, r0, r1);
          continue;
        }
        const int64_t y0 = std::clamp(b[0], r0, r1), y1 = std::clamp(b[1], r0, r1);
        copy_rows(xi, t, r0, y0);
        for (int64_t h = y0; h < y1; ++h) {
          const int64_t e = h * a.row_len;
          const float* tc = t + choff;
          norm_row<T, false, kS>(xi + e, nullptr, tc, nullptr, 1.f, 0.f, pat, pat.phase(e),
                                 o + e, c0);
          norm_row<T, false, kS>(xs + e + c0, nullptr, tc, nullptr, 1.f, 0.f, pat,
                                 pat.phase(e + c0), o + e + c0, c1 - c0);
          norm_row<T, false, kS>(xi + e + c1, nullptr, tc, nullptr, 1.f, 0.f, pat,
                                 pat.phase(e + c1), o + e + c1, a.row_len - c1);
        }
        copy_rows(xi, t, y1, r1);
      }
      if (kS) stream_fence();  // order this thread's streaming stores before the join
    });
  };
  if (stream) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace

void normalize_mixup_kernel(const NormMixArgs& a) {
  switch (a.out_dtype) {
    case c10::ScalarType::Float: return run<float>(a);
    case c10::ScalarType::BFloat16: return run<c10::BFloat16>(a);
    case c10::ScalarType::Half: return run<c10::Half>(a);
    default: TORCH_INTERNAL_ASSERT(false, "normalize_mixup: unexpected out dtype ", a.out_dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastcore_train::cpu
