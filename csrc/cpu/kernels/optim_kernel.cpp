// The fused optimizer step on the CPU: a read-only statistics pass over the gradients and an
// update pass that reads each gradient and state element once and writes each state element
// and parameter once. The update rules themselves live in common/optim_math.h.
//
// Work is split into (tensor, chunk) items of kOptimChunk elements that the threads of
// at::parallel_for take one at a time from a shared counter: a hundred tensors of any sizes keep
// every thread busy, and a thread slowed down by another process on its core (a shared machine)
// does not hold the others back as a static split would. Results do not depend on which thread
// takes which item (pass 1 adds its per-item sums in item order).
//
// This file is compiled once per ISA (see setup.py); CPU_CAPABILITY names the namespace.
#include "cpu/kernels/optim_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/optim_math.h"
#include "cpu/kernels/vec_io.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastcore_train::cpu {
namespace CPU_CAPABILITY {
namespace {


struct VecOps {
  static Vec fma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
  static Vec sqrt(const Vec& x) { return x.sqrt(); }
  static Vec div(const Vec& a, const Vec& b) { return a / b; }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }  // NaN wins
  // The product passes through an empty asm statement, so GCC cannot fuse it with a following
  // addition (see common/optim_math.h).
  static Vec mul(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 r = a * b;
    asm("" : "+v"(r));
    return Vec(r);
#elif defined(CPU_CAPABILITY_AVX2)
    __m256 r = a * b;
    asm("" : "+x"(r));
    return Vec(r);
#else
    Vec r = a * b;
    asm("" : "+m"(r));
    return r;
#endif
  }
};
using ScalarOps = optim_math::HostFloatOps;

// store2 with a non-temporal store for 16-bit T at a vector-aligned address: the weight behind
// a master is written and not read, so fetching its cache lines first (a normal store's read
// for ownership) would cost 2 more bytes of traffic per parameter. Callers end with a fence.
template <typename T>
inline void store2_stream(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    store2(p, a, b);
  } else {
    stream2(p, a, b);
  }
}

template <typename T>
inline bool stream_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (kStep * sizeof(T)) == 0;
}

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Calls fn(i) for every i in [0, n), items handed out dynamically to at::parallel_for's threads.
template <typename F>
void for_each_item(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(i);
    }
  });
}

template <typename NumelOf>
std::vector<WorkItem> make_items(int64_t count, NumelOf numel_of) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = numel_of(t);
    for (int64_t b = 0; b < n; b += kOptimChunk) {
      items.push_back({t, b, std::min(n, b + kOptimChunk)});
    }
  }
  return items;
}

// ---- pass 1: non-finite check and sum of squares ----

struct ChunkStats {
  float sq = 0.f;
  bool bad = false;
};

template <typename T, bool kNorm>
ChunkStats chunk_stats(const T* x, int64_t begin, int64_t end) {
  // x*0 is 0 for finite x and NaN for inf/NaN: one FMA per vector flags any non-finite element.
  const Vec zero(0.f);
  Vec chk(0.f), acc0(0.f), acc1(0.f);
  int64_t j = begin;
  for (; j + kStep <= end; j += kStep) {
    Vec a, b;
    load2(x + j, a, b);
    chk = at::vec::fmadd(a, zero, chk);
    chk = at::vec::fmadd(b, zero, chk);
    if constexpr (kNorm) {
      acc0 = at::vec::fmadd(a, a, acc0);
      acc1 = at::vec::fmadd(b, b, acc1);
    }
  }
  ChunkStats s;
  alignas(64) float lanes[kV];
  chk.store(lanes);
  for (int64_t l = 0; l < kV; ++l) s.bad |= lanes[l] != 0.f;  // NaN != 0
  if constexpr (kNorm) {
    (acc0 + acc1).store(lanes);
    for (int64_t l = 0; l < kV; ++l) s.sq += lanes[l];
  }
  for (; j < end; ++j) {
    const float v = static_cast<float>(x[j]);
    s.bad |= !std::isfinite(v);
    if constexpr (kNorm) s.sq += v * v;
  }
  return s;
}

template <bool kNorm>
ChunkStats chunk_stats_any(const GradView& g, int64_t begin, int64_t end) {
  switch (g.dtype) {
    case c10::ScalarType::Float:
      return chunk_stats<float, kNorm>(static_cast<const float*>(g.data), begin, end);
    case c10::ScalarType::Half:
      return chunk_stats<c10::Half, kNorm>(static_cast<const c10::Half*>(g.data), begin, end);
    case c10::ScalarType::BFloat16:
      return chunk_stats<c10::BFloat16, kNorm>(static_cast<const c10::BFloat16*>(g.data), begin,
                                               end);
    default: TORCH_INTERNAL_ASSERT(false, "grad_stats_: unexpected dtype ", g.dtype);
  }
}

// ---- pass 2: the updates ----

// The EMA of 2*kV updated weights (w0, w1) at e, in the pass that computed them: the weights
// are still in registers, so the EMA costs its own read and write only.
inline void ema_body(float* e, const Vec& w0, const Vec& w1, const Vec& coeff,
                     const ParamSlot& s) {
  Vec e0, e1;
  if (!s.ema_copy) load2(e, e0, e1);
  optim_math::ema_update<VecOps>(e0, w0, coeff, s.ema_small, s.ema_copy);
  optim_math::ema_update<VecOps>(e1, w1, coeff, s.ema_small, s.ema_copy);
  store2(e, e0, e1);
}

// kAmsgrad: the per-call option as a template argument, so the loop without it is unchanged.
template <typename T, bool kMaster, bool kAmsgrad>
void adamw_chunk(const ParamSlot& s, int64_t begin, int64_t end, const AdamWKernelParams& k) {
  using optim_math::AdamWConsts;
  const T* g = static_cast<const T*>(s.grad);
  T* p = static_cast<T*>(s.param);
  float* w = s.master;
  float* m = s.state0;
  float* v = s.state1;
  float* vmax = s.state2;  // null without amsgrad
  float* e = s.ema;        // null without EMA
  const Vec ecv(s.ema_coeff);
  const optim_math::AdamWFlags f{k.has_decay, k.lerp_small, kAmsgrad};
  const AdamWConsts<float> c{k.decay, k.lerp_weight,  k.beta2,          k.one_minus_beta2,
                             s.bc2_sqrt, k.eps, s.neg_step_size};
  const AdamWConsts<Vec> cv{Vec(c.decay),    Vec(c.lerp_weight), Vec(c.beta2),
                            Vec(c.one_minus_beta2), Vec(c.bc2_sqrt), Vec(c.eps),
                            Vec(c.neg_step_size)};
  const Vec mul(k.grad_mul);
  const bool stream = kMaster && kHaveStream && !std::is_same_v<T, float> &&
                      stream_aligned(p + begin);
  int64_t j = begin;
  for (; j + kStep <= end; j += kStep) {
    Vec g0, g1, w0, w1, x0, x1;
    load2(g + j, g0, g1);
    g0 = VecOps::mul(g0, mul);
    g1 = VecOps::mul(g1, mul);
    if constexpr (kMaster) {
      load2(w + j, w0, w1);
    } else {
      load2(p + j, w0, w1);
    }
    Vec m0 = Vec::loadu(m + j), m1 = Vec::loadu(m + j + kV);
    Vec v0 = Vec::loadu(v + j), v1 = Vec::loadu(v + j + kV);
    if constexpr (kAmsgrad) load2(vmax + j, x0, x1);
    optim_math::adamw_update<VecOps>(w0, m0, v0, x0, g0, cv, f);
    optim_math::adamw_update<VecOps>(w1, m1, v1, x1, g1, cv, f);
    if (e != nullptr) ema_body(e + j, w0, w1, ecv, s);
    store2(m + j, m0, m1);
    store2(v + j, v0, v1);
    if constexpr (kAmsgrad) store2(vmax + j, x0, x1);
    if constexpr (kMaster) store2(w + j, w0, w1);
    if (stream) {
      store2_stream(p + j, w0, w1);
    } else {
      store2(p + j, w0, w1);
    }
  }
  if (stream) stream_fence();
  for (; j < end; ++j) {
    const float gj = ScalarOps::mul(static_cast<float>(g[j]), k.grad_mul);
    float wj = kMaster ? w[j] : static_cast<float>(p[j]);
    float xj = kAmsgrad ? vmax[j] : 0.f;
    optim_math::adamw_update<ScalarOps>(wj, m[j], v[j], xj, gj, c, f);
    if (e != nullptr) {
      optim_math::ema_update<ScalarOps>(e[j], wj, s.ema_coeff, s.ema_small, s.ema_copy);
    }
    if constexpr (kAmsgrad) vmax[j] = xj;
    if constexpr (kMaster) w[j] = wj;
    p[j] = static_cast<T>(wj);
  }
}

// kFirst: the momentum buffers' first step (once per parameter), as a template argument so the
// usual loop is unchanged.
template <typename T, bool kMaster, bool kFirst>
void sgd_chunk(const ParamSlot& s, int64_t begin, int64_t end, const SGDKernelParams& k) {
  using optim_math::SGDConsts;
  const T* g = static_cast<const T*>(s.grad);
  T* p = static_cast<T*>(s.param);
  float* w = s.master;
  float* b = s.state0;  // null without momentum
  float* e = s.ema;     // null without EMA
  const Vec ecv(s.ema_coeff);
  const optim_math::SGDFlags f{k.has_decay, k.has_momentum, k.nesterov, kFirst};
  const SGDConsts<float> c{k.weight_decay, k.momentum, k.one_minus_dampening, k.neg_lr};
  const SGDConsts<Vec> cv{Vec(c.weight_decay), Vec(c.momentum), Vec(c.one_minus_dampening),
                          Vec(c.neg_lr)};
  const Vec mul(k.grad_mul);
  const bool stream = kMaster && kHaveStream && !std::is_same_v<T, float> &&
                      stream_aligned(p + begin);
  int64_t j = begin;
  for (; j + kStep <= end; j += kStep) {
    Vec g0, g1, w0, w1, b0(0.f), b1(0.f);
    load2(g + j, g0, g1);
    g0 = VecOps::mul(g0, mul);
    g1 = VecOps::mul(g1, mul);
    if constexpr (kMaster) {
      load2(w + j, w0, w1);
    } else {
      load2(p + j, w0, w1);
    }
    if (f.momentum && !kFirst) load2(b + j, b0, b1);
    optim_math::sgd_update<VecOps>(w0, b0, g0, cv, f);
    optim_math::sgd_update<VecOps>(w1, b1, g1, cv, f);
    if (e != nullptr) ema_body(e + j, w0, w1, ecv, s);
    if (f.momentum) store2(b + j, b0, b1);
    if constexpr (kMaster) store2(w + j, w0, w1);
    if (stream) {
      store2_stream(p + j, w0, w1);
    } else {
      store2(p + j, w0, w1);
    }
  }
  if (stream) stream_fence();
  for (; j < end; ++j) {
    const float gj = ScalarOps::mul(static_cast<float>(g[j]), k.grad_mul);
    float wj = kMaster ? w[j] : static_cast<float>(p[j]);
    float bj = f.momentum && !kFirst ? b[j] : 0.f;
    optim_math::sgd_update<ScalarOps>(wj, bj, gj, c, f);
    if (e != nullptr) {
      optim_math::ema_update<ScalarOps>(e[j], wj, s.ema_coeff, s.ema_small, s.ema_copy);
    }
    if (f.momentum) b[j] = bj;
    if constexpr (kMaster) w[j] = wj;
    p[j] = static_cast<T>(wj);
  }
}

// Calls Chunk<T, kMaster>::run(slot, begin, end, k) for every item, T and kMaster from the slot.
template <template <typename, bool> class Chunk, typename K>
void run_updates(const K& k) {
  const auto items = make_items(k.count, [&](int64_t t) { return k.slots[t].numel; });
  for_each_item(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const WorkItem& it = items[i];
    const ParamSlot& s = k.slots[it.tensor];
    const bool master = s.master != nullptr;
    switch (s.dtype) {
      case c10::ScalarType::Float:
        master ? Chunk<float, true>::run(s, it.begin, it.end, k)
               : Chunk<float, false>::run(s, it.begin, it.end, k);
        break;
      case c10::ScalarType::Half:
        master ? Chunk<c10::Half, true>::run(s, it.begin, it.end, k)
               : Chunk<c10::Half, false>::run(s, it.begin, it.end, k);
        break;
      case c10::ScalarType::BFloat16:
        master ? Chunk<c10::BFloat16, true>::run(s, it.begin, it.end, k)
               : Chunk<c10::BFloat16, false>::run(s, it.begin, it.end, k);
        break;
      default: TORCH_INTERNAL_ASSERT(false, "fused optimizer: unexpected dtype ", s.dtype);
    }
  });
}

template <typename T, bool kMaster>
struct AdamWChunk {
  static void run(const ParamSlot& s, int64_t b, int64_t e, const AdamWKernelParams& k) {
    k.amsgrad ? adamw_chunk<T, kMaster, true>(s, b, e, k)
              : adamw_chunk<T, kMaster, false>(s, b, e, k);
  }
};

template <typename T, bool kMaster>
struct SGDChunk {
  static void run(const ParamSlot& s, int64_t b, int64_t e, const SGDKernelParams& k) {
    s.first ? sgd_chunk<T, kMaster, true>(s, b, e, k)
            : sgd_chunk<T, kMaster, false>(s, b, e, k);
  }
};

}  // namespace

void grad_stats_kernel(GradStatsParams& p) {
  const auto items = make_items(p.count, [&](int64_t t) { return p.grads[t].numel; });
  std::vector<ChunkStats> stats(items.size());
  const int64_t n = static_cast<int64_t>(items.size());
  // Last items first: the update pass starts where this pass ends, with the gradients it read
  // last still in the cache.
  for_each_item(n, [&](int64_t k) {
    const int64_t i = n - 1 - k;
    const WorkItem& it = items[i];
    const GradView& g = p.grads[it.tensor];
    stats[i] = p.want_norm ? chunk_stats_any<true>(g, it.begin, it.end)
                           : chunk_stats_any<false>(g, it.begin, it.end);
  });
  double sq = 0.0;
  bool bad = false;
  for (const ChunkStats& s : stats) {
    sq += s.sq;
    bad |= s.bad;
  }
  p.found_nonfinite = bad;
  p.sq_norm = sq;
}

void adamw_kernel(const AdamWKernelParams& p) { run_updates<AdamWChunk>(p); }

void sgd_kernel(const SGDKernelParams& p) { run_updates<SGDChunk>(p); }

}  // namespace CPU_CAPABILITY
}  // namespace fastcore_train::cpu
