// The mixup blend on the CPU: out[i] = a_i * x[i] + b_i * x[src[i]] (see common/mixup_args.h).
//
// Memory-bound: each output sample is produced in one pass that reads its two source rows
// once and writes it once, in chunks spread over the threads (a sample of a 224x224 image is
// ~600 KB, so whole samples would balance badly on a few cores). Math is float32 (float64 for
// float64), half types are converted on load and store.
//
// In place (`pairs`), a work unit is a chunk of a pair (i, j = src[i]): both chunks are loaded,
// both results computed from the loaded values, then both stored, so nothing is read after it
// was overwritten and no buffer is needed.
//
// A large out-of-place result is written with non-temporal (streaming) stores on AVX2/AVX-512:
// a result bigger than the last-level cache would be evicted before anyone reads it anyway,
// and streaming skips the read-for-ownership of every output line, a quarter of the traffic.
//
// This file is compiled once per ISA (see setup.py); CPU_CAPABILITY names the namespace.
#include "cpu/kernels/mixup_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/kernels/vec_io.h"

namespace fastcore_train::cpu {
namespace CPU_CAPABILITY {
namespace {

// Elements per work unit: big enough to amortise the scheduling, small enough to balance.
constexpr int64_t kChunk = 16384;
// Below this many elements in total the blend runs on one thread.
constexpr int64_t kSerial = 65536;
// Out-of-place results of at least this many bytes (the size of a large last-level cache) are
// written with streaming stores.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// out = a * x + b * y over n elements (out may be x or y; not with kStream).
template <typename T, bool kStream = false>
void blend_row(const T* x, const T* y, T* out, int64_t n, acc_t<T> a, acc_t<T> b) {
  using A = acc_t<T>;
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, double>) {
    const Vec va(a), vb(b);
    if constexpr (kStream) {
      // scalar head up to the vector alignment of out, then streaming stores
      constexpr uintptr_t kAlign = sizeof(Vec);
      const int64_t head = std::min<int64_t>(
          n, static_cast<int64_t>((kAlign - reinterpret_cast<uintptr_t>(out) % kAlign) % kAlign /
                                  sizeof(T)));
      for (; j < head; ++j) {
        out[j] = static_cast<T>(std::fma(a, static_cast<A>(x[j]), b * static_cast<A>(y[j])));
      }
      for (; j + kStep <= n; j += kStep) {
        Vec x0, x1, y0, y1;
        load2(x + j, x0, x1);
        load2(y + j, y0, y1);
        stream2(out + j, at::vec::fmadd(va, x0, vb * y0), at::vec::fmadd(va, x1, vb * y1));
      }
    }
    for (; j + kStep <= n; j += kStep) {
      Vec x0, x1, y0, y1;
      load2(x + j, x0, x1);
      load2(y + j, y0, y1);
      store2(out + j, at::vec::fmadd(va, x0, vb * y0), at::vec::fmadd(va, x1, vb * y1));
    }
  }
  for (; j < n; ++j) {
    out[j] = static_cast<T>(std::fma(a, static_cast<A>(x[j]), b * static_cast<A>(y[j])));
  }
}

// In place on a pair: p <- ai * p + bi * q and q <- aj * q + bj * p, from the same loads.
template <typename T>
void blend_pair_row(T* p, T* q, int64_t n, acc_t<T> ai, acc_t<T> bi, acc_t<T> aj,
                    acc_t<T> bj) {
  using A = acc_t<T>;
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, double>) {
    const Vec vai(ai), vbi(bi), vaj(aj), vbj(bj);
    for (; j + kStep <= n; j += kStep) {
      Vec p0, p1, q0, q1;
      load2(p + j, p0, p1);
      load2(q + j, q0, q1);
      store2(p + j, at::vec::fmadd(vai, p0, vbi * q0), at::vec::fmadd(vai, p1, vbi * q1));
      store2(q + j, at::vec::fmadd(vaj, q0, vbj * p0), at::vec::fmadd(vaj, q1, vbj * p1));
    }
  }
  for (; j < n; ++j) {
    const A u = static_cast<A>(p[j]), v = static_cast<A>(q[j]);
    p[j] = static_cast<T>(std::fma(ai, u, bi * v));
    q[j] = static_cast<T>(std::fma(aj, v, bj * u));
  }
}

template <typename T>
void blend(const BlendArgs& a) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.n;
  const A* lam = static_cast<const A*>(a.lam);
  // The weights in the dtype torch would use for lam * x + (1 - lam) * y: a Python float lam
  // is subtracted from 1 in double, a tensor lam in its own dtype.
  auto weights = [&](int64_t i) {
    if (lam == nullptr) {
      return std::make_pair(static_cast<A>(a.lam_scalar), static_cast<A>(1.0 - a.lam_scalar));
    }
    const int64_t k = a.lam_from_source ? a.src[i] : i;
    return std::make_pair(lam[i], A(1) - lam[k]);
  };
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t chunk_len = std::min(n, kChunk);
  const int64_t grain = std::max<int64_t>(1, kSerial / chunk_len);

  if (!a.pairs) {
    const bool stream = a.batch * n * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
    at::parallel_for(0, a.batch * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t i = u / chunks, c0 = (u % chunks) * kChunk;
        const auto [wa, wb] = weights(i);
        const T* xi = x + i * a.x_stride + c0;
        const T* xs = x + a.src[i] * a.x_stride + c0;
        T* o = out + i * a.out_stride + c0;
        const int64_t len = std::min(kChunk, n - c0);
        if (stream) {
          blend_row<T, true>(xi, xs, o, len, wa, wb);
        } else {
          blend_row<T>(xi, xs, o, len, wa, wb);
        }
      }
      if (stream) stream_fence();  // order this thread's streaming stores before the join
    });
    return;
  }
  // In place: one unit per chunk of each pair (fixed points are pairs with themselves).
  std::vector<int64_t> leaders;
  leaders.reserve(static_cast<size_t>(a.batch));
  for (int64_t i = 0; i < a.batch; ++i) {
    if (a.src[i] >= i) leaders.push_back(i);
  }
  const int64_t units = static_cast<int64_t>(leaders.size()) * chunks;
  at::parallel_for(0, units, std::max<int64_t>(1, grain / 2), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = leaders[u / chunks], j = a.src[i], c0 = (u % chunks) * kChunk;
      const int64_t len = std::min(kChunk, n - c0);
      T* p = out + i * a.out_stride + c0;
      const auto [ai, bi] = weights(i);
      if (j == i) {
        blend_row(p, p, p, len, ai, bi);
      } else {
        const auto [aj, bj] = weights(j);
        blend_pair_row(p, out + j * a.out_stride + c0, len, ai, bi, aj, bj);
      }
    }
  });
}

}  // namespace

void mixup_blend_kernel(const BlendArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return blend<float>(a);
    case c10::ScalarType::Half: return blend<c10::Half>(a);
    case c10::ScalarType::BFloat16: return blend<c10::BFloat16>(a);
    case c10::ScalarType::Double: return blend<double>(a);
    default: TORCH_INTERNAL_ASSERT(false, "mixup: unexpected dtype ", a.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastcore_train::cpu
