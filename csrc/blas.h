// Direct BLAS products over float32 memory for the C++ ops: libtorch_cpu's exported `sgemm_`
// (oneMKL's in PyPI's torch), called on the operands' own pointers and strides, with no ATen
// dispatch per call. Called inside a parallel region (at::parallel_for), oneMKL runs the product
// on the calling thread alone, so the ops can deal their products out to the threads themselves.
#pragma once

#include <ATen/ATen.h>

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
};

// Whether BLAS can read the 2-D tensor `x` in place: unit stride along one dimension and the
// other at least that dimension's length apart (a length-1 dimension's stride does not count).
bool blas_readable(const at::Tensor& x);

// `x` (2-D, float32, BLAS-readable: see `blas_readable`) as a Matrix.
Matrix matrix_of(const at::Tensor& x);

}  // namespace loratch
