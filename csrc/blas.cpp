// The direct BLAS products of blas.h, and the test hook that sends them through ATen instead.
#include "blas.h"

#include <atomic>

// The Fortran BLAS sgemm that libtorch_cpu exports. Weak, so the library still loads against a
// libtorch without it; `gemm` then falls back to ATen.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace {

// Whether `gemm` calls sgemm_ when libtorch has it (the tests also run the ATen fallback).
std::atomic<bool> use_blas{true};

}  // namespace

namespace loratch {

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr && use_blas.load(std::memory_order_relaxed)) {
    // Column-major BLAS computes C^T = op(B)^T op(A)^T over the same memory.
    const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&opb, &opa, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const auto matrix = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    const at::Tensor x = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(out, out, matrix(a, ta ? k : m, ta ? m : k, lda, ta),
                matrix(b, tb ? n : k, tb ? k : n, ldb, tb), beta, alpha);
}

bool blas_readable(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const bool row_major = (cols <= 1 || x.stride(1) == 1) && (rows <= 1 || x.stride(0) >= cols);
  const bool col_major = (rows <= 1 || x.stride(0) == 1) && (cols <= 1 || x.stride(1) >= rows);
  return row_major || col_major;
}

Matrix matrix_of(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* data = x.data_ptr<float>();
  if ((cols <= 1 || x.stride(1) == 1) && (rows <= 1 || x.stride(0) >= cols)) {
    return {data, rows <= 1 ? std::max<int64_t>(cols, 1) : x.stride(0), false};
  }
  return {data, cols <= 1 ? std::max<int64_t>(rows, 1) : x.stride(1), true};
}

}  // namespace loratch

extern "C" {

// Test hook: whether the C++ ops' products call BLAS directly (true, the default, where libtorch
// exports sgemm_) or go through ATen. Returns the previous setting.
bool loratch_use_blas(bool on) { return use_blas.exchange(on); }

}  // extern "C"
