// Zero-copy bridge between Python's torch.Tensor and tch::Tensor.
//
// Python exposes a tensor's c10::TensorImpl* as `tensor._cdata` and turns a TensorImpl* back into
// the (same, identity-preserving) Python object with `torch._C._wrap_tensor_impl`. tch holds a
// heap-allocated at::Tensor*. These two functions convert between the two pointer kinds, keeping the
// intrusive reference counts right, so both languages share one TensorImpl: storage, autograd
// metadata and all. No libtorch_python or Python headers are needed, so the same object code links
// into the standalone binary too.
//
// It also holds the error protocol's string helpers (bridge.h) and the libtorch version.
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/UndefinedTensorImpl.h>
#include <torch/version.h>

#include <cstdlib>
#include <cstring>

#include "bridge.h"

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

void loratch_free_string(char* s) { std::free(s); }

// The libtorch version these headers belong to.
const char* loratch_torch_version() { return TORCH_VERSION; }

}  // extern "C"
