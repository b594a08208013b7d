// RMSNorm, `weight * (x * rsqrt(mean(x^2) + eps))` over the last dimension, as one autograd node
// for float32 training on CPU.
//
// Composed from libtorch ops (as transformers writes it) it is five kernels forward and about ten
// backward, saving four activations. Here each is one pass per row, saving x and one reciprocal
// RMS per row. With n = x r, r = rsqrt(mean(x^2) + eps)
// and gn = grad * weight, the input gradient is r gn - x r^3 mean(gn x).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "bridge.h"
#include "vectorize.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows per task of at::parallel_for (a row of SmolLM2 is 576 floats).
constexpr int64_t kRowsPerTask = 16;

// Sums in 8 float lanes (so the loop vectorizes without reassociation), then adds the lanes in
// double: as accurate as libtorch's float reduction, which also sums in lanes.
LORATCH_VECTORIZED double sum_of_squares(const float* __restrict x, int64_t h) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= h; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * x[i + j];
  double total = 0.0;
  for (; i < h; ++i) total += static_cast<double>(x[i]) * x[i];
  for (const float a : acc) total += a;
  return total;
}

// sum(a * b * c), summed as sum_of_squares is.
LORATCH_VECTORIZED double dot(const float* __restrict a, const float* __restrict b,
                              const float* __restrict c, int64_t h) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= h; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j] * c[i + j];
  double total = 0.0;
  for (; i < h; ++i) total += static_cast<double>(a[i] * b[i]) * c[i];
  for (const float v : acc) total += v;
  return total;
}

LORATCH_VECTORIZED void scale_row(const float* __restrict x, const float* __restrict w, float r,
                                  float* __restrict y, int64_t h) {
  for (int64_t i = 0; i < h; ++i) y[i] = w[i] * (x[i] * r);
}

LORATCH_VECTORIZED void grad_row(const float* __restrict x, const float* __restrict w,
                                 const float* __restrict g, float r, float c,
                                 float* __restrict dx, int64_t h) {
  for (int64_t i = 0; i < h; ++i) dx[i] = r * (g[i] * w[i]) - x[i] * c;
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            double eps) {
    TORCH_CHECK(input.dim() >= 1 && weight.dim() == 1 && input.size(-1) == weight.size(0),
                "RMSNorm: input ", input.sizes(), " does not end in the weight's size ",
                weight.sizes());
    TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                "RMSNorm: the fused op takes float32 only");
    TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
                "RMSNorm: the fused op runs on CPU");
    const int64_t h = weight.size(0);
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    const int64_t rows = h == 0 ? 0 : x.numel() / h;
    at::Tensor y = at::empty_like(x);
    at::Tensor rstd = at::empty({rows}, x.options());
    const float* xp = x.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    float* rp = rstd.mutable_data_ptr<float>();
    const float feps = static_cast<float>(eps);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* xr = xp + row * h;
        const float var = static_cast<float>(sum_of_squares(xr, h) / static_cast<double>(h));
        const float r = 1.0f / std::sqrt(var + feps);
        rp[row] = r;
        scale_row(xr, wp, r, yp + row * h, h);
      }
    });
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor& rstd = saved[2];
    const at::Tensor g = grads[0].contiguous();
    const int64_t h = w.size(0), rows = rstd.size(0);
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      dx = at::empty_like(x);
      const float* xp = x.const_data_ptr<float>();
      const float* wp = w.const_data_ptr<float>();
      const float* gp = g.const_data_ptr<float>();
      const float* rp = rstd.const_data_ptr<float>();
      float* dp = dx.mutable_data_ptr<float>();
      at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t off = row * h;
          const float r = rp[row];
          const double s = dot(gp + off, wp, xp + off, h);
          const float c = static_cast<float>(s * r * r * r / static_cast<double>(h));
          grad_row(xp + off, wp, gp + off, r, c, dp + off, h);
        }
      });
    }
    // Norm weights stay frozen under LoRA; this rarer case takes plain ops.
    if (ctx->needs_input_grad(1)) {
      dw = (g.view({rows, h}) * (x.view({rows, h}) * rstd.unsqueeze(1))).sum(0);
    }
    return {dx, dw, at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding the normalised input to `*out`. Returns nullptr, or the error
// message (free it with loratch_free_string).
char* loratch_rms_norm(const void* input, const void* weight, double eps, void** out) {
  return loratch_guard("unknown C++ exception in RMSNorm", [&] {
    const auto tensor = [](const void* p) { return *static_cast<const at::Tensor*>(p); };
    at::Tensor y = RmsNorm::apply(tensor(input), tensor(weight), eps);
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
