// Run-time choice between the per-ISA builds of the CPU kernels in cpu/kernels/.
//
// setup.py and CMakeLists.txt compile every file of cpu/kernels/ three times, with
// CPU_CAPABILITY set to DEFAULT, AVX2 and AVX512, so each kernel exists in three namespaces.
// A caller declares a kernel once with FT_ISA_DECLARE and calls it with FT_ISA_CALL, which
// picks the best build this CPU supports (or the one forced by ATEN_CPU_CAPABILITY or
// fastcore_train._C._set_cpu_capability, for tests).
#pragma once

namespace fastcore_train::cpu {

enum class ISA { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The ISA in use: min(what the CPU supports, what torch's ATEN_CPU_CAPABILITY allows,
// the override of set_isa()).
ISA isa();
// Overrides the choice (tests run every build); an ISA the CPU lacks is an error.
void set_isa(const char* name);
const char* isa_name(ISA isa);
// Best ISA the CPU supports, ignoring overrides.
ISA best_isa();

}  // namespace fastcore_train::cpu

#define FT_ISA_DECLARE(ret, name, params)              \
  namespace fastcore_train::cpu {                      \
  namespace DEFAULT { ret name params; }               \
  namespace AVX2 { ret name params; }                  \
  namespace AVX512 { ret name params; }                \
  }

#define FT_ISA_CALL(name, ...)                                          \
  do {                                                                  \
    switch (::fastcore_train::cpu::isa()) {                             \
      case ::fastcore_train::cpu::ISA::AVX512:                          \
        ::fastcore_train::cpu::AVX512::name(__VA_ARGS__);               \
        break;                                                          \
      case ::fastcore_train::cpu::ISA::AVX2:                            \
        ::fastcore_train::cpu::AVX2::name(__VA_ARGS__);                 \
        break;                                                          \
      default:                                                          \
        ::fastcore_train::cpu::DEFAULT::name(__VA_ARGS__);              \
    }                                                                   \
  } while (0)
