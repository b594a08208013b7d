//! A projection of the model (`q_proj`, `down_proj`, ...): frozen weight and bias, plus an
//! optional LoRA adapter that can be enabled, disabled, merged and unmerged.
use super::loader::Loader;
use crate::error::Result;
use crate::lora::Adapter;
use tch::Tensor;

/// How adapters take part in a forward.
#[derive(Debug, Clone, Copy)]
pub struct LoraMode {
    /// Adapters add their term (unless merged).
    pub enabled: bool,
    /// Dropout active.
    pub training: bool,
}

/// A linear layer of the checkpoint with an optional adapter.
#[derive(Debug)]
pub struct Linear {
    /// `<path>.weight`, `[out, in]`, frozen.
    pub weight: Tensor,
    /// `<path>.bias`, `[out]`, frozen.
    pub bias: Option<Tensor>,
    /// The adapter, when LoRA targets this module.
    pub lora: Option<Adapter>,
    /// Whether the adapter is folded into `weight`.
    pub merged: bool,
}

impl Linear {
    /// Loads `<path>.weight` `[out, in]` (and `<path>.bias` when `bias`).
    pub fn load(vb: &Loader, in_f: i64, out_f: i64, bias: bool) -> Result<Self> {
        let weight = vb.tensor("weight", &[out_f, in_f])?;
        let bias = if bias {
            Some(vb.tensor("bias", &[out_f])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
            merged: false,
        })
    }

    /// A linear over an existing weight (the tied output head).
    pub fn from_weight(weight: Tensor) -> Self {
        Self {
            weight,
            bias: None,
            lora: None,
            merged: false,
        }
    }

    /// `in_features`.
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    /// `out_features`.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x W^T + b`, plus the adapter's term when enabled and not merged
    /// ([`crate::ops::lora_linear`]); without an active adapter [`crate::ops::frozen_linear`].
    pub fn forward(&self, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
        match &self.lora {
            Some(ad) if mode.enabled && !self.merged => {
                ad.forward_with_base(x, &self.weight, self.bias.as_ref(), mode.training)
            }
            _ => crate::ops::frozen_linear(x, &self.weight, self.bias.as_ref()),
        }
    }

    /// Folds the adapter into the weight (no-op without adapter or when merged).
    pub fn merge(&mut self) -> Result<()> {
        if let (Some(ad), false) = (&self.lora, self.merged) {
            ad.add_delta_to(&mut self.weight, 1.0)?;
            self.merged = true;
        }
        Ok(())
    }

    /// Takes the adapter back out of the weight (no-op when not merged).
    pub fn unmerge(&mut self) -> Result<()> {
        if let (Some(ad), true) = (&self.lora, self.merged) {
            ad.add_delta_to(&mut self.weight, -1.0)?;
            self.merged = false;
        }
        Ok(())
    }

    /// Checks that merging would succeed (finite delta) without changing anything.
    pub fn check_mergeable(&self) -> Result<()> {
        match &self.lora {
            Some(ad) if !self.merged => ad.delta_f32().map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Removes the adapter (unmerging first).
    pub fn remove_lora(&mut self) -> Result<()> {
        self.unmerge()?;
        self.lora = None;
        Ok(())
    }
}
