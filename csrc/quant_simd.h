// AVX2 kernels on GGUF's common block formats (q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K)
// and on plain float32 rows, for the quantized linear and generation's decoding steps
// (quant_linear.cpp): decoding rows of blocks to float32, and few-row products that decode each
// block in registers and multiply it there. Each block decodes to the same floats as Rust's
// decoder (src/quant/dequant.rs: the same products and sums, no fused multiply-add), so only a
// product's summation order differs from "decode, then multiply".
#pragma once

#include <cstdint>

namespace loratch {

// Whether this CPU runs the kernels (x86-64 with AVX2 and FMA).
bool quant_simd_cpu();

// Whether block format `ty` (the quantized linear's type code: the index into Rust's
// `quant::ALL_QTYPES`) has a kernel here and this CPU runs it. Float32 rows (code 0) are not
// among them: a float32 weight's rows need not be a whole number of 32-element chunks, so only
// callers that check that (`loratch_dense_few_rows`) pass code 0 to `quant_simd_dot`.
bool quant_simd_supports(int32_t ty);

// Decodes the `n` rows of blocks at `w` (each `rb` bytes, `in` elements) into `dst` [n, in].
// Only for a type `quant_simd_supports`.
void quant_simd_decode(int32_t ty, const uint8_t* w, int64_t rb, int64_t n, int64_t in, float* dst);

// `y[i * ldy + r] = sum_k x[i * in + k] * W[r, k]` for the `m` (1..=8) rows of `x` and the `n`
// rows of blocks of W at `w` (each `rb` bytes, `in` elements). Only for a type
// `quant_simd_supports`.
void quant_simd_dot(int32_t ty, const uint8_t* w, int64_t rb, int64_t n, int64_t in, const float* x,
                    int64_t m, float* y, int64_t ldy);

}  // namespace loratch
