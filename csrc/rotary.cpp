// Rotary position embedding ("rotate half", as transformers applies it) fused with the move of
// the heads in front of the positions, as one autograd node for float32 training on CPU:
// x `[B, T, H, D]` (a projection's output, viewed per head) to `x * cos + rotate_half(x) * sin`
// laid out `[B, H, T, D]`, which the attention reads without another copy.
//
// Composed from libtorch ops it is five kernels forward (neg, cat, two muls, add) and as many
// backward, plus a copy into the attention's layout. The forward here rounds as those ops do
// (each product, then the sum), so it gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "bridge.h"
#include "vectorize.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (batch, position) rows per task of at::parallel_for.
constexpr int64_t kPositionsPerTask = 8;

// One head at one position: y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
LORATCH_VECTORIZED void rotate_row(const float* __restrict x, const float* __restrict cos,
                                   const float* __restrict sin, float* __restrict y,
                                   int64_t half) {
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * cos[i] + -x[i + half] * sin[i];
  for (int64_t i = half; i < 2 * half; ++i) y[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// Its transpose: dx = dy * cos + (dy[i + half] * sin[i + half] | -dy[i - half] * sin[i - half]).
LORATCH_VECTORIZED void unrotate_row(const float* __restrict dy, const float* __restrict cos,
                                     const float* __restrict sin, float* __restrict dx,
                                     int64_t half) {
  for (int64_t i = 0; i < half; ++i) dx[i] = dy[i] * cos[i] + dy[i + half] * sin[i + half];
  for (int64_t i = half; i < 2 * half; ++i) dx[i] = dy[i] * cos[i] - dy[i - half] * sin[i - half];
}

// Calls `row_fn(head_major, position_major, table)` for every (batch, position, head), in
// parallel over (batch, position): the offsets of one head's row in `[B, H, T, D]` and in
// `[B, T, H, D]`, and of its position's row in the `[Bc, T, D]` tables. The forward reads the
// second layout and writes the first; the backward the other way round.
template <typename RowFn>
void for_each_head_row(int64_t b, int64_t t, int64_t h, int64_t d, int64_t table_batch,
                       const RowFn& row_fn) {
  at::parallel_for(0, b * t, kPositionsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / t, ti = row % t;
      const int64_t tab = bi * table_batch + ti * d;
      for (int64_t hi = 0; hi < h; ++hi) {
        row_fn(((bi * h + hi) * t + ti) * d, (row * h + hi) * d, tab);
      }
    }
  });
}

// cos and sin as [Bc, T, D] contiguous float32, Bc 1 or B; they carry no gradient.
at::Tensor table(const at::Tensor& t, int64_t b, int64_t len, int64_t d, const char* name) {
  TORCH_CHECK(t.dim() == 4 && (t.size(0) == 1 || t.size(0) == b) && t.size(1) == 1 &&
                  t.size(2) == len && t.size(3) == d,
              "rotary: ", name, " must be [1 or B, 1, T, D] = [1 or ", b, ", 1, ", len, ", ", d,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "rotary: the fused op takes float32 CPU tables");
  return t.reshape({t.size(0), len, d}).contiguous();
}

struct Rotary : public torch::autograd::Function<Rotary> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& cos_in,
                            const at::Tensor& sin_in) {
    TORCH_CHECK(input.dim() == 4, "rotary: x must be [B, T, heads, head_dim], got ", input.sizes());
    TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu(),
                "rotary: the fused op takes float32 CPU input");
    const int64_t b = input.size(0), t = input.size(1), h = input.size(2), d = input.size(3);
    TORCH_CHECK(d % 2 == 0, "rotary: head_dim must be even, got ", d);
    const at::Tensor x = input.contiguous();
    const at::Tensor cos = table(cos_in, b, t, d, "cos"), sin = table(sin_in, b, t, d, "sin");
    at::Tensor y = at::empty({b, h, t, d}, x.options());
    const float* xp = x.const_data_ptr<float>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    const int64_t table_batch = cos.size(0) == 1 ? 0 : t * d;
    for_each_head_row(b, t, h, d, table_batch, [&](int64_t y_row, int64_t x_row, int64_t tab) {
      rotate_row(xp + x_row, cp + tab, sp + tab, yp + y_row, d / 2);
    });
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["heads"] = h;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& cos = saved[0];
    const at::Tensor& sin = saved[1];
    const int64_t h = ctx->saved_data["heads"].toInt();
    const at::Tensor g = grads[0].contiguous();
    const int64_t b = g.size(0), t = g.size(2), d = g.size(3);
    at::Tensor dx = at::empty({b, t, h, d}, g.options());
    const float* gp = g.const_data_ptr<float>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    float* dp = dx.mutable_data_ptr<float>();
    const int64_t table_batch = cos.size(0) == 1 ? 0 : t * d;
    for_each_head_row(b, t, h, d, table_batch, [&](int64_t g_row, int64_t dx_row, int64_t tab) {
      unrotate_row(gp + g_row, cp + tab, sp + tab, dp + dx_row, d / 2);
    });
    return {dx, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding the rotated heads `[B, H, T, D]` to `*out`. Returns nullptr, or
// the error message (free it with loratch_free_string).
char* loratch_rotary(const void* x, const void* cos, const void* sin, void** out) {
  return loratch_guard("unknown C++ exception in the rotary embedding", [&] {
    const auto tensor = [](const void* p) { return *static_cast<const at::Tensor*>(p); };
    at::Tensor y = Rotary::apply(tensor(x), tensor(cos), tensor(sin));
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
