// Zero-copy bridge between Python's torch.Tensor and tch::Tensor.
//
// Python exposes a tensor's c10::TensorImpl* as `tensor._cdata` and turns a TensorImpl* back into
// the (same, identity-preserving) Python object with `torch._C._wrap_tensor_impl`. tch holds a
// heap-allocated at::Tensor*. These two functions convert between the two pointer kinds, keeping the
// intrusive reference counts right, so both languages share one TensorImpl: storage, autograd
// metadata and all. No libtorch_python or Python headers are needed, so the same object code links
// into the standalone binary too.
//
// It also holds the optimizer's helpers that tch does not offer: the fused multi-tensor AdamW
// kernel, clearing and filling `.grad`, and the total gradient norm in one call. (The other C++
// ops live in their own files.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/UndefinedTensorImpl.h>
#include <torch/version.h>

#include <cstdlib>
#include <cstring>
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

char* loratch_copy_message(const char* message) {
  const size_t n = std::strlen(message);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, message, n + 1);
  return out;
}

// New owning at::Tensor* for `impl` (the reference count is incremented), or nullptr.
void* loratch_tensor_from_impl(void* impl) {
  if (impl == nullptr) return nullptr;
  try {
    auto ptr = c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(
        static_cast<c10::TensorImpl*>(impl));
    return new at::Tensor(std::move(ptr));
  } catch (...) {
    return nullptr;
  }
}

// Borrowed TensorImpl* of an at::Tensor* (no reference count change), or nullptr if undefined.
void* loratch_tensor_impl(const void* tensor) {
  if (tensor == nullptr) return nullptr;
  const at::Tensor* t = static_cast<const at::Tensor*>(tensor);
  if (!t->defined()) return nullptr;
  return t->unsafeGetTensorImpl();
}

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

void loratch_free_string(char* s) { std::free(s); }

// The libtorch version these headers belong to.
const char* loratch_torch_version() { return TORCH_VERSION; }

}  // extern "C"
