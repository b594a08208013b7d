// The linear `y = x W^T + b` of a frozen weight kept in a block-quantized format (GGUF's q4_0,
// q8_0, k-quants, ..., or loratch's nf4) as one autograd node that never keeps W in float.
//
// W is stored as uint8 rows `[out, row_bytes]` (each row a whole number of blocks). The forward
// dequantizes W a chunk of rows at a time into scratch memory that is reused from call to call
// (per thread), multiplies, and drops the float rows; the backward does the same for the input
// gradient `g W`. An input of few rows (a decoding step) instead has each thread decode small
// blocks of rows and multiply them at once (`forward_few_rows`), and a float32 input of many rows
// in a format of quant_simd.cpp has each thread decode cache-sized tiles of rows and multiply
// each (`forward_tiled`). So the graph saves nothing of W: a model of quantized projections holds
// its quantized bytes plus one chunk of float rows, however many layers run. W gets no gradient (it is frozen; LoRA's factors are separate nodes).
//
// The block decoding is Rust's (src/quant, equal to gguf-py bit for bit), passed in as a function
// pointer at each call rather than linked by name, so no link-order dependency arises between
// this archive and the crate; the common GGUF formats decode with the AVX2 kernels of
// quant_simd.cpp instead (the same floats) where the CPU has AVX2. Decoding runs on the CPU, rows
// split over libtorch's threads; on other devices the float chunk is copied to x's device before
// its product (the quantized bytes stay in host memory).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "blas.h"
#include "bridge.h"
#include "quant_simd.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rust's decoder: `n` floats of type `ty` from `src_len` bytes; 0 on success.
using Dequantize = int32_t (*)(int32_t ty, const uint8_t* src, int64_t src_len, float* dst,
                               int64_t n);

// Largest float chunk of W decoded at once (64 MiB of float32): enough for whole projections of
// models up to ~2B parameters, a few chunks for larger ones and for the output head.
std::atomic<int64_t> g_chunk_elems{16 << 20};

// The quantized weight as the node sees it.
struct QWeight {
  at::Tensor data;  // uint8 [out, row_bytes], CPU, contiguous
  int32_t ty;
  int64_t in;
  Dequantize decode;
};

// Float32 scratch reused across calls on this thread (the forward and the backward of one node
// may run on different threads; each has its own).
float* scratch(int64_t n) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, at::kFloat);
  return buf.data_ptr<float>();
}

// Rows [r0, r0 + n) of W as a float tensor of `like`'s dtype and device. On the CPU in float32
// it views the scratch buffer: valid until the next call on this thread.
at::Tensor rows_of(const QWeight& w, int64_t r0, int64_t n, const at::Tensor& like) {
  const int64_t rb = w.data.size(1);
  float* dst = scratch(n * w.in);
  const uint8_t* src = w.data.data_ptr<uint8_t>();
  const bool simd = loratch::quant_simd_supports(w.ty);
  std::atomic<int32_t> failed{0};
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    if (simd) {
      loratch::quant_simd_decode(w.ty, src + (r0 + b) * rb, rb, e - b, w.in, dst + b * w.in);
      return;
    }
    const int32_t rc =
        w.decode(w.ty, src + (r0 + b) * rb, (e - b) * rb, dst + b * w.in, (e - b) * w.in);
    if (rc != 0) failed = rc;
  });
  if (failed != 0) {
    throw std::runtime_error("quantized linear: decoding weight rows failed (code " +
                             std::to_string(failed.load()) + ")");
  }
  at::Tensor rows = at::from_blob(dst, {n, w.in}, at::kFloat);
  if (like.scalar_type() == at::kFloat && like.device().is_cpu()) return rows;
  return rows.to(like.device(), like.scalar_type());
}

int64_t chunk_rows(const QWeight& w) {
  return std::max<int64_t>(1, g_chunk_elems.load() / std::max<int64_t>(1, w.in));
}

// Inputs of at most this many rows (decoding steps) take `forward_few_rows`.
constexpr int64_t kFewRows = 8;
// Float32 elements of W one thread decodes at once in `forward_few_rows`: 128 KiB, which stays in
// the core's cache while the product reads it.
constexpr int64_t kFewRowsBlockElems = 32 << 10;

// x2 [m, in] -> [m, out] for a float32 CPU input of few rows: each thread takes its own blocks of
// W's rows and, for the formats of quant_simd.cpp, decodes each block in registers and multiplies
// it there; for the others it decodes small blocks of rows and multiplies each at once (sgemm_ on
// the calling thread). Either way the product reads W's quantized bytes once and never writes a
// float copy of W out to memory, which the chunked product (decode all, then multiply) does at
// every decoding step.
at::Tensor forward_few_rows(const at::Tensor& x2, const QWeight& w, const at::Tensor& bias) {
  const at::Tensor x = x2.contiguous();
  const int64_t m = x.size(0), out = w.data.size(0), rb = w.data.size(1);
  const int64_t block =
      std::clamp<int64_t>(kFewRowsBlockElems / std::max<int64_t>(1, w.in), 1, out);
  at::Tensor y = at::empty({m, out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* src = w.data.data_ptr<uint8_t>();
  std::atomic<int32_t> failed{0};
  if (loratch::quant_simd_supports(w.ty)) {
    at::parallel_for(0, (out + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * block, n = std::min(b1 * block, out) - r0;
      loratch::quant_simd_dot(w.ty, src + r0 * rb, rb, n, w.in, xp, m, yp + r0, out);
    });
    if (bias.defined()) y.add_(bias);
    return y;
  }
  at::parallel_for(0, (out + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(block * w.in));
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t r0 = i * block, n = std::min(block, out - r0);
      const int32_t rc = w.decode(w.ty, src + r0 * rb, n * rb, buf.data(), n * w.in);
      if (rc != 0) {
        failed = rc;
        return;
      }
      loratch::gemm(false, true, m, n, w.in, 1.0f, xp, w.in, buf.data(), w.in, 0.0f, yp + r0, out);
    }
  });
  if (failed != 0) {
    throw std::runtime_error("quantized linear: decoding weight rows failed (code " +
                             std::to_string(failed.load()) + ")");
  }
  if (bias.defined()) y.add_(bias);
  return y;
}

// Inputs of at least this many rows (prompts, training batches) of a float32 CPU input and a
// format of quant_simd.cpp take `forward_tiled`.
constexpr int64_t kTiledRows = 16;
// Rows of W per tile of `forward_tiled`: a multiple of 64, at most about 192 Ki float32 elements
// (768 KiB, which stays in a core's L2 cache while the product reads it; a 129-row product on
// 64-row tiles ran ~10% slower than on 128 to 256 rows), and at least two tiles per thread.
int64_t tile_rows(int64_t in, int64_t out) {
  const int64_t cache = (int64_t{192 << 10} / std::max<int64_t>(1, in)) / 64 * 64;
  const int64_t per_thread = (out + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t balanced = (per_thread + 63) / 64 * 64;
  return std::max<int64_t>(64, std::min(cache, balanced));
}

// x2 [m, in] -> [m, out] for a float32 CPU input of many rows and a format of quant_simd.cpp: each
// thread decodes its own tiles of W's rows (AVX2) into a cache-sized buffer and multiplies each at
// once (sgemm_ on the calling thread), so the float rows never travel to memory and back, as the
// chunked product's decode-all-then-multiply makes them. Every output element is still one
// product over all of `in`; for >= 16 rows and whole 64-column tiles (`out` a multiple of 64)
// oneMKL's sums then equal those of one product on the whole decoded weight, bit for bit (held by
// ops/quant.rs's tests and tests/python/test_gguf.py's logits against transformers; a 6-column
// remainder tile was not equal, so other widths take the chunked product).
at::Tensor forward_tiled(const at::Tensor& x2, const QWeight& w, const at::Tensor& bias) {
  const at::Tensor x = x2.contiguous();
  const int64_t m = x.size(0), out = w.data.size(0), rb = w.data.size(1);
  const int64_t tile = std::min(tile_rows(w.in, out), out);
  // With a bias, y starts as the bias and the products add to it (beta = 1), as `addmm` does.
  at::Tensor y =
      bias.defined() ? bias.expand({m, out}).contiguous() : at::empty({m, out}, x.options());
  const float beta = bias.defined() ? 1.0f : 0.0f;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* src = w.data.data_ptr<uint8_t>();
  at::parallel_for(0, (out + tile - 1) / tile, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(tile * w.in));
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t r0 = i * tile, n = std::min(tile, out - r0);
      loratch::quant_simd_decode(w.ty, src + r0 * rb, rb, n, w.in, buf.data());
      loratch::gemm(false, true, m, n, w.in, 1.0f, xp, w.in, buf.data(), w.in, beta, yp + r0, out);
    }
  });
  return y;
}

// x2 [m, in] -> [m, out]; one product when W fits one chunk, so that case equals `linear` on
// the decoded weight bit for bit.
at::Tensor forward_rows(const at::Tensor& x2, const QWeight& w, const at::Tensor& bias) {
  const bool cpu_float = x2.scalar_type() == at::kFloat && x2.is_cpu();
  if (x2.size(0) <= kFewRows && cpu_float) return forward_few_rows(x2, w, bias);
  if (x2.size(0) >= kTiledRows && cpu_float && w.data.size(0) % 64 == 0 &&
      loratch::quant_simd_supports(w.ty)) {
    return forward_tiled(x2, w, bias);
  }
  const int64_t out = w.data.size(0), chunk = chunk_rows(w);
  if (out <= chunk) {
    const at::Tensor wt = rows_of(w, 0, out, x2);
    return bias.defined() ? at::addmm(bias, x2, wt.t()) : at::mm(x2, wt.t());
  }
  at::Tensor y = at::empty({x2.size(0), out}, x2.options());
  for (int64_t r0 = 0; r0 < out; r0 += chunk) {
    const int64_t n = std::min(chunk, out - r0);
    const at::Tensor wt = rows_of(w, r0, n, x2);
    at::Tensor part =
        bias.defined() ? at::addmm(bias.narrow(0, r0, n), x2, wt.t()) : at::mm(x2, wt.t());
    y.narrow(1, r0, n).copy_(part);
  }
  return y;
}

// g2 [m, out] -> g2 W [m, in], accumulated chunk by chunk.
at::Tensor input_grad_rows(const at::Tensor& g2, const QWeight& w) {
  const int64_t out = w.data.size(0), chunk = chunk_rows(w);
  at::Tensor gx;
  for (int64_t r0 = 0; r0 < out; r0 += chunk) {
    const int64_t n = std::min(chunk, out - r0);
    const at::Tensor wt = rows_of(w, r0, n, g2);
    const at::Tensor gp = g2.narrow(1, r0, n);
    if (!gx.defined()) {
      gx = at::mm(gp, wt);
    } else {
      gx.addmm_(gp, wt);
    }
  }
  return gx;
}

void check(const at::Tensor& x, const QWeight& w) {
  TORCH_CHECK(w.data.scalar_type() == at::kByte && w.data.dim() == 2 && w.data.is_contiguous() &&
                  w.data.device().is_cpu(),
              "quantized linear: the weight's blocks must be contiguous uint8 [out, row_bytes] on "
              "the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.in, "quantized linear: input ", x.sizes(),
              " does not end in in_features = ", w.in);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "quantized linear: the input must be floating point, got ", x.scalar_type());
}

class QuantLinear : public torch::autograd::Function<QuantLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& data,
                            int64_t ty, int64_t in, int64_t decode,
                            const std::optional<at::Tensor>& bias) {
    const QWeight w{data, static_cast<int32_t>(ty), in, reinterpret_cast<Dequantize>(decode)};
    check(x, w);
    const at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()) : at::Tensor();
    at::Tensor y = forward_rows(x.reshape({-1, in}), w, b);
    ctx->saved_data["data"] = data;
    ctx->saved_data["ty"] = ty;
    ctx->saved_data["in"] = in;
    ctx->saved_data["decode"] = decode;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    auto sizes = x.sizes().vec();
    sizes.back() = data.size(0);
    return y.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) {
      const QWeight w{ctx->saved_data["data"].toTensor(),
                      static_cast<int32_t>(ctx->saved_data["ty"].toInt()),
                      ctx->saved_data["in"].toInt(),
                      reinterpret_cast<Dequantize>(ctx->saved_data["decode"].toInt())};
      const at::Tensor g2 = grads[0].reshape({-1, w.data.size(0)}).contiguous();
      gx = input_grad_rows(g2, w).view(ctx->saved_data["x_sizes"].toIntVector());
    }
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

const at::Tensor& tensor(const void* t) { return *static_cast<const at::Tensor*>(t); }

}  // namespace

extern "C" {

// Writes a new at::Tensor* holding `x W^T + b` (the QuantLinear node) to `*out`; `bias` may be
// nullptr. Returns nullptr, or the error message (free it with loratch_free_string).
char* loratch_quant_linear(const void* x, const void* data, int32_t ty, int64_t in,
                           Dequantize decode, const void* bias, void** out) {
  return loratch_guard("unknown C++ exception in the quantized linear", [&] {
    std::optional<at::Tensor> b;
    if (bias != nullptr) b = tensor(bias);
    at::Tensor y = QuantLinear::apply(tensor(x), tensor(data), static_cast<int64_t>(ty), in,
                                      reinterpret_cast<int64_t>(decode), b);
    *out = new at::Tensor(std::move(y));
  });
}

// Writes a new at::Tensor* holding `g W` for `g` [m, out] (no autograd): the gradient that reaches
// the input of a quantized linear, for callers that run the backward by hand (the loss's head).
char* loratch_quant_input_grad(const void* g, const void* data, int32_t ty, int64_t in,
                               Dequantize decode, void** out) {
  return loratch_guard("unknown C++ exception in the quantized linear", [&] {
    const QWeight w{tensor(data), ty, in, decode};
    const at::Tensor& g2 = tensor(g);
    TORCH_CHECK(g2.dim() == 2 && g2.size(1) == w.data.size(0), "quantized linear: gradient ",
                g2.sizes(), " is not [rows, out = ", w.data.size(0), "]");
    at::NoGradGuard no_grad;
    *out = new at::Tensor(input_grad_rows(g2.contiguous(), w));
  });
}

// Rows `rows` (int64 [n]) of the weight, decoded into a new float tensor [n, in] of `like`'s dtype
// and device (an embedding lookup into a quantized table).
char* loratch_quant_rows(const void* data, int32_t ty, int64_t in, Dequantize decode,
                         const void* rows, const void* like, void** out) {
  return loratch_guard("unknown C++ exception in the quantized embedding", [&] {
    const at::Tensor ids = tensor(rows).to(at::kCPU, at::kLong).contiguous();
    const at::Tensor picked = tensor(data).index_select(0, ids);
    const QWeight w{picked, ty, in, decode};
    at::NoGradGuard no_grad;
    const at::Tensor& l = tensor(like);
    *out = new at::Tensor(rows_of(w, 0, picked.size(0), l).clone());
  });
}

// Writes a new at::Tensor* holding `x W^T + b` for a float32 CPU weight `w` [out, in] (contiguous,
// `in` a multiple of 32) and an input of at most 8 rows, outside autograd: generation's decoding
// steps, where each product reads all of W for one row. Threads take blocks of W's rows and run
// quant_simd.cpp's AVX2 dot products on them (oneMKL's generic kernels, which stock PyTorch runs
// on AMD processors, read W at a fraction of the memory bandwidth). `bias` may be nullptr.
char* loratch_dense_few_rows(const void* x, const void* w, const void* bias, void** out) {
  return loratch_guard("unknown C++ exception in the decoding step's linear", [&] {
    const at::Tensor& wt = tensor(w);
    const at::Tensor& xt = tensor(x);
    TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == at::kFloat && wt.is_cpu() &&
                    wt.is_contiguous() && wt.size(1) % 32 == 0,
                "decoding-step linear: the weight must be a contiguous float32 CPU matrix whose "
                "rows are a multiple of 32 long, got ",
                wt.sizes());
    const int64_t in = wt.size(1), n_out = wt.size(0);
    TORCH_CHECK(xt.dim() >= 1 && xt.size(-1) == in && xt.scalar_type() == at::kFloat &&
                    xt.is_cpu(),
                "decoding-step linear: input ", xt.sizes(), " is not float32 on the CPU ending in ",
                in);
    TORCH_CHECK(loratch::quant_simd_cpu(), "decoding-step linear: this CPU lacks AVX2/FMA");
    at::NoGradGuard no_grad;
    const at::Tensor x2 = xt.reshape({-1, in}).contiguous();
    const int64_t m = x2.size(0);
    TORCH_CHECK(m >= 1 && m <= kFewRows, "decoding-step linear: ", m, " rows (at most ", kFewRows,
                ")");
    at::Tensor y = at::empty({m, n_out}, x2.options());
    const float* xp = x2.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const auto* wp = reinterpret_cast<const uint8_t*>(wt.data_ptr<float>());
    const int64_t rb = in * 4;
    // Blocks of rows of about 64 KiB of W each: enough work per task, many tasks per thread.
    const int64_t block = std::clamp<int64_t>((int64_t{16} << 10) / in, 1, n_out);
    at::parallel_for(0, (n_out + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * block, n = std::min(b1 * block, n_out) - r0;
      loratch::quant_simd_dot(0, wp + r0 * rb, rb, n, in, xp, m, yp + r0, n_out);
    });
    if (bias != nullptr) y.add_(tensor(bias));
    auto sizes = xt.sizes().vec();
    sizes.back() = n_out;
    *out = new at::Tensor(y.view(sizes));
  });
}

// Sets the largest number of float elements decoded at once (a test hook; > 0). Returns the
// previous value.
int64_t loratch_quant_chunk_elems(int64_t n) { return g_chunk_elems.exchange(n); }

}  // extern "C"
