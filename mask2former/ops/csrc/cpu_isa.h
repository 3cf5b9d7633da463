// Run-time choice of the instruction set the CPU kernels use, shared by every kernel file.
//
// The extension is built with the compiler's baseline flags (no -march=native), so each kernel
// is compiled several times: once for the baseline and, with GCC on x86-64, once each for
// AVX2+FMA and AVX-512 under `#pragma GCC target` (M2F_CPU_MULTI_ISA). The variant is chosen at
// run time from CPUID (the same idea as ATen's CPU_CAPABILITY dispatch);
// M2F_OPS_CPU_ISA=generic|avx2|avx512 caps it, e.g. to test every variant on one machine.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define M2F_CPU_MULTI_ISA 1
#else
#define M2F_CPU_MULTI_ISA 0
#endif

namespace mask2former {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa best_supported_isa() {
#if M2F_CPU_MULTI_ISA
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return best;
#else
  return Isa::kGeneric;
#endif
}

// Best supported variant, capped by M2F_OPS_CPU_ISA (read on every call so tests can switch).
inline Isa active_isa() {
  Isa isa = best_supported_isa();
  if (const char* env = std::getenv("M2F_OPS_CPU_ISA")) {
    Isa cap = isa;
    if (std::strcmp(env, "generic") == 0) cap = Isa::kGeneric;
    else if (std::strcmp(env, "avx2") == 0) cap = Isa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) cap = Isa::kAvx512;
    else if (env[0] != '\0')
      TORCH_CHECK_VALUE(false, "M2F_OPS_CPU_ISA must be generic, avx2 or avx512; got '", env, "'");
    isa = std::min(isa, cap);
  }
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace mask2former
