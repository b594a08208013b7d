// Causal (grouped-query) attention for short sequences on CPU, as one autograd node:
// `softmax(q k^T * scale + causal mask) v`, with q `[B, H, T, D]` and k, v `[B, KV, T, D]`, query
// head h reading key/value head h / (H / KV) (transformers' `repeat_kv`).
//
// libtorch's CPU flash attention splits keys in blocks of 512, so for T <= 512 every query block
// multiplies with every key and the causal mask only hides the products afterwards; its backward
// also recomputes the scores. Here queries go in blocks of `block` positions and block j multiplies
// only with keys [0, end of block j): for T = 256 and blocks of 64 that is 10/16 of the products.
// The R = H / KV query heads that share a key head are stacked into one [R * block, D] operand.
// The (group, block) products are small (192 x 64 x 256 for SmolLM2), too small for oneMKL to
// split well over threads, and unequal in size; so each runs whole on one thread, and the tasks
// are dealt out to the threads by cost. The backward reuses the saved probabilities (one
// [R * block, end] matrix per block and group: 1.5 MiB per layer for 9 x 256 x 256) instead of
// recomputing them, and gathers dk and dv per key block, so no two threads write the same rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "bridge.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One unit of work: (group, block). Its cost grows with the keys it touches.
struct Task {
  int64_t group, block, cost;
};

// Runs `body(task)` for every task, in parallel over the intra-op threads. The tasks differ in
// cost (a causal query block j reads j + 1 key blocks), so they are dealt out to the threads
// beforehand, largest first, each to the least loaded thread, rather than split as one range.
// Inside, each task's ops run on one thread (nested ATen and oneMKL calls do not fork again).
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
    // Worker threads do not inherit the caller's grad mode: no graph is recorded here.
    at::NoGradGuard no_grad;
    for (int64_t i = begin; i < end; ++i) {
      for (const Task& task : per_thread[i]) body(task);
    }
  });
}

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
    const int64_t r = h / kv, g = b * kv, blocks = (t + block - 1) / block;
    const at::Tensor qg = q.detach().reshape({g, r, t, d});
    const at::Tensor kg = k.detach().reshape({g, t, d}).contiguous();
    const at::Tensor vg = v.detach().reshape({g, t, d}).contiguous();
    at::Tensor out = at::empty({g, r, t, d}, q.options());
    // Per (group, block): the block's queries [r * len, d] and probabilities [r * len, end].
    std::vector<at::Tensor> qs(g * blocks), ps(g * blocks);
    std::vector<Task> tasks;
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t j = 0; j < blocks; ++j) tasks.push_back({gi, j, std::min(t, (j + 1) * block)});
    // Within a block, query i sees the block's keys up to its own position.
    const at::Tensor future = at::ones({block, block}, q.options().dtype(at::kBool)).triu_(1);
    run_tasks(tasks, [&](const Task& task) {
      const int64_t start = task.block * block, len = std::min(block, t - start);
      const int64_t end = start + len;
      const at::Tensor qj = qg[task.group].narrow(1, start, len).reshape({r * len, d});
      at::Tensor s = at::empty({r * len, end}, qj.options());
      at::addmm_out(s, s, qj, kg[task.group].narrow(0, 0, end).t(), /*beta=*/0, /*alpha=*/scale);
      // Query row i (position start + i % len) sees keys [0, start + i % len].
      const at::Tensor hidden = s.view({r, len, end}).narrow(2, start, len);  // [r, len, len]
      hidden.masked_fill_(future.narrow(0, 0, len).narrow(1, 0, len),
                          -std::numeric_limits<double>::infinity());
      at::Tensor p = at::_softmax(s, -1, false);
      out[task.group].narrow(1, start, len).copy_(
          at::mm(p, vg[task.group].narrow(0, 0, end)).view({r, len, d}));
      qs[task.group * blocks + task.block] = qj;
      ps[task.group * blocks + task.block] = p;
    });
    variable_list saved{kg, vg};
    for (int64_t i = 0; i < g * blocks; ++i) {
      saved.push_back(qs[i]);
      saved.push_back(ps[i]);
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
    const int64_t r = q_sizes[1] / k_sizes[1], blocks = (t + block - 1) / block;
    const auto q_of = [&](int64_t gi, int64_t j) -> const at::Tensor& {
      return saved[2 + 2 * (gi * blocks + j)];
    };
    const auto p_of = [&](int64_t gi, int64_t j) -> const at::Tensor& {
      return saved[3 + 2 * (gi * blocks + j)];
    };
    const at::Tensor go = grads[0].reshape({g, r, t, d});
    at::Tensor dq = at::empty({g, r, t, d}, kg.options());
    at::Tensor dk = at::empty({g, t, d}, kg.options());
    at::Tensor dv = at::empty({g, t, d}, kg.options());
    std::vector<at::Tensor> gs(g * blocks), dss(g * blocks);
    // Query blocks: the score gradients and dq.
    std::vector<Task> by_query, by_key;
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t j = 0; j < blocks; ++j) {
        by_query.push_back({gi, j, std::min(t, (j + 1) * block)});
        by_key.push_back({gi, j, t - j * block});
      }
    }
    run_tasks(by_query, [&](const Task& task) {
      const int64_t start = task.block * block, len = std::min(block, t - start);
      const int64_t end = start + len;
      const at::Tensor& pj = p_of(task.group, task.block);
      const at::Tensor gj = go[task.group].narrow(1, start, len).reshape({r * len, d});
      const at::Tensor dp = at::mm(gj, vg[task.group].narrow(0, 0, end).t());
      // d(scores) times the scale, which both dq and dk carry.
      at::Tensor ds = at::_softmax_backward_data(dp, pj, -1, pj.scalar_type()).mul_(scale);
      dq[task.group].narrow(1, start, len).copy_(
          at::mm(ds, kg[task.group].narrow(0, 0, end)).view({r, len, d}));
      gs[task.group * blocks + task.block] = gj;
      dss[task.group * blocks + task.block] = ds;
    });
    // Key blocks: dk and dv of keys [i * block, ...) gather from the query blocks j >= i.
    run_tasks(by_key, [&](const Task& task) {
      const int64_t kstart = task.block * block, klen = std::min(block, t - kstart);
      at::Tensor dki = dk[task.group].narrow(0, kstart, klen);
      at::Tensor dvi = dv[task.group].narrow(0, kstart, klen);
      dki.zero_();
      dvi.zero_();
      for (int64_t j = task.block; j < blocks; ++j) {
        const int64_t idx = task.group * blocks + j;
        dki.addmm_(dss[idx].narrow(1, kstart, klen).t(), q_of(task.group, j));
        dvi.addmm_(p_of(task.group, j).narrow(1, kstart, klen).t(), gs[idx]);
      }
    });
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
