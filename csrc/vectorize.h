// Shared by the fused elementwise ops (rms_norm.cpp, rotary.cpp): how their loops get AVX2 code
// while the library stays loadable on any x86-64 CPU.
#pragma once

// The function is compiled twice, for AVX2 and for the baseline ISA, and the dynamic loader picks
// one by the CPU it runs on. Plain loops over `__restrict` pointers then vectorize 8 wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORATCH_VECTORIZED __attribute__((target_clones("avx2", "default")))
#else
#define LORATCH_VECTORIZED
#endif
