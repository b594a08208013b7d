//! RMSNorm of the checkpoint (`<path>.weight`): Llama's `weight * (x / sqrt(mean(x^2) + eps))`, or
//! with `unit_offset` Gemma's, which scales by `1 + weight` in float32
//! ([`crate::ops::rms_norm`], [`crate::ops::rms_norm_f32_scale`]).
use super::loader::Loader;
use crate::error::Result;
use tch::{Kind, Tensor};

/// An RMSNorm of the checkpoint (`<path>.weight`).
#[derive(Debug)]
pub struct RmsNorm {
    /// As the checkpoint stores it (for Gemma, without the 1).
    pub weight: Tensor,
    eps: f64,
    /// Gemma: `1 + weight` in float32, computed once at load.
    unit_offset_scale: Option<Tensor>,
}

impl RmsNorm {
    /// Loads `<path>.weight` `[dim]`; `unit_offset`: Gemma's `1 + weight`.
    pub fn load(vb: &Loader, dim: i64, eps: f64, unit_offset: bool) -> Result<Self> {
        let weight = vb.tensor("weight", &[dim])?;
        let unit_offset_scale = match unit_offset {
            true => Some(weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?),
            false => None,
        };
        Ok(Self {
            weight,
            eps,
            unit_offset_scale,
        })
    }

    /// The same norm over the same weight tensor.
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            eps: self.eps,
            unit_offset_scale: self.unit_offset_scale.as_ref().map(Tensor::shallow_clone),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.unit_offset_scale {
            Some(scale) => crate::ops::rms_norm_f32_scale(x, scale, self.eps),
            None => crate::ops::rms_norm(x, &self.weight, self.eps),
        }
    }
}
