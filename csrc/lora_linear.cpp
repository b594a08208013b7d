// The LoRA linear `y = x W^T + b + scaling * (x_d A^T) B^T` as one autograd node, where x_d is x
// or, with dropout active, dropout(x) computed (and differentiated) outside.
//
// Written out, the adapter costs PEFT and a composite graph five extra nodes, two fresh [M, out]
// and [M, in] products of inner size r, and two full-size additions. Here both rank-r products
// accumulate into the frozen GEMM's output instead (addmm_, beta = 1): in the forward into y, in
// the backward into the input gradient. For r << in, out that is about three times cheaper than a
// fresh product plus an add on CPU, and gives bit-identical forwards (the GEMM adds C after the
// rank-r sum, as the separate add does). Only what the backward needs is saved: the adapter's
// input and its rank-r activation.
//
// On CPU in float32 with 2 to 4 intra-op threads, the node deals rows out to the threads instead
// of letting oneMKL split each product: each thread runs all of its rows' products, forward and
// backward, single-threaded (direct BLAS calls, blas.h), and the adapter's gradients sum one
// partial per thread. The fused ops around the projections (RMSNorm, SwiGLU, residual adds) split
// rows the same way, so a thread reads the activations it wrote itself, and two threads never
// share one product's data, which on 2-core machines runs slower in some phases (BENCHMARKS.md,
// "Figures moved out of code comments"). More threads keep oneMKL's own split (unmeasured here:
// each thread would pack the whole weight), as do other devices and dtypes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <optional>

#include "blas.h"
#include "bridge.h"

namespace {

using loratch::Matrix;
using loratch::per_thread_rows;
using loratch::product;
using loratch::readable;
using loratch::row_split_threads;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The same Matrix read transposed.
Matrix t(Matrix x) { return {x.data, x.ld, !x.transposed}; }

void scale_rows(float* p, int64_t n, float scaling) {
  for (int64_t i = 0; i < n; ++i) p[i] *= scaling;
}

// The forward with rows dealt out to `threads` threads: writes `y` [M, out] and, with an adapter
// (`a` defined), `h` [M, r].
void forward_split(const at::Tensor& x2, const at::Tensor& lora_in, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b,
                   float scaling, int64_t threads, at::Tensor& y, at::Tensor& h) {
  const bool adapter = a.defined();
  const int64_t m = x2.size(0), in = weight.size(1), out = weight.size(0);
  const int64_t r = adapter ? a.size(0) : 0;
  const at::Tensor xr = readable(x2), xdr = readable(lora_in), wr = readable(weight);
  const at::Tensor ar = adapter ? readable(a) : a, br = adapter ? readable(b) : b;
  const Matrix x = loratch::matrix_of(xr), xd = loratch::matrix_of(xdr);
  const Matrix w_t = t(loratch::matrix_of(wr));
  const Matrix a_t = adapter ? t(loratch::matrix_of(ar)) : Matrix{};
  const Matrix b_t = adapter ? t(loratch::matrix_of(br)) : Matrix{};
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  if (adapter) h = at::empty({m, r}, x2.options());
  y = at::empty({m, out}, x2.options());
  float* hp = adapter ? h.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  per_thread_rows(m, threads, [&](int64_t, int64_t s, int64_t n) {
    float* hr = adapter ? hp + s * r : nullptr;
    float* yr = yp + s * out;
    if (adapter) {
      product(n, r, in, 1.0f, xd.rows_from(s), a_t, 0.0f, hr, r);
      scale_rows(hr, n * r, scaling);
    }
    float beta = 0.0f;
    if (bias_c.defined()) {
      const float* bp = bias_c.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) std::copy(bp, bp + out, yr + i * out);
      beta = 1.0f;
    }
    product(n, out, in, 1.0f, x.rows_from(s), w_t, beta, yr, out);
    if (adapter) product(n, out, r, 1.0f, {hr, r, false}, b_t, 1.0f, yr, out);
  });
}

// The node's `[M, out]` result `y` in the input `x`'s shape with the last dimension `out`. Not a
// view: a custom Function's view outputs may not be modified in place afterwards.
at::Tensor output_like(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return at::_unsafe_view(y, sizes);
}

// Whether the CPU float32 operands of a node over `x2` [M, in] may take the row split: the
// weight [out, in] and the bias [out] (if any) of matching shapes, float32, on the CPU.
bool split_operands_fit(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t out = weight.size(0);
  const bool bias_fits = !bias.defined() || (bias.sizes() == at::IntArrayRef{out} &&
                                             bias.scalar_type() == at::kFloat && bias.is_cpu());
  return weight.scalar_type() == at::kFloat && weight.is_cpu() && bias_fits &&
         x2.size(1) == weight.size(1);
}

// `x W^T + b` as one autograd node for a projection without an adapter (or with its adapter
// merged or disabled) while training: on CPU its products split rows over the threads as the
// LoRA node's do, so the row halves stay with their cores through every projection.
struct FrozenLinear : public torch::autograd::Function<FrozenLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias_in) {
    const at::Tensor bias = bias_in.value_or(at::Tensor());
    TORCH_CHECK(x.dim() >= 1, "the linear's input needs at least one dimension");
    TORCH_CHECK(weight.dim() == 2, "the linear's weight must be 2-D [out, in]");
    const int64_t in = weight.size(1);
    const at::Tensor x2 = x.reshape({-1, in});
    const int64_t threads = row_split_threads(x2, x2.size(0));
    const bool split = threads > 0 && split_operands_fit(x2, weight, bias);
    at::Tensor y, unused;
    if (split) {
      forward_split(x2, x2, weight, bias, at::Tensor(), at::Tensor(), 0.0f, threads, y, unused);
    } else {
      y = at::linear(x2, weight, bias);
    }
    ctx->save_for_backward({weight, weight.requires_grad() ? x2 : at::Tensor()});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["bias"] = bias.defined();
    ctx->saved_data["split"] = split;
    return output_like(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor g = grads[0].reshape({-1, weight.size(0)});
    at::Tensor gx, gweight, gbias;
    if (ctx->needs_input_grad(0)) {
      const int64_t threads =
          ctx->saved_data["split"].toBool() ? row_split_threads(g, g.size(0)) : 0;
      if (threads > 0) {
        const int64_t in = weight.size(1), out = weight.size(0);
        const at::Tensor gr = readable(g), wr = readable(weight);
        const Matrix gm = loratch::matrix_of(gr), w = loratch::matrix_of(wr);
        gx = at::empty({g.size(0), in}, gr.options());
        float* gxp = gx.data_ptr<float>();
        per_thread_rows(g.size(0), threads, [&](int64_t, int64_t s, int64_t n) {
          product(n, in, out, 1.0f, gm.rows_from(s), w, 0.0f, gxp + s * in, in);
        });
      } else {
        gx = at::mm(g, weight);
      }
      gx = gx.view(ctx->saved_data["x_sizes"].toIntVector());
    }
    if (ctx->needs_input_grad(1)) gweight = at::mm(g.t(), saved[1]);
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) gbias = g.sum(0);
    return {gx, gweight, gbias};
  }
};

struct LoraLinear : public torch::autograd::Function<LoraLinear> {
  // `dropped` absent: the adapter reads x. `bias` may be absent too. Absent inputs are not
  // autograd edges, so needs_input_grad numbers only the present ones (`w_edge`, `a_edge` in
  // the backward).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& dropped_in, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias_in, const at::Tensor& a,
                            const at::Tensor& b, double scaling) {
    const at::Tensor dropped = dropped_in.value_or(at::Tensor());
    const at::Tensor bias = bias_in.value_or(at::Tensor());
    TORCH_CHECK(x.dim() >= 1, "the LoRA linear's input needs at least one dimension");
    TORCH_CHECK(weight.dim() == 2, "the LoRA linear's weight must be 2-D [out, in]");
    const int64_t in = weight.size(1);
    const int64_t out = weight.size(0);
    const at::Tensor x2 = x.reshape({-1, in});
    const at::Tensor lora_in = dropped.defined() ? dropped.reshape({-1, in}) : x2;
    const int64_t threads = row_split_threads(x2, x2.size(0));
    const bool split = threads > 0 && split_operands_fit(x2, weight, bias) && a.dim() == 2 &&
                       b.dim() == 2 && a.size(1) == in && b.size(0) == out &&
                       b.size(1) == a.size(0) && lora_in.sizes() == x2.sizes() &&
                       a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                       lora_in.scalar_type() == at::kFloat && a.is_cpu() && b.is_cpu();
    at::Tensor h, y;
    if (split) {
      forward_split(x2, lora_in, weight, bias, a, b, static_cast<float>(scaling), threads, y, h);
    } else {
      h = at::mm(lora_in, a.t()).mul_(scaling);
      y = bias.defined() ? at::linear(x2, weight, bias) : at::mm(x2, weight.t());
      y.addmm_(h, b.t());
    }
    // x itself is needed only for a trainable base weight's gradient.
    ctx->save_for_backward(
        {lora_in, weight, a, b, h, weight.requires_grad() ? x2 : at::Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["dropped"] = dropped.defined();
    ctx->saved_data["bias"] = bias.defined();
    ctx->saved_data["split"] = split;
    return output_like(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& lora_in = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& a = saved[2];
    const at::Tensor& b = saved[3];
    const at::Tensor& h = saved[4];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const std::vector<int64_t> x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const bool dropped = ctx->saved_data["dropped"].toBool();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const at::Tensor g = grads[0].reshape({-1, weight.size(0)});
    // Edges: x, [dropped], weight, [bias], a, b.
    const size_t w_edge = dropped ? 2 : 1;
    const size_t a_edge = w_edge + (has_bias ? 2 : 1);
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_dropped = dropped && ctx->needs_input_grad(1);
    const bool need_a = ctx->needs_input_grad(a_edge);
    const bool need_b = ctx->needs_input_grad(a_edge + 1);
    const bool need_gh = need_a || need_dropped || (need_x && !dropped);

    at::Tensor gx, gdropped, gweight, gbias, ga, gb;
    const int64_t threads = ctx->saved_data["split"].toBool()
                                ? row_split_threads(g, g.size(0))
                                : 0;
    if (threads > 0 && g.scalar_type() == at::kFloat) {
      backward_split(g, lora_in, weight, a, b, h, static_cast<float>(scaling), threads,
                     need_x, need_gh, need_dropped, need_a, need_b, dropped, gx, gdropped, ga,
                     gb);
    } else {
      at::Tensor gh;  // d loss / d (scaling * x_d A^T) times scaling: [M, r]
      if (need_gh) gh = at::mm(g, b).mul_(scaling);
      if (need_x) {
        gx = at::mm(g, weight);
        if (!dropped) gx.addmm_(gh, a);
      }
      if (need_dropped) gdropped = at::mm(gh, a);
      if (need_a) ga = at::mm(gh.t(), lora_in);
      if (need_b) gb = at::mm(g.t(), h);
    }
    if (gx.defined()) gx = gx.view(x_sizes);
    if (gdropped.defined()) gdropped = gdropped.view(x_sizes);
    if (ctx->needs_input_grad(w_edge)) gweight = at::mm(g.t(), saved[5]);
    if (has_bias && ctx->needs_input_grad(w_edge + 1)) gbias = g.sum(0);
    return {gx, gdropped, gweight, gbias, ga, gb, at::Tensor()};
  }

  // The backward with rows dealt out to `threads` threads. Each thread writes its rows of the
  // input gradients and one partial sum of A's and B's gradients over its rows.
  static void backward_split(const at::Tensor& g_in, const at::Tensor& lora_in,
                             const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& h, float scaling, int64_t threads, bool need_x,
                             bool need_gh, bool need_dropped, bool need_a, bool need_b,
                             bool dropped, at::Tensor& gx, at::Tensor& gdropped, at::Tensor& ga,
                             at::Tensor& gb) {
    const at::Tensor gr = readable(g_in), xr = readable(lora_in);
    const at::Tensor wr = readable(weight), ar = readable(a), br = readable(b);
    const int64_t m = gr.size(0), out = weight.size(0), in = weight.size(1), r = a.size(0);
    const Matrix g = loratch::matrix_of(gr), xd = loratch::matrix_of(xr);
    const Matrix w = loratch::matrix_of(wr), am = loratch::matrix_of(ar);
    const Matrix bm = loratch::matrix_of(br), hm = loratch::matrix_of(h);
    const auto opts = gr.options();
    const at::Tensor gh = need_gh ? at::empty({m, r}, opts) : at::Tensor();
    if (need_x) gx = at::empty({m, in}, opts);
    if (need_dropped) gdropped = at::empty({m, in}, opts);
    const at::Tensor ga_parts = need_a ? at::empty({threads, r, in}, opts) : at::Tensor();
    const at::Tensor gb_parts = need_b ? at::empty({threads, out, r}, opts) : at::Tensor();
    const auto ptr = [](const at::Tensor& x) {
      return x.defined() ? x.data_ptr<float>() : nullptr;
    };
    float *ghp = ptr(gh), *gxp = ptr(gx), *gdp = ptr(gdropped);
    float *gap = ptr(ga_parts), *gbp = ptr(gb_parts);
    per_thread_rows(m, threads, [&](int64_t thread, int64_t s, int64_t n) {
      float* ghr = need_gh ? ghp + s * r : nullptr;
      if (need_gh) {
        product(n, r, out, 1.0f, g.rows_from(s), bm, 0.0f, ghr, r);
        scale_rows(ghr, n * r, scaling);
      }
      const Matrix gh_rows{ghr, r, false};
      if (need_x) {
        product(n, in, out, 1.0f, g.rows_from(s), w, 0.0f, gxp + s * in, in);
        if (!dropped) product(n, in, r, 1.0f, gh_rows, am, 1.0f, gxp + s * in, in);
      }
      if (need_dropped) product(n, in, r, 1.0f, gh_rows, am, 0.0f, gdp + s * in, in);
      if (need_a) {
        product(r, in, n, 1.0f, t(gh_rows), xd.rows_from(s), 0.0f, gap + thread * r * in, in);
      }
      if (need_b) {
        product(out, r, n, 1.0f, t(g.rows_from(s)), hm.rows_from(s), 0.0f,
                gbp + thread * out * r, r);
      }
    });
    // Every thread has rows: m >= threads * kMinRowsPerThread.
    if (need_a) ga = ga_parts.sum(0);
    if (need_b) gb = gb_parts.sum(0);
  }
};

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding the LoRA linear's output to `*out`. `dropped` and `bias` may
// be nullptr. Returns nullptr, or the error message (free it with loratch_free_string).
char* loratch_lora_linear(const void* x, const void* dropped, const void* weight, const void* bias,
                          const void* a, const void* b, double scaling, void** out) {
  return loratch_guard("unknown C++ exception in the LoRA linear", [&] {
    const auto tensor = [](const void* t) { return *static_cast<const at::Tensor*>(t); };
    const auto optional = [](const void* t) -> std::optional<at::Tensor> {
      if (t == nullptr) return std::nullopt;
      return *static_cast<const at::Tensor*>(t);
    };
    at::Tensor y = LoraLinear::apply(tensor(x), optional(dropped), tensor(weight), optional(bias),
                                     tensor(a), tensor(b), scaling);
    *out = new at::Tensor(std::move(y));
  });
}

// Writes a new at::Tensor* holding `x W^T + b` (FrozenLinear) to `*out`. `bias` may be nullptr.
// Returns nullptr, or the error message (free it with loratch_free_string).
char* loratch_frozen_linear(const void* x, const void* weight, const void* bias, void** out) {
  return loratch_guard("unknown C++ exception in the linear", [&] {
    const auto tensor = [](const void* t) { return *static_cast<const at::Tensor*>(t); };
    std::optional<at::Tensor> b;
    if (bias != nullptr) b = tensor(bias);
    at::Tensor y = FrozenLinear::apply(tensor(x), tensor(weight), b);
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
