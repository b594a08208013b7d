// Causal (grouped-query) attention for short sequences on CPU, as one autograd node:
// `softmax(q k^T * scale + causal mask) v`, with q `[B, H, T, D]` and k, v `[B, KV, T, D]`, query
// head h reading key/value head h / (H / KV) (transformers' `repeat_kv`).
//
// libtorch's CPU flash attention splits keys in blocks of 512, so for T <= 512 every query block
// multiplies with every key and the causal mask only hides the products afterwards; its backward
// also recomputes the scores. Here queries go in blocks of `block` positions and block j multiplies
// only with keys [0, end of block j): for T = 256 and blocks of 64 that is 10/16 of the products.
// The R = H / KV query heads that share a key head are stacked into one [R * block, D] operand, so
// each product is one batched GEMM over the B * KV groups. The backward reuses the saved
// probabilities (one [R * block, end] matrix per block and group: 1.5 MiB per layer for
// 9 x 256 x 256) instead of recomputing them.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <limits>

#include "bridge.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CausalAttention : public torch::autograd::Function<CausalAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, int64_t block) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                "causal attention: q, k and v must be [B, heads, T, head_dim]");
    TORCH_CHECK(k.sizes() == v.sizes(), "causal attention: k and v differ in shape");
    const int64_t b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3);
    const int64_t kv = k.size(1);
    TORCH_CHECK(k.size(0) == b && k.size(2) == t && k.size(3) == d,
                "causal attention: k and v must be [B, kv_heads, T, head_dim] like q");
    TORCH_CHECK(kv > 0 && h % kv == 0, "causal attention: heads must be a multiple of kv_heads");
    TORCH_CHECK(block > 0, "causal attention: block must be positive");
    const int64_t r = h / kv, g = b * kv;
    const at::Tensor qg = q.reshape({g, r, t, d});
    const at::Tensor kg = k.reshape({g, t, d});
    const at::Tensor vg = v.reshape({g, t, d});
    const at::Tensor mask =
        at::full({t, t}, -std::numeric_limits<double>::infinity(), q.options()).triu_(1);
    at::Tensor out = at::empty({g, r, t, d}, q.options());
    variable_list saved{kg, vg};
    for (int64_t start = 0; start < t; start += block) {
      const int64_t len = std::min(block, t - start), end = start + len;
      const at::Tensor qj = qg.narrow(2, start, len).reshape({g, r * len, d});
      const at::Tensor mj =
          mask.narrow(0, start, len).narrow(1, 0, end).repeat({r, 1}).expand({g, r * len, end});
      const at::Tensor pj = at::_softmax(
          at::baddbmm(mj, qj, kg.narrow(1, 0, end).transpose(1, 2), 1.0, scale), -1, false);
      out.narrow(2, start, len).copy_(at::bmm(pj, vg.narrow(1, 0, end)).view({g, r, len, d}));
      saved.push_back(qj);
      saved.push_back(pj);
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["block"] = block;
    ctx->saved_data["q_sizes"] = q.sizes().vec();
    ctx->saved_data["k_sizes"] = k.sizes().vec();
    // Not a view: a custom Function's view outputs may not be modified in place afterwards.
    return at::_unsafe_view(out, q.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& kg = saved[0];
    const at::Tensor& vg = saved[1];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t block = ctx->saved_data["block"].toInt();
    const std::vector<int64_t> q_sizes = ctx->saved_data["q_sizes"].toIntVector();
    const std::vector<int64_t> k_sizes = ctx->saved_data["k_sizes"].toIntVector();
    const int64_t g = kg.size(0), t = kg.size(1), d = kg.size(2);
    const int64_t r = q_sizes[1] / k_sizes[1];
    const at::Tensor go = grads[0].reshape({g, r, t, d});
    at::Tensor dq = at::empty({g, r, t, d}, kg.options());
    at::Tensor dk = at::zeros({g, t, d}, kg.options());
    at::Tensor dv = at::zeros({g, t, d}, kg.options());
    size_t i = 2;
    for (int64_t start = 0; start < t; start += block, i += 2) {
      const int64_t len = std::min(block, t - start), end = start + len;
      const at::Tensor& qj = saved[i];
      const at::Tensor& pj = saved[i + 1];
      const at::Tensor gj = go.narrow(2, start, len).reshape({g, r * len, d});
      const at::Tensor dp = at::bmm(gj, vg.narrow(1, 0, end).transpose(1, 2));
      dv.narrow(1, 0, end).baddbmm_(pj.transpose(1, 2), gj);
      const at::Tensor ds = at::_softmax_backward_data(dp, pj, -1, pj.scalar_type());
      dq.narrow(2, start, len).copy_(at::bmm(ds, kg.narrow(1, 0, end)).view({g, r, len, d}));
      dk.narrow(1, 0, end).baddbmm_(ds.transpose(1, 2), qj);
    }
    dq.mul_(scale);
    dk.mul_(scale);
    return {dq.view(q_sizes), dk.view(k_sizes), dv.view(k_sizes), at::Tensor(), at::Tensor()};
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
