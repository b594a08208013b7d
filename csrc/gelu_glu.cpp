// GeGLU with the tanh approximation, `gelu_tanh(gate) * up` (Gemma's MLP), as one autograd node
// for float32 training on CPU: the sibling of swiglu.cpp.
//
// Composed from libtorch ops it is five kernels (gelu, mul; two muls and gelu_backward in the
// backward) and it saves three [tokens, intermediate] tensors (gate, gelu(gate), up). Here the
// forward and the backward are one pass each over the inputs and only gate and up are saved (the
// tanh is recomputed). gelu_tanh(g) = g/2 (1 + t), t = tanh(b (g + k g^3)), b = sqrt(2/pi),
// k = 0.044715, and its derivative (1 + t)/2 + g/2 (1 - t^2) b (1 + 3 k g^2), in the order
// libtorch's CPU kernels write them, with the AVX2 tanh (1-ulp) libtorch exports (std::tanh on
// other CPUs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "bridge.h"
#include "vectorize.h"

#ifdef LORATCH_SLEEF_AVX2
extern "C" __m256 Sleef_tanhf8_u10avx2(__m256);
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// As swiglu.cpp's: one layer's [256, 2048] splits over 2 threads, scheduling stays cheap.
constexpr int64_t kElementsPerTask = 16384;

// sqrt(2 / pi) and the cubic term's coefficient, as libtorch's `gelu(approximate="tanh")`.
constexpr float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
constexpr float kKappa = 0.044715f;

// One range of elements, scalar: any CPU.
void forward_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float t = std::tanh(kBeta * (g + kKappa * (g * g * g)));
    out[i] = 0.5f * g * (1.0f + t) * up[i];
  }
}

void backward_scalar(const float* gate, const float* up, const float* grad, float* d_gate,
                     float* d_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], g2 = g * g;
    const float t = std::tanh(kBeta * (g + kKappa * (g2 * g)));
    const float left = 0.5f * g, right = 1.0f + t;
    d_up[i] = grad[i] * (left * right);
    const float slope = 0.5f * right + left * (1.0f - t * t) * kBeta * (1.0f + 3.0f * kKappa * g2);
    d_gate[i] = grad[i] * up[i] * slope;
  }
}

#ifdef LORATCH_SLEEF_AVX2
// tanh(b (g + k g^3)) of 8 gates, and g^2 for the derivative.
LORATCH_AVX2 inline __m256 tanh_inner(__m256 g, __m256 g2) {
  const __m256 cube = _mm256_mul_ps(g2, g);
  const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(kBeta),
                                     _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(kKappa), cube)));
  return Sleef_tanhf8_u10avx2(inner);
}

// 8 elements at a time, the tail by the scalar loop.
LORATCH_AVX2 void forward_avx2(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 t = tanh_inner(g, _mm256_mul_ps(g, g));
    const __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, t));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
  }
  forward_scalar(gate + i, up + i, out + i, n - i);
}

LORATCH_AVX2 void backward_avx2(const float* gate, const float* up, const float* grad,
                                float* d_gate, float* d_up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 beta = _mm256_set1_ps(kBeta), three_kappa = _mm256_set1_ps(3.0f * kKappa);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 go = _mm256_loadu_ps(grad + i);
    const __m256 g2 = _mm256_mul_ps(g, g);
    const __m256 t = tanh_inner(g, g2);
    const __m256 left = _mm256_mul_ps(half, g), right = _mm256_add_ps(one, t);
    _mm256_storeu_ps(d_up + i, _mm256_mul_ps(go, _mm256_mul_ps(left, right)));
    const __m256 sech2 = _mm256_sub_ps(one, _mm256_mul_ps(t, t));
    const __m256 inner_slope = _mm256_add_ps(one, _mm256_mul_ps(three_kappa, g2));
    const __m256 slope = _mm256_add_ps(
        _mm256_mul_ps(half, right),
        _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(left, sech2), beta), inner_slope));
    _mm256_storeu_ps(d_gate + i,
                     _mm256_mul_ps(_mm256_mul_ps(go, _mm256_loadu_ps(up + i)), slope));
  }
  backward_scalar(gate + i, up + i, grad + i, d_gate + i, d_up + i, n - i);
}

#else
// Never called: loratch_has_avx2() is false off x86-64.
void forward_avx2(const float*, const float*, float*, int64_t) {}
void backward_avx2(const float*, const float*, const float*, float*, float*, int64_t) {}
#endif

void forward_kernel(const float* gate, const float* up, float* out, int64_t n) {
  if (loratch_has_avx2()) return forward_avx2(gate, up, out, n);
  forward_scalar(gate, up, out, n);
}

void backward_kernel(const float* gate, const float* up, const float* grad, float* d_gate,
                     float* d_up, int64_t n) {
  if (loratch_has_avx2()) return backward_avx2(gate, up, grad, d_gate, d_up, n);
  backward_scalar(gate, up, grad, d_gate, d_up, n);
}

struct GeluGlu : public torch::autograd::Function<GeluGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    TORCH_CHECK(gate.sizes() == up.sizes(), "GeGLU: gate ", gate.sizes(), " and up ", up.sizes(),
                " differ in shape");
    TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat,
                "GeGLU: the fused op takes float32 only");
    TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "GeGLU: the fused op runs on CPU");
    const at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor out = at::empty_like(g);
    const float* gp = g.const_data_ptr<float>();
    const float* up_ = u.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    at::parallel_for(0, g.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
      forward_kernel(gp + begin, up_ + begin, op + begin, end - begin);
    });
    ctx->save_for_backward({g, u});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& g = saved[0];
    const at::Tensor& u = saved[1];
    const at::Tensor go = grads[0].contiguous();
    at::Tensor d_gate = at::empty_like(g), d_up = at::empty_like(u);
    const float* gp = g.const_data_ptr<float>();
    const float* up_ = u.const_data_ptr<float>();
    const float* gop = go.const_data_ptr<float>();
    float* dgp = d_gate.mutable_data_ptr<float>();
    float* dup = d_up.mutable_data_ptr<float>();
    at::parallel_for(0, g.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
      backward_kernel(gp + begin, up_ + begin, gop + begin, dgp + begin, dup + begin, end - begin);
    });
    return {d_gate, d_up};
  }
};

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding `gelu(gate, approximate="tanh") * up` to `*out`. Returns
// nullptr, or the error message (free it with loratch_free_string).
char* loratch_gelu_tanh_glu(const void* gate, const void* up, void** out) {
  return loratch_guard("unknown C++ exception in GeGLU", [&] {
    const auto tensor = [](const void* p) { return *static_cast<const at::Tensor*>(p); };
    at::Tensor y = GeluGlu::apply(tensor(gate), tensor(up));
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
