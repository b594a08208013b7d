// Activation checkpointing: a function of one tensor (a decoder layer, handed over as a Rust
// callback) as one autograd node that keeps only its input and recomputes the function's inside in
// the backward, as torch.utils.checkpoint's reentrant variant does with preserve_rng_state.
//
// The forward runs the callback with gradients recorded, exactly as a plain forward would: the ops
// choose their kernels by whether their inputs record gradients (src/ops/mod.rs), so a forward
// under no_grad could round differently from the recompute. The graph it builds is dropped as soon
// as the layer's output is taken, so a layer's activations live only while that layer runs. The
// backward restores the random generators' states of the forward (LoRA dropout draws the same
// mask), reruns the callback on a detached copy of the input and back-propagates the incoming
// gradient through that fresh graph with torch::autograd::grad; the gradients of the input and of
// the parameters (given as the node's further inputs) are the node's outputs, so the outer engine
// accumulates the parameters' .grad as it would without checkpointing (and autograd.grad works).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "bridge.h"

extern "C" {
// Runs the Rust function `closure` on `input` (a new owning at::Tensor* that Rust takes over).
// Writes a new owning at::Tensor* to `*out` and returns nullptr, or returns the error message
// (malloc'ed, see bridge.h) and writes nothing.
typedef char* (*loratch_checkpoint_run)(void* closure, void* input, void** out);
// Frees the Rust function `closure`.
typedef void (*loratch_checkpoint_drop)(void* closure);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The state of one random generator, to be put back later.
struct GeneratorState {
  at::Generator generator;
  at::Tensor state;

  static GeneratorState of(at::Generator generator) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    return {generator, generator.get_state()};
  }

  void restore() {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
};

// The default CPU generator's state and, for an input on another device, that device's.
struct RngStates {
  std::vector<GeneratorState> states;

  static RngStates of(const c10::Device& device) {
    RngStates out;
    out.states.push_back(GeneratorState::of(at::detail::getDefaultCPUGenerator()));
    if (!device.is_cpu()) {
      out.states.push_back(GeneratorState::of(at::globalContext().defaultGenerator(device)));
    }
    return out;
  }

  void restore() {
    for (auto& s : states) s.restore();
  }
};

// While alive, the generators hold the states `saved`; on destruction (also by an exception)
// they get back the states they had before.
class ForkedRng {
 public:
  explicit ForkedRng(RngStates& saved, const c10::Device& device)
      : before_(RngStates::of(device)) {
    saved.restore();
  }
  ~ForkedRng() { before_.restore(); }
  ForkedRng(const ForkedRng&) = delete;
  ForkedRng& operator=(const ForkedRng&) = delete;

 private:
  RngStates before_;
};

// A leaf over x's memory that requires gradients as x does: the input of a run of the function,
// so every op inside takes the path it takes in a plain forward.
at::Tensor leaf_like(const at::Tensor& x) {
  at::Tensor input = x.detach();
  input.requires_grad_(x.requires_grad());
  return input;
}

// The Rust function of one node and the generator states of its forward. Kept by the node (in
// its saved data), so the function is freed when the graph is.
struct Layer : torch::CustomClassHolder {
  Layer(loratch_checkpoint_run run, loratch_checkpoint_drop drop, void* closure)
      : run_(run), drop_(drop), closure_(closure) {}
  ~Layer() override { drop_(closure_); }
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // The function's output for `input`, with gradients recorded.
  at::Tensor operator()(const at::Tensor& input) const {
    at::AutoGradMode grad(true);
    void* out = nullptr;
    char* err = run_(closure_, new at::Tensor(input), &out);
    if (err != nullptr) {
      std::string message(err);
      std::free(err);
      throw std::runtime_error(message);
    }
    std::unique_ptr<at::Tensor> y(static_cast<at::Tensor*>(out));
    return std::move(*y);
  }

  RngStates rng;

 private:
  loratch_checkpoint_run run_;
  loratch_checkpoint_drop drop_;
  void* closure_;
};

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  // `params`: the tensors inside the function that require gradients. As inputs of the node they
  // make it exist even when `x` requires no gradient, and receive their gradients from it.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params,
                            const c10::intrusive_ptr<Layer>& layer) {
    layer->rng = RngStates::of(x.device());
    at::Tensor y = (*layer)(leaf_like(x));
    variable_list saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layer"] = c10::IValue::make_capsule(layer);
    // A new tensor over y's memory without y's graph: that graph, and every activation it saved,
    // is freed here, when y goes.
    return y.variable_data();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const auto capsule = ctx->saved_data["layer"].toCapsule();
    Layer& layer = *static_cast<Layer*>(capsule.get());
    // The gradients of x, of each parameter, and of the layer (not a tensor: none).
    variable_list out(saved.size() + 1);
    const at::Tensor input = leaf_like(x);
    at::Tensor y;
    {
      ForkedRng fork(layer.rng, x.device());
      y = layer(input);
    }
    if (!y.requires_grad()) return out;
    // The gradients of whatever requires them: the input (when x does) and the parameters, the
    // very tensors the recomputed graph leads to.
    variable_list wrt;
    std::vector<size_t> slots;
    for (size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor& t = i == 0 ? input : saved[i];
      if (!t.requires_grad()) continue;
      wrt.push_back(t);
      slots.push_back(i);
    }
    const variable_list g = torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/false,
                                                  /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < slots.size(); ++k) out[slots[k]] = g[k];
    return out;
  }
};

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding `run(closure, x)` as one checkpointing node (see the top of the
// file) to `*out`. `params` (`n_params` at::Tensor*) are the tensors inside the function that
// require gradients. The node takes `closure` over at once, also on error: `drop(closure)` frees
// it when the last node holding it goes. Returns nullptr, or the error message (free it with
// loratch_free_string).
char* loratch_checkpoint(const void* x, const void* const* params, size_t n_params,
                         loratch_checkpoint_run run, loratch_checkpoint_drop drop, void* closure,
                         void** out) {
  c10::intrusive_ptr<Layer> layer;
  try {
    layer = c10::make_intrusive<Layer>(run, drop, closure);
  } catch (...) {
    drop(closure);
    return loratch_copy_message("out of memory for a checkpointed layer");
  }
  return loratch_guard("unknown C++ exception in a checkpointed layer", [&] {
    std::vector<at::Tensor> ps;
    ps.reserve(n_params);
    for (size_t i = 0; i < n_params; ++i) ps.push_back(*static_cast<const at::Tensor*>(params[i]));
    at::Tensor y =
        Checkpoint::apply(*static_cast<const at::Tensor*>(x), at::TensorList(ps), layer);
    *out = new at::Tensor(std::move(y));
  });
}

// Whether this thread records gradients (libtorch's GradMode).
bool loratch_grad_enabled() { return c10::GradMode::is_enabled(); }

}  // extern "C"
