//! The tensor ops that have a fused CPU kernel (csrc/, through [`crate::ffi`]) beside a composite
//! path of libtorch ops: RMSNorm, the rotary embedding, SwiGLU and GeGLU, causal attention, the
//! LoRA and frozen linears, the output head and the cross-entropy. Model and loss code call these
//! functions and never the FFI; each one picks its path through [`path`], the one decision, plus
//! only its own shape limits (written beside it).
//!
//! Inside a fused kernel, how its rows (or a head product's blocks of columns) are dealt out to the
//! threads (2 to 4 threads, at least 64 rows or columns each) is the kernel's own schedule, not a
//! choice of path: its results do not depend on it beyond float rounding.
//!
//! [`checkpoint`] (activation checkpointing) is not a kernel of its own but a node around any
//! function of one tensor (a decoder layer) that recomputes it in the backward.
use crate::error::Result;
use tch::{Device, Kind, Tensor};

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod cross_entropy;
pub mod head;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rotary;

pub use activation::{gelu_tanh_glu, swiglu};
pub use attention::{
    causal_attention, eager_attention, masked_attention, segment_attention, Scores,
};
pub use checkpoint::checkpoint;
pub use cross_entropy::cross_entropy_;
pub use head::{head_input_grad, head_logits};
pub use linear::{frozen_linear, lora_linear};
pub use norm::{rms_norm, rms_norm_f32_scale};
pub use rotary::rotary;

/// Which implementation of an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The C++ kernel of csrc/.
    Fused,
    /// libtorch's ops, as transformers writes them.
    Composite,
}

/// When an op may take its fused kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Only while some input records gradients. The fused kernels round differently from
    /// libtorch's composite ops (by float rounding), so forwards without gradients (inference,
    /// evaluation, generation) keep the composite ops and stay equal to transformers bit for bit.
    Training,
    /// Whenever the inputs suit the kernel: the loss's ops, whose results no reference compares
    /// bit for bit.
    Always,
}

/// The one decision between an op's fused CPU kernel and its composite path: fused when every
/// tensor is float32 on the CPU (the kernels' only layout) and, for [`When::Training`], some of
/// them record gradients.
pub fn path(tensors: &[&Tensor], when: When) -> Result<Path> {
    for t in tensors {
        if t.device() != Device::Cpu || t.f_kind()? != Kind::Float {
            return Ok(Path::Composite);
        }
    }
    let grads = tensors.iter().any(|t| t.requires_grad());
    Ok(match when {
        When::Always => Path::Fused,
        When::Training if grads => Path::Fused,
        When::Training => Path::Composite,
    })
}

/// Test hook of the fused kernels' products: whether they call libtorch's BLAS `sgemm_` directly
/// (`true`, the default) or go through ATen (the fallback for a libtorch without `sgemm_`).
/// Returns the previous setting. Process-wide.
#[doc(hidden)]
pub fn use_blas(on: bool) -> bool {
    crate::ffi::use_blas(on)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision() {
        let f32s = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let grads = f32s.copy().set_requires_grad(true);
        let f64s = Tensor::zeros([2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let fused = |ts: &[&Tensor], when| path(ts, when).unwrap() == Path::Fused;
        assert!(fused(&[&f32s, &grads], When::Training));
        assert!(!fused(&[&f32s, &f32s], When::Training));
        assert!(fused(&[&f32s], When::Always));
        assert!(!fused(&[&grads, &f64s], When::Training));
        assert!(!fused(&[&f64s], When::Always));
    }
}
