// Causal (grouped-query) attention for short sequences on CPU, as one autograd node:
// `softmax(q k^T * scale + causal mask) v`, with q `[B, H, T, D]` and k, v `[B, KV, T, D]`, query
// head h reading key/value head h / (H / KV) (transformers' `repeat_kv`).
//
// libtorch's CPU flash attention splits keys in blocks of 512, so for T <= 512 every query block
// multiplies with every key and the causal mask only hides the products afterwards; its backward
// also recomputes the scores. Here each head's queries go in blocks of `block` positions and block
// j multiplies only with keys [0, end of block j): for T = 256 and blocks of 64 that is 10/16 of
// the products. The (head, block) products are small (64 x 64 x 256 for SmolLM2), too small for
// oneMKL to split well over threads, and unequal in size; so each runs whole on one thread, and
// the tasks are dealt out to the threads by cost.
//
// Every operand is addressed in place through its strides (one whose rows BLAS cannot read is
// copied first), and the products are direct BLAS calls on those pointers: no copies, views or ATen
// calls per task. The masked softmax and its backward are one pass per row over the keys the row
// may see. The output is laid out `[B, T, H, D]` in memory (returned as a `[B, H, T, D]` tensor),
// so the model's move back to `[B, T, H * D]` is a view. The backward reuses the saved
// probabilities (`[B * H, T, T]`, of which the causal blocks are filled: 2.25 MiB per layer for 9 x
// 256 x 256) instead of recomputing them, and gathers dk and dv per key block with one product per
// head over all later queries, so no two threads write the same rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "blas.h"
#include "bridge.h"
#include "vectorize.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using loratch::gemm;

// A `[B, heads, T, D]` float32 tensor that BLAS can read (see `blas_ready`), addressed per
// (batch, head, position) row. A length-1 dimension may have any stride, so a single row's
// stride is taken as D.
struct Rows {
  float* data;
  int64_t sb, sh, st;
  float* row(int64_t bi, int64_t hi, int64_t pos) const {
    return data + bi * sb + hi * sh + pos * st;
  }
};

Rows rows_of(const at::Tensor& x) {
  const int64_t st = x.size(2) <= 1 ? x.size(3) : x.stride(2);
  return {x.data_ptr<float>(), x.stride(0), x.stride(1), st};
}

// The tensor itself when each (batch, head) is a row-major `[T, D]` matrix BLAS can read (unit
// stride along D, rows at least D apart), else a contiguous copy.
at::Tensor blas_ready(const at::Tensor& x) {
  const bool unit = x.size(3) <= 1 || x.stride(3) == 1;
  const bool rows = x.size(2) <= 1 || x.stride(2) >= x.size(3);
  return unit && rows ? x : x.contiguous();
}

// Probabilities of one query row in place: `s[0, n)` are its scaled scores over the keys it may
// see, `s[n, end)` become 0 (the keys it may not).
void softmax_row_scalar(float* s, int64_t n, int64_t end) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - m));
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
  std::fill(s + n, s + end, 0.0f);
}

// The score gradient of one row in place over `dp` (the gradient of its probabilities `p`):
// `scale * p * (dp - sum(dp * p))`, 0 past the visible keys.
void softmax_backward_row_scalar(float* dp, const float* p, int64_t n, int64_t end, float scale) {
  float dot = 0.0f;
  for (int64_t i = 0; i < n; ++i) dot += dp[i] * p[i];
  for (int64_t i = 0; i < n; ++i) dp[i] = scale * p[i] * (dp[i] - dot);
  std::fill(dp + n, dp + end, 0.0f);
}

#ifdef LORATCH_SLEEF_AVX2
LORATCH_AVX2 float hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float sum = 0.0f;
  for (const float l : lanes) sum += l;
  return sum;
}

LORATCH_AVX2 void softmax_row_avx2(float* s, int64_t n, int64_t end) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float m = *std::max_element(lanes, lanes + 8);
  for (int64_t j = i; j < n; ++j) m = std::max(m, s[j]);
  const __m256 mb = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i), mb));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (int64_t j = i; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  const float inv = 1.0f / sum;
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), iv));
  for (int64_t j = i; j < n; ++j) s[j] *= inv;
  std::fill(s + n, s + end, 0.0f);
}

LORATCH_AVX2 void softmax_backward_row_avx2(float* dp, const float* p, int64_t n, int64_t end,
                                            float scale) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(dp + i), _mm256_loadu_ps(p + i), acc);
  float dot = hsum(acc);
  for (int64_t j = i; j < n; ++j) dot += dp[j] * p[j];
  const __m256 dv = _mm256_set1_ps(dot), sv = _mm256_set1_ps(scale);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), sv);
    _mm256_storeu_ps(dp + i, _mm256_mul_ps(pi, _mm256_sub_ps(_mm256_loadu_ps(dp + i), dv)));
  }
  for (int64_t j = i; j < n; ++j) dp[j] = scale * p[j] * (dp[j] - dot);
  std::fill(dp + n, dp + end, 0.0f);
}
#else
// Never called: loratch_has_avx2() is false off x86-64.
void softmax_row_avx2(float*, int64_t, int64_t) {}
void softmax_backward_row_avx2(float*, const float*, int64_t, int64_t, float) {}
#endif

void softmax_row(float* s, int64_t n, int64_t end) {
  if (loratch_has_avx2()) {
    softmax_row_avx2(s, n, end);
  } else {
    softmax_row_scalar(s, n, end);
  }
}

void softmax_backward_row(float* dp, const float* p, int64_t n, int64_t end, float scale) {
  if (loratch_has_avx2()) {
    softmax_backward_row_avx2(dp, p, n, end, scale);
  } else {
    softmax_backward_row_scalar(dp, p, n, end, scale);
  }
}

// One unit of work: a (batch, head) or (batch, kv head) `group`, and a query or key block. Its
// cost grows with the products it runs.
struct Task {
  int64_t group, block, cost;
};

// Runs `body(task)` for every task, in parallel over the intra-op threads. The tasks differ in
// cost (a causal query block j reads j + 1 key blocks), so they are dealt out to the threads
// beforehand, largest first, each to the least loaded thread, rather than split as one range.
// Inside, each task runs on one thread (BLAS called inside a parallel region does not fork again).
template <typename Body>
void run_tasks(std::vector<Task> tasks, const Body& body) {
  const auto n = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::sort(tasks.begin(), tasks.end(),
            [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::vector<std::vector<Task>> per_thread(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Task& task : tasks) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    per_thread[least].push_back(task);
    load[least] += task.cost;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's grad mode (the ATen fallback of `gemm`).
    at::NoGradGuard no_grad;
    for (int64_t i = begin; i < end; ++i) {
      for (const Task& task : per_thread[i]) body(task);
    }
  });
}

struct CausalAttention : public torch::autograd::Function<CausalAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                            const at::Tensor& v_in, double scale, int64_t block) {
    TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
                "causal attention: q, k and v must be [B, heads, T, head_dim]");
    TORCH_CHECK(k_in.sizes() == v_in.sizes(), "causal attention: k and v differ in shape");
    for (const at::Tensor* x : {&q_in, &k_in, &v_in}) {
      TORCH_CHECK(x->scalar_type() == at::kFloat && x->device().is_cpu(),
                  "causal attention: q, k and v must be float32 CPU tensors");
    }
    const int64_t b = q_in.size(0), h = q_in.size(1), t = q_in.size(2), d = q_in.size(3);
    const int64_t kv = k_in.size(1);
    TORCH_CHECK(k_in.size(0) == b && k_in.size(2) == t && k_in.size(3) == d,
                "causal attention: k and v must be [B, kv_heads, T, head_dim] like q");
    TORCH_CHECK(kv > 0 && h % kv == 0, "causal attention: heads must be a multiple of kv_heads");
    TORCH_CHECK(block > 0, "causal attention: block must be positive");
    TORCH_CHECK(d > 0, "causal attention: head_dim must be positive");
    const at::Tensor q = blas_ready(q_in.detach()), k = blas_ready(k_in.detach());
    const at::Tensor v = blas_ready(v_in.detach());
    const int64_t r = h / kv, blocks = (t + block - 1) / block;
    at::Tensor p = at::empty({b * h, t, t}, q.options());
    at::Tensor out = at::empty_strided({b, h, t, d}, {t * h * d, d, h * d, 1}, q.options());
    const Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), orow = rows_of(out);
    float* const pp = p.data_ptr<float>();
    std::vector<Task> tasks;
    for (int64_t bh = 0; bh < b * h; ++bh)
      for (int64_t j = 0; j < blocks; ++j) tasks.push_back({bh, j, std::min(t, (j + 1) * block)});
    run_tasks(tasks, [&](const Task& task) {
      const int64_t bi = task.group / h, hi = task.group % h, kh = hi / r;
      const int64_t start = task.block * block, len = std::min(block, t - start);
      const int64_t end = start + len;
      float* s = pp + task.group * t * t + start * t;  // rows [start, end), keys [0, end)
      gemm(false, true, len, end, d, static_cast<float>(scale), qr.row(bi, hi, start), qr.st,
           kr.row(bi, kh, 0), kr.st, 0.0f, s, t);
      // Query start + i sees keys [0, start + i].
      for (int64_t i = 0; i < len; ++i) softmax_row(s + i * t, start + i + 1, end);
      gemm(false, false, len, d, end, 1.0f, s, t, vr.row(bi, kh, 0), vr.st, 0.0f,
           orow.row(bi, hi, start), orow.st);
    });
    ctx->save_for_backward({q, k, v, p});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["block"] = block;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &p = saved[3];
    const auto scale = static_cast<float>(ctx->saved_data["scale"].toDouble());
    const int64_t block = ctx->saved_data["block"].toInt();
    const int64_t b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3);
    const int64_t kv = k.size(1), r = h / kv, blocks = (t + block - 1) / block;
    const at::Tensor go = blas_ready(grads[0]);
    at::Tensor ds = at::empty({b * h, t, t}, q.options());
    // Laid out like the inputs, so each gradient flows back in its input's layout.
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    const Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), gr = rows_of(go);
    const Rows dqr = rows_of(dq), dkr = rows_of(dk), dvr = rows_of(dv);
    const float* const pp = p.data_ptr<float>();
    float* const dsp = ds.data_ptr<float>();
    std::vector<Task> by_query, by_key;
    for (int64_t bh = 0; bh < b * h; ++bh)
      for (int64_t j = 0; j < blocks; ++j)
        by_query.push_back({bh, j, std::min(t, (j + 1) * block)});
    for (int64_t g = 0; g < b * kv; ++g)
      for (int64_t i = 0; i < blocks; ++i) by_key.push_back({g, i, t - i * block});
    // Query blocks: the score gradients (scale included, which dq and dk both carry) and dq.
    run_tasks(by_query, [&](const Task& task) {
      const int64_t bi = task.group / h, hi = task.group % h, kh = hi / r;
      const int64_t start = task.block * block, len = std::min(block, t - start);
      const int64_t end = start + len;
      const int64_t off = task.group * t * t + start * t;
      float* s = dsp + off;
      gemm(false, true, len, end, d, 1.0f, gr.row(bi, hi, start), gr.st, vr.row(bi, kh, 0), vr.st,
           0.0f, s, t);
      for (int64_t i = 0; i < len; ++i)
        softmax_backward_row(s + i * t, pp + off + i * t, start + i + 1, end, scale);
      gemm(false, false, len, d, end, 1.0f, s, t, kr.row(bi, kh, 0), kr.st, 0.0f,
           dqr.row(bi, hi, start), dqr.st);
    });
    // Key blocks: dk and dv of keys [i * block, ...) gather from all later queries of the heads
    // that read them (their probabilities and score gradients are 0 where the mask hid a key).
    run_tasks(by_key, [&](const Task& task) {
      const int64_t bi = task.group / kv, kh = task.group % kv;
      const int64_t kstart = task.block * block, klen = std::min(block, t - kstart);
      const int64_t later = t - kstart;
      for (int64_t ri = 0; ri < r; ++ri) {
        const int64_t hi = kh * r + ri;
        const int64_t off = (bi * h + hi) * t * t + kstart * t + kstart;
        const float beta = ri == 0 ? 0.0f : 1.0f;
        gemm(true, false, klen, d, later, 1.0f, dsp + off, t, qr.row(bi, hi, kstart), qr.st, beta,
             dkr.row(bi, kh, kstart), dkr.st);
        gemm(true, false, klen, d, later, 1.0f, pp + off, t, gr.row(bi, hi, kstart), gr.st, beta,
             dvr.row(bi, kh, kstart), dvr.st);
      }
    });
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding the attention output `[B, H, T, D]` to `*out`. Returns nullptr,
// or the error message (free it with loratch_free_string).
char* loratch_causal_attention(const void* q, const void* k, const void* v, double scale,
                               int64_t block, void** out) {
  return loratch_guard("unknown C++ exception in the causal attention", [&] {
    const auto tensor = [](const void* p) { return *static_cast<const at::Tensor*>(p); };
    at::Tensor y = CausalAttention::apply(tensor(q), tensor(k), tensor(v), scale, block);
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
