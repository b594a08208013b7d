// The optimizer's helpers that tch does not offer (src/train/optim uses them through src/ffi.rs):
// libtorch's fused multi-tensor AdamW kernel, clearing and filling `.grad`, and the total gradient
// norm in one call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros_like.h>

#include <vector>

#include "bridge.h"

namespace {

std::vector<at::Tensor> tensor_list(const void* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<const at::Tensor*>(tensors[i]));
  return out;
}

}  // namespace

extern "C" {

// One AdamW step over `n` parameters with torch's fused kernel (`torch.optim.AdamW(fused=True)`):
// every array holds `n` at::Tensor*; `steps` are float32 scalars already counting this step.
// Returns nullptr, or the error message (free it with loratch_free_string).
char* loratch_fused_adamw(const void* const* params, const void* const* grads,
                          const void* const* exp_avgs, const void* const* exp_avg_sqs,
                          const void* const* steps, size_t n, double lr, double beta1, double beta2,
                          double weight_decay, double eps) {
  return loratch_guard("unknown C++ exception in _fused_adamw_", [&] {
    at::_fused_adamw_(tensor_list(params, n), tensor_list(grads, n), tensor_list(exp_avgs, n),
                      tensor_list(exp_avg_sqs, n), {}, tensor_list(steps, n), lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// Makes the `.grad` of each of the `n` at::Tensor* in `params` undefined, as
// `zero_grad(set_to_none=True)` does. Returns nullptr, or the error message.
char* loratch_clear_grads(const void* const* params, size_t n) {
  return loratch_guard("unknown C++ exception while clearing gradients", [&] {
    for (at::Tensor& p : tensor_list(params, n)) p.mutable_grad().reset();
  });
}

// Gives each of the `n` at::Tensor* in `params` whose `.grad` is undefined a zero gradient (so
// that every rank of a distributed run all-reduces the same tensors). Returns nullptr, or the
// error message.
char* loratch_fill_missing_grads(const void* const* params, size_t n) {
  return loratch_guard("unknown C++ exception while filling gradients", [&] {
    for (at::Tensor& p : tensor_list(params, n)) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
    }
  });
}

// Writes to `*out` a new at::Tensor* holding the 2-norm of the 2-norms of the `n` (>= 1)
// at::Tensor* in `grads`, each taken in float32, as a 0-dim float32 tensor on the first one's
// device: `torch.nn.utils.clip_grad_norm_`'s total, in one call instead of a few per gradient.
// Returns nullptr, or the error message.
char* loratch_grad_norm(const void* const* grads, size_t n, void** out) {
  return loratch_guard("unknown C++ exception in the gradient norm", [&] {
    TORCH_CHECK(n > 0, "gradient norm of no tensors");
    const std::vector<at::Tensor> list = tensor_list(grads, n);
    const at::Device device = list.front().device();
    std::vector<at::Tensor> norms;
    norms.reserve(n);
    for (const at::Tensor& g : list) norms.push_back(g.to(at::kFloat).norm().to(device));
    *out = new at::Tensor(at::stack(norms).norm());
  });
}

}  // extern "C"
