//! `LlamaRMSNorm`: `weight * (x / sqrt(mean(x^2) + eps))`, normalised in float32
//! ([`crate::ops::rms_norm`]).
use super::loader::Loader;
use crate::error::Result;
use tch::Tensor;

/// An RMSNorm of the checkpoint (`<path>.weight`).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `<path>.weight` `[dim]`.
    pub fn load(vb: &Loader, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.tensor("weight", &[dim])?,
            eps,
        })
    }

    /// The same norm over the same weight tensor.
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm(x, &self.weight, self.eps)
    }
}
