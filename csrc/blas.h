// Direct BLAS products over float32 memory for the C++ ops: libtorch_cpu's exported `sgemm_`
// (oneMKL's in PyPI's torch), called on the operands' own pointers and strides, with no ATen
// dispatch per call. Called inside a parallel region (at::parallel_for), oneMKL runs the product
// on the calling thread alone, so the ops can deal their products out to the threads themselves.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <cstdint>

namespace loratch {

// Row-major `C = alpha * op(A) op(B) + beta * C`, op(A) [m, k], op(B) [k, n], C [m, n]; `ta`
// means A is stored [k, m] (likewise `tb`). With beta = 0, C is not read. Without `sgemm_` (or
// with the test hook below off) the product goes through ATen on views of the same memory.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// A 2-D float32 matrix as BLAS reads it: `data` points at element (0, 0), `ld` is the distance
// between rows (`transposed`: between columns, the matrix being stored column by column).
struct Matrix {
  const float* data;
  int64_t ld;
  bool transposed;
  // Rows [start, ...) of the matrix (the same layout).
  Matrix rows_from(int64_t start) const {
    return {data + start * (transposed ? 1 : ld), ld, transposed};
  }
  // Columns [start, ...) of the matrix (the same layout).
  Matrix cols_from(int64_t start) const {
    return {data + start * (transposed ? ld : 1), ld, transposed};
  }
};

// `c = alpha * a b + beta * c` for Matrix operands `a` [m, k], `b` [k, n] and row-major `c`.
inline void product(int64_t m, int64_t n, int64_t k, float alpha, Matrix a, Matrix b, float beta,
                    float* c, int64_t ldc) {
  gemm(a.transposed, b.transposed, m, n, k, alpha, a.data, a.ld, b.data, b.ld, beta, c, ldc);
}

// Whether BLAS can read the 2-D tensor `x` in place: unit stride along one dimension and the
// other at least that dimension's length apart (a length-1 dimension's stride does not count).
bool blas_readable(const at::Tensor& x);

// `x` (2-D, float32, BLAS-readable: see `blas_readable`) as a Matrix.
Matrix matrix_of(const at::Tensor& x);

// A 2-D tensor BLAS can read: `x` itself, or a contiguous copy.
inline at::Tensor readable(const at::Tensor& x) { return blas_readable(x) ? x : x.contiguous(); }

// Row splits: instead of letting oneMKL split each product over the threads, an op deals its rows
// out to them and each thread runs its rows' products single-threaded. On this project's 2-core
// machines that keeps a thread on the activations it wrote itself (the fused elementwise ops split
// rows the same way), and it avoids the machine's slow phases, in which two threads sharing one
// product run slower (BENCHMARKS.md, "Figures moved out of code comments").
// At least this many rows per thread, and at most this many threads (more keep oneMKL's own
// split, unmeasured here: each thread would pack the whole weight).
constexpr int64_t kMinRowsPerThread = 64;
constexpr int64_t kMaxSplitThreads = 4;

// The threads to deal the `m` rows of a product over CPU float32 `x` out to, or 0 to leave the
// product to oneMKL's own split.
inline int64_t row_split_threads(const at::Tensor& x, int64_t m) {
  const int64_t threads = at::get_num_threads();
  const bool fits = threads >= 2 && threads <= kMaxSplitThreads && m >= threads * kMinRowsPerThread;
  return x.is_cpu() && x.scalar_type() == at::kFloat && fits ? threads : 0;
}

// Column splits: a product with too few rows for a row split but many columns (the output head's
// row chunks of a large vocabulary: 64 rows of 262144 logits) deals whole blocks of its columns out
// to the threads instead, each thread running its blocks' products single-threaded over all rows.
// Left to oneMKL, each small block's product would be shared by the threads, one fork and join per
// block. The threads for the `n` columns, in blocks of `block` (0: one block per thread), of a
// product over CPU float32 `x` with `m` rows, or 0 when a row split fits (or nothing does): at
// least one block and kMinRowsPerThread columns per thread.
inline int64_t column_split_threads(const at::Tensor& x, int64_t m, int64_t n, int64_t block) {
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = block > 0 ? (n + block - 1) / block : threads;
  const bool fits = threads >= 2 && threads <= kMaxSplitThreads && m > 0 &&
                    n >= threads * kMinRowsPerThread && blocks >= threads;
  return x.is_cpu() && x.scalar_type() == at::kFloat && fits && row_split_threads(x, m) == 0
             ? threads
             : 0;
}

// Runs `body(thread, first_row, rows)` for each of `threads` equal shares of `m` rows, in
// parallel; with m >= threads * kMinRowsPerThread every thread has rows. The shares match the
// halves at::parallel_for gives the fused ops' row loops on 2 threads.
template <typename Body>
void per_thread_rows(int64_t m, int64_t threads, const Body& body) {
  const int64_t share = (m + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t start = t * share, len = std::min(share, m - start);
      if (len > 0) body(t, start, len);
    }
  });
}

}  // namespace loratch
