// The direct BLAS products of blas.h, a plain product with its rows split over the threads (the
// output head's), and the test hook that sends the products through ATen instead.
#include "blas.h"

#include "bridge.h"

#include <c10/core/GradMode.h>

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

// Writes a new at::Tensor* holding `a @ b` (`a` [m, k], `b` [k, n]) to `*out`. On CPU in float32
// with a row split (blas.h), each thread computes its rows single-threaded; else, with a column
// split, its blocks of columns; otherwise the threads share each product (at::mm). Either way in
// blocks of at most `block_columns` columns (0: all at once; other devices: at once). No autograd.
// Returns nullptr, or the error message (free it with loratch_free_string).
char* loratch_mm_rows(const void* a_in, const void* b_in, int64_t block_columns, void** out) {
  return loratch_guard("unknown C++ exception in a row-split product", [&] {
    const at::Tensor& a = *static_cast<const at::Tensor*>(a_in);
    const at::Tensor& b = *static_cast<const at::Tensor*>(b_in);
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
                "a row-split product needs [m, k] and [k, n] operands, got ", a.sizes(), " and ",
                b.sizes());
    c10::AutoGradMode no_grad(false);
    const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
    const int64_t row_threads = loratch::row_split_threads(a, m);
    const int64_t column_threads =
        row_threads == 0 ? loratch::column_split_threads(a, m, n, block_columns) : 0;
    const bool split = row_threads > 0 || column_threads > 0;
    if (!split || !b.is_cpu() || b.scalar_type() != at::kFloat) {
      if (block_columns <= 0 || n <= block_columns || !a.is_cpu()) {
        *out = new at::Tensor(at::mm(a, b));
        return;
      }
      at::Tensor c = at::empty({m, n}, a.options());
      for (int64_t start = 0; start < n; start += block_columns) {
        const int64_t len = std::min(block_columns, n - start);
        at::Tensor block = c.narrow(1, start, len);
        at::mm_out(block, a, b.narrow(1, start, len));
      }
      *out = new at::Tensor(std::move(c));
      return;
    }
    const at::Tensor ar = loratch::readable(a), br = loratch::readable(b);
    const loratch::Matrix am = loratch::matrix_of(ar), bm = loratch::matrix_of(br);
    at::Tensor c = at::empty({m, n}, a.options());
    float* cp = c.data_ptr<float>();
    // Columns [first, end) of rows [s, s + rows), block by block.
    const auto columns = [&](int64_t s, int64_t rows, int64_t first, int64_t end, int64_t block) {
      for (int64_t start = first; start < end; start += block) {
        const int64_t len = std::min(block, end - start);
        loratch::product(rows, len, k, 1.0f, am.rows_from(s), bm.cols_from(start), 0.0f,
                         cp + s * n + start, n);
      }
    };
    if (row_threads > 0) {
      const int64_t block = block_columns > 0 ? block_columns : std::max<int64_t>(n, 1);
      loratch::per_thread_rows(m, row_threads, [&](int64_t, int64_t s, int64_t rows) {
        columns(s, rows, 0, n, block);
      });
    } else {
      const int64_t block =
          block_columns > 0 ? block_columns : (n + column_threads - 1) / column_threads;
      // The blocks are dealt out as rows are: equal shares of whole blocks.
      loratch::per_thread_rows((n + block - 1) / block, column_threads,
                               [&](int64_t, int64_t first, int64_t count) {
                                 columns(0, m, first * block,
                                         std::min(n, (first + count) * block), block);
                               });
    }
    *out = new at::Tensor(std::move(c));
  });
}

// Test hook: whether the C++ ops' products call BLAS directly (true, the default, where libtorch
// exports sgemm_) or go through ATen. Returns the previous setting.
bool loratch_use_blas(bool on) { return use_blas.exchange(on); }

}  // extern "C"
