// AVX2 decoding and few-row products on GGUF's common block formats and on float32 rows (see
// quant_simd.h).
//
// Each format is a `Block` with `kElems` elements in `kBytes` bytes and `each(block, f)`, which
// calls `f(c, w)` for the block's 32-element chunks in order, `w` the chunk's 32 floats in four
// AVX2 vectors. The floats are those of src/quant/dequant.rs (itself gguf-py's numpy code bit for
// bit): the same scale products and the same `d * q (+ or -) m` as separate multiply and add, so
// the decoded weight equals Rust's; a product then only sums in another order than a
// decode-then-multiply does. The file is compiled for AVX2 + FMA through a target pragma and only
// called where `quant_simd_supports` saw those features at run time.
#include "quant_simd.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORATCH_QUANT_SIMD 1
#include <immintrin.h>
#endif

namespace loratch {

#ifdef LORATCH_QUANT_SIMD

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

using V = __m256;

// Type codes: indices into Rust's `quant::ALL_QTYPES` (a Rust test pins them).
enum Code : int32_t {
  kF32 = 0,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 4,
  kQ5_1 = 5,
  kQ8_0 = 6,
  kQ4K = 9,
  kQ5K = 10,
  kQ6K = 11
};

// The little-endian f16 at `p` as f32, as Rust's `quant::f16_to_f32` computes it (subnormals by an
// exact product, so flush-to-zero modes do not change it).
inline float half_at(const uint8_t* p) {
  const uint32_t h = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8);
  const uint32_t sign = (h & 0x8000u) << 16, em = h & 0x7fffu, exp = em >> 10;
  uint32_t bits;
  if (exp == 0) {
    const float sub = static_cast<float>(em & 0x3ffu) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &sub, 4);
  } else if (exp == 31) {
    bits = (em << 13) | 0x7f800000u;
  } else {
    bits = (em << 13) + ((127u - 15u) << 23);
  }
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __m256i load32(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// 32 int8 lanes as four vectors of 8 floats, in order.
inline void to_floats(__m256i q, V w[4]) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

// 16 bytes of nibble pairs as 32 lanes: the low nibbles (elements 0..16), then the high ones.
inline __m256i split_nibbles(__m128i q) {
  const __m128i m = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

// Lane i is 0x10 where bit i of `x` is set, else 0 (the fifth bits of q5_0 / q5_1).
inline __m256i fifth_bits(uint32_t x) {
  const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i v =
      _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), pick), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
}

// w = d * w (Rust: `d * q as f32`, or `q as f32 * d`: the same product).
inline void scale(V w[4], float d) {
  const V dv = _mm256_set1_ps(d);
  for (int k = 0; k < 4; ++k) w[k] = _mm256_mul_ps(dv, w[k]);
}

// w = d * w + m (q4_1, q5_1) or d * w - m (k-quants): the product rounded, then the sum.
inline void scale_add(V w[4], float d, float m) {
  const V dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
  for (int k = 0; k < 4; ++k) w[k] = _mm256_add_ps(_mm256_mul_ps(dv, w[k]), mv);
}
inline void scale_sub(V w[4], float d, float m) {
  const V dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
  for (int k = 0; k < 4; ++k) w[k] = _mm256_sub_ps(_mm256_mul_ps(dv, w[k]), mv);
}

// Plain float32 rows (dense weights in generation's decoding steps: quant_linear.cpp's
// `loratch_dense_few_rows`).
struct F32 {
  static constexpr int kElems = 32, kBytes = 128;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    V w[4];
    for (int k = 0; k < 4; ++k) w[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(b) + 8 * k);
    f(0, w);
  }
};

struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    V w[4];
    to_floats(load32(b + 2), w);
    scale(w, half_at(b));
    f(0, w);
  }
};

struct Q4_0 {
  static constexpr int kElems = 32, kBytes = 18;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    V w[4];
    to_floats(_mm256_sub_epi8(split_nibbles(load16(b + 2)), _mm256_set1_epi8(8)), w);
    scale(w, half_at(b));
    f(0, w);
  }
};

struct Q4_1 {
  static constexpr int kElems = 32, kBytes = 20;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    V w[4];
    to_floats(split_nibbles(load16(b + 4)), w);
    scale_add(w, half_at(b), half_at(b + 2));
    f(0, w);
  }
};

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);  // x86-64 is little-endian, as the format
  return v;
}

struct Q5_0 {
  static constexpr int kElems = 32, kBytes = 22;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    V w[4];
    const __m256i q = _mm256_or_si256(split_nibbles(load16(b + 6)), fifth_bits(u32_at(b + 2)));
    to_floats(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), w);
    scale(w, half_at(b));
    f(0, w);
  }
};

struct Q5_1 {
  static constexpr int kElems = 32, kBytes = 24;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    V w[4];
    to_floats(_mm256_or_si256(split_nibbles(load16(b + 8)), fifth_bits(u32_at(b + 4))), w);
    scale_add(w, half_at(b), half_at(b + 2));
    f(0, w);
  }
};

// The 8 six-bit (scale, min) pairs of a q4_K / q5_K block's 12 scale bytes.
inline void scale_min(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 0x3f;
    mn[i] = s[4 + i] & 0x3f;
    sc[4 + i] = (s[8 + i] & 0x0f) | ((s[i] >> 2) & 0x30);
    mn[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
  }
}

inline __m256i shift_right(__m256i v, int s) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(s)); }

// Sub-block g (32 elements) is nibble g % 2 of code bytes 32 (g / 2) .. + 32.
struct Q4K {
  static constexpr int kElems = 256, kBytes = 144;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    const float d = half_at(b), dmin = half_at(b + 2);
    uint8_t sc[8], mn[8];
    scale_min(b + 4, sc, mn);
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int g = 0; g < 8; ++g) {
      V w[4];
      to_floats(_mm256_and_si256(shift_right(load32(b + 16 + 32 * (g / 2)), 4 * (g % 2)), low), w);
      scale_sub(w, d * static_cast<float>(sc[g]), dmin * static_cast<float>(mn[g]));
      f(g, w);
    }
  }
};

// q4_K plus 32 bytes of fifth bits after the scales: sub-block g takes bit g of byte l.
struct Q5K {
  static constexpr int kElems = 256, kBytes = 176;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    const float d = half_at(b), dmin = half_at(b + 2);
    uint8_t sc[8], mn[8];
    scale_min(b + 4, sc, mn);
    const __m256i low = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    const __m256i qh = load32(b + 16);
    for (int g = 0; g < 8; ++g) {
      V w[4];
      const __m256i lo =
          _mm256_and_si256(shift_right(load32(b + 48 + 32 * (g / 2)), 4 * (g % 2)), low);
      const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(shift_right(qh, g), one), 4);
      to_floats(_mm256_or_si256(lo, hi), w);
      scale_sub(w, d * static_cast<float>(sc[g]), dmin * static_cast<float>(mn[g]));
      f(g, w);
    }
  }
};

// Element 128h + 32j + l: nibble j / 2 of low byte 64h + 32 (j % 2) + l, bits 2j..2j+2 of high
// byte 128 + 32h + l, minus 32; scale 8h + 2j for l < 16, the next one after.
struct Q6K {
  static constexpr int kElems = 256, kBytes = 210;
  template <class F>
  static void each(const uint8_t* b, F&& f) {
    const float d = half_at(b + 208);
    const __m256i low = _mm256_set1_epi8(0x0f), two = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {
      const __m256i hbits = load32(b + 128 + 32 * h);
      for (int j = 0; j < 4; ++j) {
        const __m256i lo =
            _mm256_and_si256(shift_right(load32(b + 64 * h + 32 * (j % 2)), 4 * (j / 2)), low);
        const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(shift_right(hbits, 2 * j), two), 4);
        V w[4];
        to_floats(_mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32)), w);
        const int g = 8 * h + 2 * j;
        const V d0 = _mm256_set1_ps(d * static_cast<float>(static_cast<int8_t>(b[192 + g])));
        const V d1 = _mm256_set1_ps(d * static_cast<float>(static_cast<int8_t>(b[193 + g])));
        w[0] = _mm256_mul_ps(d0, w[0]);
        w[1] = _mm256_mul_ps(d0, w[1]);
        w[2] = _mm256_mul_ps(d1, w[2]);
        w[3] = _mm256_mul_ps(d1, w[3]);
        f(4 * h + j, w);
      }
    }
  }
};

template <class B>
void decode_rows(const uint8_t* w, int64_t rb, int64_t n, int64_t in, float* dst) {
  const int64_t nb = in / B::kElems;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < nb; ++i) {
      float* o = dst + r * in + i * B::kElems;
      B::each(w + r * rb + i * B::kBytes, [&](int c, const V* v) {
        for (int k = 0; k < 4; ++k) _mm256_storeu_ps(o + 32 * c + 8 * k, v[k]);
      });
    }
  }
}

inline float hsum(V v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// M rows of x against each row of W; A independent accumulators per x row so that few rows
// still keep the FMA units busy.
template <class B, int M>
void dot_rows(const uint8_t* w, int64_t rb, int64_t n, int64_t in, const float* x, float* y,
              int64_t ldy) {
  constexpr int A = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t nb = in / B::kElems;
  for (int64_t r = 0; r < n; ++r) {
    V acc[M][A];
    for (int i = 0; i < M; ++i)
      for (int a = 0; a < A; ++a) acc[i][a] = _mm256_setzero_ps();
    const uint8_t* row = w + r * rb;
    for (int64_t blk = 0; blk < nb; ++blk) {
      const float* xb = x + blk * B::kElems;
      B::each(row + blk * B::kBytes, [&](int c, const V* v) {
        const float* xc = xb + 32 * c;
        for (int i = 0; i < M; ++i)
          for (int k = 0; k < 4; ++k)
            acc[i][k % A] =
                _mm256_fmadd_ps(v[k], _mm256_loadu_ps(xc + i * in + 8 * k), acc[i][k % A]);
      });
    }
    for (int i = 0; i < M; ++i) {
      V s = acc[i][0];
      for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[i][a]);
      y[i * ldy + r] = hsum(s);
    }
  }
}

template <class B>
void dot_any(const uint8_t* w, int64_t rb, int64_t n, int64_t in, const float* x, int64_t m,
             float* y, int64_t ldy) {
  switch (m) {
    case 1:
      return dot_rows<B, 1>(w, rb, n, in, x, y, ldy);
    case 2:
      return dot_rows<B, 2>(w, rb, n, in, x, y, ldy);
    case 3:
      return dot_rows<B, 3>(w, rb, n, in, x, y, ldy);
    case 4:
      return dot_rows<B, 4>(w, rb, n, in, x, y, ldy);
    case 5:
      return dot_rows<B, 5>(w, rb, n, in, x, y, ldy);
    case 6:
      return dot_rows<B, 6>(w, rb, n, in, x, y, ldy);
    case 7:
      return dot_rows<B, 7>(w, rb, n, in, x, y, ldy);
    default:
      return dot_rows<B, 8>(w, rb, n, in, x, y, ldy);
  }
}

// Calls `f(B{})` with the block type of code `ty` (one of `Code`).
template <class F>
void with_block(int32_t ty, F&& f) {
  switch (ty) {
    case kF32:
      return f(F32{});
    case kQ4_0:
      return f(Q4_0{});
    case kQ4_1:
      return f(Q4_1{});
    case kQ5_0:
      return f(Q5_0{});
    case kQ5_1:
      return f(Q5_1{});
    case kQ8_0:
      return f(Q8_0{});
    case kQ4K:
      return f(Q4K{});
    case kQ5K:
      return f(Q5K{});
    case kQ6K:
      return f(Q6K{});
    default:
      return;
  }
}

}  // namespace

void quant_simd_decode(int32_t ty, const uint8_t* w, int64_t rb, int64_t n, int64_t in,
                       float* dst) {
  with_block(ty, [&](auto b) { decode_rows<decltype(b)>(w, rb, n, in, dst); });
}

void quant_simd_dot(int32_t ty, const uint8_t* w, int64_t rb, int64_t n, int64_t in, const float* x,
                    int64_t m, float* y, int64_t ldy) {
  // More than 8 rows: groups of 8 (the callers pass at most 8).
  for (int64_t i0 = 0; i0 < m; i0 += 8) {
    const int64_t mi = m - i0 < 8 ? m - i0 : 8;
    with_block(ty, [&](auto b) {
      dot_any<decltype(b)>(w, rb, n, in, x + i0 * in, mi, y + i0 * ldy, ldy);
    });
  }
}

#pragma GCC pop_options

bool quant_simd_cpu() {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu;
}

bool quant_simd_supports(int32_t ty) {
  const bool cpu = quant_simd_cpu();
  switch (ty) {
    case kQ4_0:
    case kQ4_1:
    case kQ5_0:
    case kQ5_1:
    case kQ8_0:
    case kQ4K:
    case kQ5K:
    case kQ6K:
      return cpu;
    default:
      return false;
  }
}

#else  // no AVX2 kernels off x86-64 / GCC: the callers decode with Rust's kernels

bool quant_simd_cpu() { return false; }
bool quant_simd_supports(int32_t) { return false; }
void quant_simd_decode(int32_t, const uint8_t*, int64_t, int64_t, int64_t, float*) {}
void quant_simd_dot(int32_t, const uint8_t*, int64_t, int64_t, int64_t, const float*, int64_t,
                    float*, int64_t) {}

#endif

}  // namespace loratch
