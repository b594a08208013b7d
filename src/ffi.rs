//! The foreign-function declarations of the C++ side (csrc/) and their safe wrappers: the fused
//! kernels that [`crate::ops`] chooses between (the LoRA and frozen linears and the row-split
//! product, csrc/lora_linear.cpp and csrc/blas.cpp; the blocked causal attention; RMSNorm, rotary
//! embedding and SwiGLU; the in-place cross-entropy), the activation-checkpointing node that runs a
//! Rust function (csrc/checkpoint.cpp), the optimizer's helpers (csrc/optim.cpp) and the libtorch
//! version. Only `ops` and the optimizer call this module; the Python tensor hand-over
//! has its own (`src/python/handover.rs`). Every call returns libtorch's error as
//! [`tch::TchError::Torch`] (the protocol of csrc/bridge.h).
use std::ffi::c_void;
use tch::Tensor;

extern "C" {
    fn loratch_torch_version() -> *const std::ffi::c_char;
    fn loratch_clear_grads(params: *const *const c_void, n: usize) -> *mut std::ffi::c_char;
    fn loratch_fill_missing_grads(params: *const *const c_void, n: usize) -> *mut std::ffi::c_char;
    fn loratch_grad_norm(
        grads: *const *const c_void,
        n: usize,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_fused_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        steps: *const *const c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut std::ffi::c_char;
    fn loratch_lora_linear(
        x: *const c_void,
        dropped: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        a: *const c_void,
        b: *const c_void,
        scaling: f64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_causal_attention(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        scale: f64,
        block: i64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_use_blas(on: bool) -> bool;
    fn loratch_frozen_linear(
        x: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_mm_rows(
        a: *const c_void,
        b: *const c_void,
        block_columns: i64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_rms_norm(
        input: *const c_void,
        weight: *const c_void,
        eps: f64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_rotary(
        x: *const c_void,
        cos: *const c_void,
        sin: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_swiglu(
        gate: *const c_void,
        up: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_gelu_tanh_glu(
        gate: *const c_void,
        up: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_cross_entropy(
        logits: *mut c_void,
        targets: *const c_void,
        scale: f64,
        grad: bool,
        losses: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_quant_linear(
        x: *const c_void,
        data: *const c_void,
        ty: i32,
        in_features: i64,
        decode: Dequantize,
        bias: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_quant_input_grad(
        g: *const c_void,
        data: *const c_void,
        ty: i32,
        in_features: i64,
        decode: Dequantize,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_quant_rows(
        data: *const c_void,
        ty: i32,
        in_features: i64,
        decode: Dequantize,
        rows: *const c_void,
        like: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_quant_chunk_elems(n: i64) -> i64;
    fn loratch_dense_few_rows(
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_checkpoint(
        x: *const c_void,
        params: *const *const c_void,
        n_params: usize,
        run: CheckpointRun,
        drop: CheckpointDrop,
        closure: *mut c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn loratch_grad_enabled() -> bool;
    fn loratch_copy_message(message: *const std::ffi::c_char) -> *mut std::ffi::c_char;
    fn loratch_free_string(s: *mut std::ffi::c_char);
}

/// csrc/checkpoint.cpp's `loratch_checkpoint_run`.
type CheckpointRun = unsafe extern "C" fn(
    closure: *mut c_void,
    input: *mut c_void,
    out: *mut *mut c_void,
) -> *mut std::ffi::c_char;

/// csrc/checkpoint.cpp's `loratch_checkpoint_drop`.
type CheckpointDrop = unsafe extern "C" fn(closure: *mut c_void);

/// The tensors of one fused AdamW step (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
/// runs): parameters, their gradients, both moments, and float32 step counts that already count
/// this step. All lists have one entry per parameter.
pub struct FusedAdamW<'a> {
    pub params: &'a [&'a Tensor],
    pub grads: &'a [&'a Tensor],
    pub exp_avgs: &'a [&'a Tensor],
    pub exp_avg_sqs: &'a [&'a Tensor],
    pub steps: &'a [&'a Tensor],
}

/// Runs one fused AdamW step in place; libtorch's error (as [`tch::TchError::Torch`]) on failure.
pub fn fused_adamw(
    t: &FusedAdamW,
    lr: f64,
    betas: (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> Result<(), tch::TchError> {
    let n = t.params.len();
    let lists = [t.grads, t.exp_avgs, t.exp_avg_sqs, t.steps];
    if lists.iter().any(|l| l.len() != n) {
        return Err(tch::TchError::Torch(
            "fused AdamW: tensor lists of different lengths".into(),
        ));
    }
    let ptrs = |l: &[&Tensor]| -> Vec<*const c_void> {
        l.iter().map(|t| t.as_ptr() as *const c_void).collect()
    };
    let (p, g, m, v, s) = (
        ptrs(t.params),
        ptrs(t.grads),
        ptrs(t.exp_avgs),
        ptrs(t.exp_avg_sqs),
        ptrs(t.steps),
    );
    // SAFETY: every pointer is a live at::Tensor* borrowed for the call; each array has n entries.
    let err = unsafe {
        loratch_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            lr,
            betas.0,
            betas.1,
            weight_decay,
            eps,
        )
    };
    // SAFETY: `err` comes straight from a bridge call.
    unsafe { take_error(err) }
}

/// `x W^T + bias + scaling * (x_d A^T) B^T` as one autograd node (csrc/lora_linear.cpp), where
/// `x_d` is `dropped` (dropout(x), differentiated by the caller's graph) or else `x`. `x` is
/// `[..., in]`, `weight` `[out, in]`, `a` `[r, in]`, `b` `[out, r]`, all of one dtype and device;
/// the result is `[..., out]`. Gradients flow to every input that requires them.
pub fn lora_linear(
    x: &Tensor,
    dropped: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null(), ptr);
    // SAFETY: every pointer is null (where allowed) or a live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe {
        loratch_lora_linear(
            ptr(x),
            opt(dropped),
            ptr(weight),
            opt(bias),
            ptr(a),
            ptr(b),
            scaling,
            out,
        )
    })
}

/// `softmax(q k^T * scale + causal mask) v` as one autograd node (csrc/causal_attention.cpp):
/// `q` `[B, H, T, D]`, `k` and `v` `[B, KV, T, D]` with `H` a multiple of `KV` (query head `h`
/// reads key head `h / (H / KV)`); the result is `[B, H, T, D]`. Queries go in blocks of `block`
/// positions, each multiplied only with the keys it may see. Saves the attention probabilities
/// for the backward (`B * H * T * T * 4` bytes), so it suits short sequences. The result is laid
/// out `[B, T, H, D]` in memory, so its `transpose(1, 2)` is contiguous.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    block: i64,
) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: all three pointers are live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe { loratch_causal_attention(ptr(q), ptr(k), ptr(v), scale, block, out) })
}

/// `x W^T + bias` outside autograd for a float32 CPU weight whose rows are a multiple of 32 long
/// and an input of at most 8 rows (csrc/quant_linear.cpp's AVX2 dot products): generation's
/// decoding steps. An error where the CPU lacks AVX2/FMA or the shapes do not fit.
pub fn dense_few_rows(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, tch::TchError> {
    call_linear(loratch_dense_few_rows, x, weight, bias)
}

/// A C entry point computing `x W^T + bias` (`bias` may be null) into a new at::Tensor*.
type LinearEntry = unsafe extern "C" fn(
    *const c_void,
    *const c_void,
    *const c_void,
    *mut *mut c_void,
) -> *mut std::ffi::c_char;

/// Calls a [`LinearEntry`] on borrowed tensors.
fn call_linear(
    entry: LinearEntry,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    let b = bias.map_or(std::ptr::null(), ptr);
    // SAFETY: x and weight are live at::Tensor* borrowed for the call; b is one too, or null.
    new_tensor(|out| unsafe { entry(ptr(x), ptr(weight), b, out) })
}

/// `x W^T + bias` as one autograd node (csrc/lora_linear.cpp) for a projection without an active
/// adapter while training: on CPU in float32 its products split rows over the threads as
/// [`lora_linear`]'s do; elsewhere libtorch's `linear`.
pub fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, tch::TchError> {
    call_linear(loratch_frozen_linear, x, weight, bias)
}

/// `a @ b` for `a` `[m, k]` and `b` `[k, n]`, without autograd (csrc/blas.cpp). On CPU in float32
/// with 2 to 4 threads and at least 64 rows per thread, the rows are dealt out to the threads and
/// each computes its rows single-threaded; with fewer rows, whole blocks of columns are (at least
/// one block and 64 columns per thread; without `block_columns`, one block per thread); otherwise
/// libtorch's `mm`. On CPU in blocks of at most `block_columns` columns (0: all at once).
pub fn mm_rows(a: &Tensor, b: &Tensor, block_columns: i64) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: both pointers are live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe { loratch_mm_rows(ptr(a), ptr(b), block_columns, out) })
}

/// Test hook of the C++ ops ([`causal_attention`], [`lora_linear`]): whether their products call
/// libtorch's BLAS `sgemm_` directly (`true`, the default) or go through ATen (the fallback for a
/// libtorch without `sgemm_`). Returns the previous setting. Process-wide.
#[doc(hidden)]
pub fn use_blas(on: bool) -> bool {
    // SAFETY: swaps a process-wide atomic flag.
    unsafe { loratch_use_blas(on) }
}

/// `weight * (x * rsqrt(mean(x^2, -1) + eps))` as one autograd node (csrc/rms_norm.cpp): `input`
/// `[..., H]` and `weight` `[H]`, float32 on CPU; the result has the input's shape.
pub fn rms_norm(input: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: both pointers are live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe { loratch_rms_norm(ptr(input), ptr(weight), eps, out) })
}

/// The rotary embedding `x * cos + rotate_half(x) * sin` (transformers' "rotate half") as one
/// autograd node (csrc/rotary.cpp), which also moves the heads in front: `x` `[B, T, H, D]`,
/// `cos` and `sin` `[1 or B, 1, T, D]`, float32 on CPU; the result is `[B, H, T, D]`, contiguous.
/// Gradients flow to `x` only.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: all three pointers are live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe { loratch_rotary(ptr(x), ptr(cos), ptr(sin), out) })
}

/// `silu(gate) * up` as one autograd node (csrc/swiglu.cpp): equal shapes, float32 on CPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: both pointers are live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe { loratch_swiglu(ptr(gate), ptr(up), out) })
}

/// `gelu(gate, approximate="tanh") * up` as one autograd node (csrc/gelu_glu.cpp): equal shapes,
/// float32 on CPU.
pub fn gelu_tanh_glu(gate: &Tensor, up: &Tensor) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: both pointers are live at::Tensor* borrowed for the call.
    new_tensor(|out| unsafe { loratch_gelu_tanh_glu(ptr(gate), ptr(up), out) })
}

/// The softmax cross-entropy of each row of `logits` `[rows, vocab]` (float32, contiguous, CPU)
/// against `targets` `[rows]` (int64 in `[0, vocab)`), as float32 `[rows]` (csrc/cross_entropy.cpp).
/// With `grad_scale = Some(s)` the logits are overwritten with the gradient of `s * sum(losses)`,
/// `s * (softmax - onehot)`; with `None` they are left as they are. Nothing is written on error.
pub fn cross_entropy_(
    logits: &mut Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<Tensor, tch::TchError> {
    let x = logits.as_mut_ptr() as *mut c_void;
    let t = targets.as_ptr() as *const c_void;
    let (grad, scale) = (grad_scale.is_some(), grad_scale.unwrap_or(1.0));
    // SAFETY: `x` is a live at::Tensor* borrowed mutably for the call, `t` a live one borrowed.
    new_tensor(|out| unsafe { loratch_cross_entropy(x, t, scale, grad, out) })
}

/// The function of one tensor that a [`checkpoint`] node runs: its output, or an error message.
/// Called from whichever thread runs the forward or the backward, never from two at once.
pub type CheckpointFn = dyn Fn(&Tensor) -> Result<Tensor, String> + Send;

/// `f(x)` as one autograd node that keeps only `x` and recomputes `f`'s inside in the backward
/// (csrc/checkpoint.cpp), `params` being the tensors inside `f` that require gradients. `f` is
/// freed when the last node holding it goes. An error of `f` in the forward is returned here; one
/// in the backward (or a panic, caught) becomes the backward's error.
pub fn checkpoint(
    x: &Tensor,
    params: &[&Tensor],
    f: Box<CheckpointFn>,
) -> Result<Tensor, tch::TchError> {
    let ptrs: Vec<*const c_void> = params.iter().map(|t| t.as_ptr() as *const c_void).collect();
    // A thin pointer to the (fat) boxed closure; the node owns it from the call on.
    let closure = Box::into_raw(Box::new(f)) as *mut c_void;
    // SAFETY: x and every params pointer are live at::Tensor* borrowed for the call; `closure` is
    // a Box<Box<CheckpointFn>> that `run_checkpoint_fn` and `drop_checkpoint_fn` expect.
    new_tensor(|out| unsafe {
        loratch_checkpoint(
            x.as_ptr() as *const c_void,
            ptrs.as_ptr(),
            ptrs.len(),
            run_checkpoint_fn,
            drop_checkpoint_fn,
            closure,
            out,
        )
    })
}

/// The `run` of [`checkpoint`]'s node: calls the closure, turning its error or panic into a
/// message for the C++ side (which throws it), so nothing unwinds across the boundary.
unsafe extern "C" fn run_checkpoint_fn(
    closure: *mut c_void,
    input: *mut c_void,
    out: *mut *mut c_void,
) -> *mut std::ffi::c_char {
    // SAFETY: the node hands over a new owning at::Tensor*.
    let input = unsafe { Tensor::from_ptr(input.cast()) };
    // SAFETY: `closure` is the Box<Box<CheckpointFn>> made by `checkpoint`, alive while its node
    // is, and never called from two threads at once.
    let f = unsafe { &*(closure as *const Box<CheckpointFn>) };
    let message = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input))) {
        Ok(Ok(mut y)) => {
            // SAFETY: `out` is writable; the node takes over the at::Tensor* (and deletes it,
            // as tch's drop would).
            unsafe { *out = y.as_mut_ptr().cast() };
            std::mem::forget(y);
            return std::ptr::null_mut();
        }
        Ok(Err(message)) => message,
        Err(panic) => format!(
            "panic in a checkpointed function: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        ),
    };
    let message = std::ffi::CString::new(message.replace('\0', " "))
        .unwrap_or_else(|_| c"checkpointed function failed".to_owned());
    // SAFETY: copies a NUL-terminated string into malloc'ed memory that the C++ side frees.
    unsafe { loratch_copy_message(message.as_ptr()) }
}

/// The `drop` of [`checkpoint`]'s node: frees the closure.
unsafe extern "C" fn drop_checkpoint_fn(closure: *mut c_void) {
    // SAFETY: `closure` is the Box<Box<CheckpointFn>> made by `checkpoint`; the node calls this
    // once, when it goes.
    let f = unsafe { Box::from_raw(closure as *mut Box<CheckpointFn>) };
    // Dropping tensors does not panic; should it ever, it must not unwind into C++.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(f)));
}

/// Whether this thread records gradients (libtorch's grad mode: off under `tch::no_grad`).
pub fn grad_enabled() -> bool {
    // SAFETY: reads libtorch's thread-local grad mode.
    unsafe { loratch_grad_enabled() }
}

/// Makes each tensor's `.grad` undefined (`zero_grad(set_to_none=True)`), which tch 0.24 cannot.
pub fn clear_grads(params: &[&Tensor]) -> Result<(), tch::TchError> {
    let ptrs: Vec<*const c_void> = params.iter().map(|t| t.as_ptr() as *const c_void).collect();
    // SAFETY: every pointer is a live at::Tensor* borrowed for the call; the array has n entries.
    let err = unsafe { loratch_clear_grads(ptrs.as_ptr(), ptrs.len()) };
    // SAFETY: `err` comes straight from a bridge call.
    unsafe { take_error(err) }
}

/// Gives each tensor whose `.grad` is undefined a zero gradient of its shape and dtype.
pub fn fill_missing_grads(params: &[&Tensor]) -> Result<(), tch::TchError> {
    let ptrs: Vec<*const c_void> = params.iter().map(|t| t.as_ptr() as *const c_void).collect();
    // SAFETY: every pointer is a live at::Tensor* borrowed for the call; the array has n entries.
    let err = unsafe { loratch_fill_missing_grads(ptrs.as_ptr(), ptrs.len()) };
    // SAFETY: `err` comes straight from a bridge call.
    unsafe { take_error(err) }
}

/// The 2-norm of the float32 2-norms of `grads` (at least one), a 0-dim float32 tensor on the
/// first one's device: `clip_grad_norm_`'s total in one bridge call.
pub fn grad_norm(grads: &[&Tensor]) -> Result<Tensor, tch::TchError> {
    let ptrs: Vec<*const c_void> = grads.iter().map(|t| t.as_ptr() as *const c_void).collect();
    // SAFETY: every pointer is a live at::Tensor* borrowed for the call; the array has n entries.
    new_tensor(|out| unsafe { loratch_grad_norm(ptrs.as_ptr(), ptrs.len(), out) })
}

/// Runs a bridge call that returns null or an error message and, on success, has written a new
/// owning `at::Tensor*` to its argument; takes ownership of that tensor.
fn new_tensor(
    call: impl FnOnce(*mut *mut c_void) -> *mut std::ffi::c_char,
) -> Result<Tensor, tch::TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let err = call(&mut out);
    // SAFETY: `err` comes straight from a bridge call.
    unsafe { take_error(err) }?;
    // SAFETY: on success the bridge wrote a new owning at::Tensor* that nothing else holds.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// `Ok` for a null error pointer, else the message as [`tch::TchError::Torch`] (freed here).
///
/// # Safety
/// `err` must be null or a string returned by a bridge call, not yet freed.
unsafe fn take_error(err: *mut std::ffi::c_char) -> Result<(), tch::TchError> {
    if err.is_null() {
        return Ok(());
    }
    let msg = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
    loratch_free_string(err);
    Err(tch::TchError::Torch(msg))
}

/// The libtorch version this crate was compiled against (e.g. "2.11.0").
pub fn torch_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string literal.
    unsafe { std::ffi::CStr::from_ptr(loratch_torch_version()) }
        .to_string_lossy()
        .into_owned()
}

/// The block decoder the quantized ops call back (csrc/quant_linear.cpp): `n` floats of block
/// format `ty` from `src_len` bytes at `src` into `dst`; 0 on success. Must be thread-safe.
pub type Dequantize =
    extern "C" fn(ty: i32, src: *const u8, src_len: i64, dst: *mut f32, n: i64) -> i32;

/// A block-quantized weight as the C++ ops take it: uint8 rows `[out, row_bytes]` (contiguous,
/// CPU), the block format's code for `decode`, and `in_features`.
pub struct QuantRows<'a> {
    pub data: &'a Tensor,
    pub ty: i32,
    pub in_features: i64,
    pub decode: Dequantize,
}

/// `x W^T + bias` for a block-quantized `W` as one autograd node (csrc/quant_linear.cpp) that
/// decodes W chunk by chunk in the forward and again in the backward, saving none of it. `x` is
/// `[..., in]`; gradients flow to `x` only.
pub fn quant_linear(
    x: &Tensor,
    w: &QuantRows,
    bias: Option<&Tensor>,
) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    let b = bias.map_or(std::ptr::null(), ptr);
    // SAFETY: x, w.data and bias (or null) are live at::Tensor* borrowed for the call; `decode`
    // is a thread-safe extern "C" function.
    new_tensor(|out| unsafe {
        loratch_quant_linear(ptr(x), ptr(w.data), w.ty, w.in_features, w.decode, b, out)
    })
}

/// `g W` for `g` `[rows, out]` and a block-quantized `W`, without autograd.
pub fn quant_input_grad(g: &Tensor, w: &QuantRows) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: as in [`quant_linear`].
    new_tensor(|out| unsafe {
        loratch_quant_input_grad(ptr(g), ptr(w.data), w.ty, w.in_features, w.decode, out)
    })
}

/// Rows `rows` (int64 `[n]`) of a block-quantized `W`, decoded into `[n, in]` of `like`'s dtype
/// and device.
pub fn quant_rows(w: &QuantRows, rows: &Tensor, like: &Tensor) -> Result<Tensor, tch::TchError> {
    let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
    // SAFETY: as in [`quant_linear`].
    new_tensor(|out| unsafe {
        loratch_quant_rows(
            ptr(w.data),
            w.ty,
            w.in_features,
            w.decode,
            ptr(rows),
            ptr(like),
            out,
        )
    })
}

/// Test hook: the largest number of float elements the quantized ops decode at once (> 0).
/// Returns the previous value. Process-wide.
#[doc(hidden)]
pub fn quant_chunk_elems(n: i64) -> i64 {
    // SAFETY: swaps a process-wide atomic.
    unsafe { loratch_quant_chunk_elems(n.max(1)) }
}
