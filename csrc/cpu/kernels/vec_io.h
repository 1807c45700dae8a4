// One step of the per-ISA vector loops: float, Half or BFloat16 in memory, two float vectors in
// registers (a vector of 16-bit values holds as many elements as two float vectors). Shared by
// the kernels in this folder; everything lives in the per-ISA namespace CPU_CAPABILITY.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastcore_train::cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kStep = 2 * kV;

// Non-temporal stores exist (and need this alignment, in bytes) in the SIMD builds only.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kHaveStream = true;
constexpr int64_t kStreamAlign = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveStream = true;
constexpr int64_t kStreamAlign = 32;
#else
constexpr bool kHaveStream = false;
constexpr int64_t kStreamAlign = 1;
#endif

template <typename T>
inline void load2(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kV);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kStep);
    at::vec::load_to_float<T>(p, a, b);
  }
}

template <typename T>
inline void store2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kV);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// store2 bypassing the caches, for outputs far larger than them: a normal store to a line not
// in cache first reads it (read for ownership), doubling the write traffic. `p` must be aligned
// to kStreamAlign; end the writing thread's work with stream_fence().
template <typename T>
inline void stream2(T* p, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + kV, b);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                        static_cast<__m512i>(at::vec::convert_from_float<T>(a, b)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + kV, b);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                        static_cast<__m256i>(at::vec::convert_from_float<T>(a, b)));
  }
#else
  store2(p, a, b);
#endif
}

// Orders this thread's non-temporal stores before whatever follows (they are weakly ordered).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace fastcore_train::cpu
