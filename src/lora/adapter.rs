//! One LoRA adapter: the pair A `[r, in]`, B `[out, r]` with PEFT's default initialisation, its
//! forward contribution and its weight delta.
use super::config::LoraConfig;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The trainable pair of a LoRA adapter.
#[derive(Debug)]
pub struct Adapter {
    /// `lora_A.weight`, `[r, in_features]`, requires grad.
    pub a: Tensor,
    /// `lora_B.weight`, `[out_features, r]`, requires grad.
    pub b: Tensor,
    /// Its hyper-parameters.
    pub config: LoraConfig,
}

impl Adapter {
    /// A fresh adapter: A kaiming-uniform with `a = sqrt(5)` (the `nn.Linear` default, i.e.
    /// U(-1/sqrt(in), 1/sqrt(in))), B zeros, so it adds nothing until trained. Uses torch's global
    /// generator (`torch.manual_seed` makes it reproducible).
    pub fn new(
        in_features: i64,
        out_features: i64,
        config: LoraConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if in_features <= 0 || out_features <= 0 {
            return Err(Error::Config(format!(
                "in_features and out_features must be > 0, got {in_features} and {out_features}"
            )));
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = tch::no_grad(|| -> Result<Tensor> {
            let mut a = Tensor::f_empty([config.rank, in_features], (Kind::Float, device))?;
            let _ = a.f_uniform_(-bound, bound)?;
            Ok(a.f_to_kind(kind)?)
        })?
        .set_requires_grad(true);
        let b =
            Tensor::f_zeros([out_features, config.rank], (kind, device))?.set_requires_grad(true);
        Ok(Self { a, b, config })
    }

    /// The same adapter over the same tensors (shared storage, gradients and version counters).
    pub fn shallow_clone(&self) -> Self {
        Self {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            config: self.config,
        }
    }

    /// `in_features` of the adapted linear.
    pub fn in_features(&self) -> i64 {
        self.a.size()[1]
    }

    /// `out_features` of the adapted linear.
    pub fn out_features(&self) -> i64 {
        self.b.size()[0]
    }

    /// The adapted linear's forward: `x W^T + bias + scaling * B(A(dropout(x)))` through
    /// [`crate::ops::lora_linear`]. Dropout only when `training` and p > 0.
    pub fn forward_with_base(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        training: bool,
    ) -> Result<Tensor> {
        crate::ops::lora_linear(x, weight, bias, &self.term(), training)
    }

    /// The adapter's part of a LoRA linear, for the ops.
    pub fn term(&self) -> crate::ops::linear::LoraTerm<'_> {
        crate::ops::linear::LoraTerm {
            a: &self.a,
            b: &self.b,
            scaling: self.config.scaling(),
            dropout: self.config.dropout,
        }
    }

    /// `scaling * B @ A` in float32 (whatever the adapter's dtype), detached. A delta holding NaN or
    /// Inf is an [`Error::NonFinite`].
    pub fn delta_f32(&self) -> Result<Tensor> {
        let delta = tch::no_grad(|| -> Result<Tensor> {
            let a = self.a.f_to_kind(Kind::Float)?;
            let b = self.b.f_to_kind(Kind::Float)?;
            Ok(b.f_matmul(&a)?.f_mul_scalar(self.config.scaling())?)
        })?;
        if !all_finite(&delta)? {
            return Err(Error::NonFinite(
                "the LoRA delta scaling * B @ A contains NaN or Inf; weights left unchanged".into(),
            ));
        }
        Ok(delta)
    }

    /// Adds `sign * delta` to `weight` in place, computed in float32 and rounded once to the
    /// weight's dtype. The delta is checked before anything is written.
    pub fn add_delta_to(&self, weight: &mut Tensor, sign: f64) -> Result<()> {
        let delta = self.delta_f32()?;
        if weight.size() != delta.size() {
            return Err(Error::Shape(format!(
                "weight {:?} does not match the adapter delta {:?}",
                weight.size(),
                delta.size()
            )));
        }
        tch::no_grad(|| -> Result<()> {
            let updated = weight
                .f_to_kind(Kind::Float)?
                .f_add(&delta.f_mul_scalar(sign)?)?;
            weight.f_copy_(&updated)?;
            Ok(())
        })
    }
}

/// True when every element of `t` is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}
