#include "cpu/isa.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>
#include <string>

namespace fastcore_train::cpu {
namespace {

// -1: no override.
std::atomic<int> g_override{-1};

ISA parse(const std::string& s) {
  std::string u;
  for (char c : s) u += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (u == "AVX512") return ISA::AVX512;
  if (u == "AVX2") return ISA::AVX2;
  if (u == "DEFAULT") return ISA::DEFAULT;
  TORCH_CHECK(false, "fastcore_train: unknown CPU capability '", s,
              "'; expected one of default, avx2, avx512.");
}

bool cpu_has(ISA isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case ISA::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case ISA::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
#else
  return isa == ISA::DEFAULT;
#endif
}

ISA detect() {
  ISA best = best_isa();
  // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, so users keep one knob for both
  // torch's kernels and ours. It may name ISAs we do not build (e.g. ZVECTOR): ignore those.
  std::string torch_cap = at::get_cpu_capability();
  ISA torch_isa = best;
  if (torch_cap == "DEFAULT") torch_isa = ISA::DEFAULT;
  else if (torch_cap == "AVX2") torch_isa = ISA::AVX2;
  else if (torch_cap == "AVX512") torch_isa = ISA::AVX512;
  return static_cast<ISA>(std::min(static_cast<int>(best), static_cast<int>(torch_isa)));
}

}  // namespace

ISA best_isa() {
  if (cpu_has(ISA::AVX512)) return ISA::AVX512;
  if (cpu_has(ISA::AVX2)) return ISA::AVX2;
  return ISA::DEFAULT;
}

ISA isa() {
  int o = g_override.load(std::memory_order_relaxed);
  if (o >= 0) return static_cast<ISA>(o);
  static const ISA detected = detect();
  return detected;
}

void set_isa(const char* name) {
  if (name == nullptr || *name == '\0') {
    g_override.store(-1);
    return;
  }
  ISA want = parse(name);
  TORCH_CHECK(cpu_has(want), "fastcore_train: this CPU does not support ", isa_name(want), ".");
  g_override.store(static_cast<int>(want));
}

const char* isa_name(ISA isa) {
  switch (isa) {
    case ISA::AVX512: return "avx512";
    case ISA::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace fastcore_train::cpu
