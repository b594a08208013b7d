//! AdamW's hyperparameters with their defaults, and the checks [`AdamW::new`](super::AdamW::new)
//! runs on them and on the parameters it is given.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// AdamW's hyperparameters. Callers set what they configure and take the rest from
/// [`Default`] (`AdamWConfig { lr, ..Default::default() }`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate of the first step (finite, >= 0); a schedule changes it later.
    pub lr: f64,
    /// `(beta1, beta2)`, each in [0, 1).
    pub betas: (f64, f64),
    /// Added to the denominator (finite, > 0).
    pub eps: f64,
    /// Decoupled weight decay (finite, >= 0), applied as `p *= 1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks every value; the first invalid one is an [`Error::Config`] naming it.
    pub fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        let wd = self.weight_decay;
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(Error::Config(format!(
                "weight_decay must be a finite number >= 0, got {wd}"
            )));
        }
        for (name, b) in [("betas[0]", self.betas.0), ("betas[1]", self.betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::Config(format!("{name} must be in [0, 1), got {b}")));
            }
        }
        let eps = self.eps;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::Config(format!(
                "eps must be a finite number > 0, got {eps}"
            )));
        }
        Ok(())
    }
}

/// A learning rate must be finite and >= 0 (at construction and at every `set_lr`).
pub(super) fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "lr must be a finite number >= 0, got {lr}"
        )))
    }
}

/// Checks that `params` is a non-empty list of distinct, dense, floating leaf tensors that
/// require grad: an [`Error::Config`] naming the first one that is not (an [`Error::Dtype`] for
/// an integer/bool one).
pub(super) fn check_params(params: &[Tensor]) -> Result<()> {
    if params.is_empty() {
        return Err(Error::Config("AdamW needs at least one parameter".into()));
    }
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for (i, p) in params.iter().enumerate() {
        if !p.defined() {
            return Err(Error::Config(format!(
                "parameter {i} is an undefined tensor"
            )));
        }
        let kind = p.f_kind()?;
        if !matches!(
            kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(Error::Dtype(format!(
                "parameter {i} has dtype {kind:?}; AdamW needs float32, float64, bfloat16 or \
                 float16 parameters"
            )));
        }
        if p.is_sparse() {
            return Err(Error::Config(format!(
                "parameter {i} is sparse; AdamW needs dense parameters"
            )));
        }
        if !p.requires_grad() {
            return Err(Error::Config(format!(
                "parameter {i} (shape {:?}) does not require grad",
                p.size()
            )));
        }
        if !p.f_is_leaf()? {
            return Err(Error::Config(format!(
                "parameter {i} (shape {:?}) is not a leaf tensor (it is the result of an \
                 operation on tensors that require grad)",
                p.size()
            )));
        }
        let ptr = p.data_ptr() as usize;
        if ptr != 0 {
            if let Some(j) = seen.insert(ptr, i) {
                return Err(Error::Config(format!(
                    "parameter {i} is the same tensor as parameter {j} (data_ptr {ptr:#x})"
                )));
            }
        }
    }
    Ok(())
}
