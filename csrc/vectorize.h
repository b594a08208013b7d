// Shared by the fused elementwise ops (rms_norm.cpp, rotary.cpp, swiglu.cpp, cross_entropy.cpp):
// how their loops get AVX2 code while the library stays loadable on any x86-64 CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// The function is compiled twice, for AVX2 and for the baseline ISA, and the dynamic loader picks
// one by the CPU it runs on. Plain loops over `__restrict` pointers then vectorize 8 wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORATCH_VECTORIZED __attribute__((target_clones("avx2", "default")))
#else
#define LORATCH_VECTORIZED
#endif

// Loops that need e^x are written with AVX2 intrinsics around the AVX2 e^x (1-ulp) that libtorch's
// own CPU kernels (silu, softmax) call, which libtorch_cpu exports; they run only where
// loratch_has_avx2() says so, and a scalar std::exp loop runs elsewhere.
#if defined(__x86_64__) && defined(__GNUC__)
#define LORATCH_SLEEF_AVX2 1
extern "C" __m256 Sleef_expf8_u10avx2(__m256);
#define LORATCH_AVX2 __attribute__((target("avx2,fma")))
#endif

// Whether this CPU runs the AVX2 loops (false off x86-64).
inline bool loratch_has_avx2() {
#ifdef LORATCH_SLEEF_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}
