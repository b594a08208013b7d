// The training loss's softmax cross-entropy over one chunk of float32 logits on CPU, in place:
// per row, the token loss `-log_softmax(x)[target]` and, when asked, the gradient of
// `scale * sum(losses)` with respect to the row, `scale * (softmax(x) - onehot(target))`, written
// over the logits (which the caller then multiplies into the head's weight).
//
// Composed from libtorch ops (log_softmax in place, gather, exp_, scatter_add_, mul_) that is five
// kernels and four passes over a `[rows, vocab]` buffer of up to 64 MiB. Here each row takes three
// passes (max; sum of e^(x - max); the gradient), while it is still in the core's cache. The values
// are computed as those ops compute them: log_softmax = (x - max) - log(sum e^(x - max)), with the
// e^x libtorch uses on AVX2 CPUs (std::exp on others), so they agree to float rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "bridge.h"
#include "vectorize.h"

namespace {

// Rows per task of at::parallel_for (a row of SmolLM2's logits is 49152 floats).
constexpr int64_t kRowsPerTask = 1;

float row_max_scalar(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

float row_sum_exp_scalar(const float* x, int64_t n, float max) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - max);
  return sum;
}

void row_grad_scalar(float* x, int64_t n, float max, float log_sum, float scale) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp((x[i] - max) - log_sum) * scale;
}

#ifdef LORATCH_SLEEF_AVX2
// 8 lanes at a time, the tail by the scalar loops.
LORATCH_AVX2 float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  return std::max(*std::max_element(lanes, lanes + 8), row_max_scalar(x + i, n - i));
}

LORATCH_AVX2 float row_sum_exp_avx2(const float* x, int64_t n, float max) {
  const __m256 m = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_add_ps(acc, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), m)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = row_sum_exp_scalar(x + i, n - i, max);
  for (const float l : lanes) sum += l;
  return sum;
}

LORATCH_AVX2 void row_grad_avx2(float* x, int64_t n, float max, float log_sum, float scale) {
  const __m256 m = _mm256_set1_ps(max), ls = _mm256_set1_ps(log_sum), s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 logp = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), ls);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(Sleef_expf8_u10avx2(logp), s));
  }
  row_grad_scalar(x + i, n - i, max, log_sum, scale);
}
#else
// Never called: loratch_has_avx2() is false off x86-64.
float row_max_avx2(const float*, int64_t) { return 0.0f; }
float row_sum_exp_avx2(const float*, int64_t, float) { return 0.0f; }
void row_grad_avx2(float*, int64_t, float, float, float) {}
#endif

// One row: returns its loss; with `grad`, overwrites it with scale * (softmax - onehot).
float row(float* x, int64_t n, int64_t target, bool grad, float scale) {
  const bool avx2 = loratch_has_avx2();
  const float max = avx2 ? row_max_avx2(x, n) : row_max_scalar(x, n);
  const float sum = avx2 ? row_sum_exp_avx2(x, n, max) : row_sum_exp_scalar(x, n, max);
  const float log_sum = std::log(sum);
  const float logp_target = (x[target] - max) - log_sum;
  if (grad) {
    if (avx2) {
      row_grad_avx2(x, n, max, log_sum, scale);
    } else {
      row_grad_scalar(x, n, max, log_sum, scale);
    }
    x[target] = (std::exp(logp_target) - 1.0f) * scale;
  }
  return -logp_target;
}

}  // namespace

extern "C" {

// `logits` [rows, vocab] float32 contiguous CPU, `targets` [rows] int64 in [0, vocab). Writes a new
// at::Tensor* holding the float32 losses [rows] to `*losses`; with `grad`, the logits now hold
// `scale * (softmax - onehot)`. Returns nullptr, or the error message (free it with
// loratch_free_string); on error the logits are unchanged.
char* loratch_cross_entropy(void* logits, const void* targets, double scale, bool grad,
                            void** losses) {
  return loratch_guard("unknown C++ exception in the cross-entropy", [&] {
    at::Tensor& x = *static_cast<at::Tensor*>(logits);
    const at::Tensor& t = *static_cast<const at::Tensor*>(targets);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                    x.is_contiguous(),
                "cross-entropy: logits must be [rows, vocab] float32, contiguous, on CPU; got ",
                x.sizes(), " ", x.scalar_type(), " on ", x.device());
    const int64_t rows = x.size(0), vocab = x.size(1);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == at::kLong &&
                    t.device().is_cpu(),
                "cross-entropy: targets must be int64 [", rows, "] on CPU, got ", t.sizes(), " ",
                t.scalar_type());
    const at::Tensor tc = t.contiguous();
    const int64_t* tp = tc.const_data_ptr<int64_t>();
    TORCH_CHECK(vocab > 0 || rows == 0, "cross-entropy: empty vocabulary");
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(tp[r] >= 0 && tp[r] < vocab, "cross-entropy: target ", tp[r], " of row ", r,
                  " is outside [0, ", vocab, ")");
    }
    at::Tensor out = at::empty({rows}, x.options());
    float* xp = x.mutable_data_ptr<float>();
    float* lp = out.mutable_data_ptr<float>();
    const auto s = static_cast<float>(scale);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) lp[r] = row(xp + r * vocab, vocab, tp[r], grad, s);
    });
    *losses = new at::Tensor(std::move(out));
  });
}

}  // extern "C"
