// SwiGLU's product `silu(gate) * up` as one autograd node, for float32 training on CPU.
//
// Composed from libtorch ops it is five kernels (silu, mul; two muls and silu_backward in the
// backward) and it saves three [tokens, intermediate] tensors (gate, silu(gate), up). Here the
// forward and the backward are one pass each over the inputs and only gate and up are saved
// (the sigmoid is recomputed). silu(g) = g / (1 + e^-g) and its derivative
// s (1 + g (1 - s)), s = sigmoid(g), as torch writes them, with the e^x libtorch uses on AVX2
// CPUs (std::exp on others).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "bridge.h"
#include "vectorize.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Elements per task of at::parallel_for: small enough to split one layer's [256, 1536] over 2
// threads, large enough that scheduling stays cheap.
constexpr int64_t kElementsPerTask = 16384;

// One range of elements, scalar: any CPU.
void forward_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void backward_scalar(const float* gate, const float* up, const float* grad, float* d_gate,
                     float* d_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + std::exp(-g));
    d_up[i] = grad[i] * (g * s);
    d_gate[i] = grad[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
  }
}

#ifdef LORATCH_SLEEF_AVX2
// 8 elements at a time, the tail by the scalar loop.
LORATCH_AVX2 void forward_avx2(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(zero, g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  forward_scalar(gate + i, up + i, out + i, n - i);
}

LORATCH_AVX2 void backward_avx2(const float* gate, const float* up, const float* grad,
                                float* d_gate, float* d_up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 go = _mm256_loadu_ps(grad + i);
    const __m256 s =
        _mm256_div_ps(one, _mm256_add_ps(one, Sleef_expf8_u10avx2(_mm256_sub_ps(zero, g))));
    _mm256_storeu_ps(d_up + i, _mm256_mul_ps(go, _mm256_mul_ps(g, s)));
    const __m256 ds = _mm256_mul_ps(
        s, _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, s))));
    _mm256_storeu_ps(d_gate + i, _mm256_mul_ps(_mm256_mul_ps(go, _mm256_loadu_ps(up + i)), ds));
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

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    TORCH_CHECK(gate.sizes() == up.sizes(), "SwiGLU: gate ", gate.sizes(), " and up ", up.sizes(),
                " differ in shape");
    TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat,
                "SwiGLU: the fused op takes float32 only");
    TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "SwiGLU: the fused op runs on CPU");
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

// Writes a new at::Tensor* holding `silu(gate) * up` to `*out`. Returns nullptr, or the error
// message (free it with loratch_free_string).
char* loratch_swiglu(const void* gate, const void* up, void** out) {
  return loratch_guard("unknown C++ exception in SwiGLU", [&] {
    const auto tensor = [](const void* p) { return *static_cast<const at::Tensor*>(p); };
    at::Tensor y = SwiGlu::apply(tensor(gate), tensor(up));
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
