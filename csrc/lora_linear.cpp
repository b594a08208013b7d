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
// On CPU, the frozen products with a wide output and few rows (SmolLM2's gate/up forward and down's
// input gradient: 256 x 576 -> 1536), with the rank-r term that accumulates into them, run in
// column blocks of at most 768 straight into the result. On this project's 2-core machines oneMKL
// runs such a whole product at ~150 GFLOP/s in some phases of the machine, which last seconds to
// minutes and come and go within a process (210-215 otherwise; the rank-r `[256, 16] x [16, 1536]`
// drops from ~180 to ~130), while in two column halves it runs at 196-209 in those phases and at
// the whole product's speed in the others (alternated probes, both layouts). Each core alone keeps
// its speed in those phases, so it is the two threads' shared work on one product that slows.
// Products of 1024 rows or more showed no such phase. The blocks compute the same dot products (the
// forward stays bit-identical to the composite).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <optional>

#include "bridge.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows up to which a wide frozen product is split by output columns, and the widest block.
constexpr int64_t kSplitMaxRows = 512;
constexpr int64_t kMaxBlockColumns = 768;

// `x @ w^T + lo @ hi^T` for `x [M, K]`, `w [N, K]`, `lo [M, r]`, `hi [N, r]` (`transposed`: the
// forward), or `x @ w + lo @ hi` for `w [K, N]`, `hi [r, N]` (the input gradient). `lo` may be
// undefined (no rank-r term). On CPU both products run per column block when M <= kSplitMaxRows
// and N > kMaxBlockColumns, the rank-r one accumulating into the block the frozen one just wrote.
at::Tensor frozen_plus_low_rank(const at::Tensor& x, const at::Tensor& w, const at::Tensor& lo,
                                const at::Tensor& hi, bool transposed) {
  const int64_t m = x.size(0), n = transposed ? w.size(0) : w.size(1);
  const int64_t blocks = (n + kMaxBlockColumns - 1) / kMaxBlockColumns;
  if (!x.is_cpu() || m > kSplitMaxRows || blocks < 2) {
    at::Tensor out = transposed ? at::mm(x, w.t()) : at::mm(x, w);
    if (lo.defined()) out.addmm_(lo, transposed ? hi.t() : hi);
    return out;
  }
  const auto columns_of = [&](const at::Tensor& t, int64_t start, int64_t len) {
    return transposed ? t.narrow(0, start, len).t() : t.narrow(1, start, len);
  };
  const int64_t columns = (n + blocks - 1) / blocks;
  at::Tensor out = at::empty({m, n}, x.options());
  for (int64_t start = 0; start < n; start += columns) {
    const int64_t len = std::min(columns, n - start);
    at::Tensor block = out.narrow(1, start, len);
    at::mm_out(block, x, columns_of(w, start, len));
    if (lo.defined()) block.addmm_(lo, columns_of(hi, start, len));
  }
  return out;
}

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
    const at::Tensor h = at::mm(lora_in, a.t()).mul_(scaling);
    at::Tensor y;
    if (bias.defined()) {
      y = at::linear(x2, weight, bias);
      y.addmm_(h, b.t());
    } else {
      y = frozen_plus_low_rank(x2, weight, h, b, /*transposed=*/true);
    }
    // x itself is needed only for a trainable base weight's gradient.
    ctx->save_for_backward(
        {lora_in, weight, a, b, h, weight.requires_grad() ? x2 : at::Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["dropped"] = dropped.defined();
    ctx->saved_data["bias"] = bias.defined();
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = out;
    // Not a view: a custom Function's view outputs may not be modified in place afterwards.
    return at::_unsafe_view(y, sizes);
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
    at::Tensor gh;  // d loss / d (scaling * x_d A^T) times scaling: [M, r]
    if (need_a || need_dropped || (need_x && !dropped)) gh = at::mm(g, b).mul_(scaling);

    at::Tensor gx, gdropped, gweight, gbias, ga, gb;
    if (need_x) {
      gx = frozen_plus_low_rank(g, weight, dropped ? at::Tensor() : gh, a, /*transposed=*/false)
               .view(x_sizes);
    }
    if (need_dropped) gdropped = at::mm(gh, a).view(x_sizes);
    if (ctx->needs_input_grad(w_edge)) gweight = at::mm(g.t(), saved[5]);
    if (has_bias && ctx->needs_input_grad(w_edge + 1)) gbias = g.sum(0);
    if (need_a) ga = at::mm(gh.t(), lora_in);
    if (ctx->needs_input_grad(a_edge + 1)) gb = at::mm(g.t(), h);
    return {gx, gdropped, gweight, gbias, ga, gb, at::Tensor()};
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

}  // extern "C"
