//! A projection of the model (`q_proj`, `down_proj`, ...): frozen weight and bias, plus an
//! optional LoRA adapter that can be enabled, disabled, merged and unmerged.
use super::llama::trains_on_cpu_f32;
use super::weights::Checkpoint;
use crate::error::Result;
use crate::lora::Adapter;
use tch::{Device, Kind, Tensor};

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
    pub fn load(
        ck: &Checkpoint,
        path: &str,
        in_f: i64,
        out_f: i64,
        bias: bool,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let weight = ck.load(&format!("{path}.weight"), &[out_f, in_f], kind, device)?;
        let bias = if bias {
            Some(ck.load(&format!("{path}.bias"), &[out_f], kind, device)?)
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

    /// `x W^T + b`, plus the adapter's term when enabled and not merged. Without an active
    /// adapter, training on CPU in float32 runs [`crate::bridge::frozen_linear`] (its products
    /// split rows over the threads like the adapter's node); forwards without gradients keep
    /// libtorch's `linear`, equal to transformers' bit for bit.
    pub fn forward(&self, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
        match &self.lora {
            Some(ad) if mode.enabled && !self.merged => {
                ad.forward_with_base(x, &self.weight, self.bias.as_ref(), mode.training)
            }
            _ if trains_on_cpu_f32(&[x, &self.weight])? => Ok(crate::bridge::frozen_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
            )?),
            _ => Ok(x.f_linear(&self.weight, self.bias.as_ref())?),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The training forward without an adapter ([`crate::bridge::frozen_linear`]: rows split over
    /// 2 threads from 128 rows) against libtorch's `linear`: output and the gradients of the
    /// input, a trainable weight and the bias, through BLAS and through ATen.
    #[test]
    fn frozen_training_forward_matches_linear() {
        tch::set_num_threads(2);
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let mode = LoraMode {
            enabled: true,
            training: true,
        };
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        for blas in [true, false] {
            let before = crate::bridge::use_blas(blas);
            for (rows, with_bias, w_grad) in
                [(131, false, false), (2 * 64, true, true), (9, true, false)]
            {
                let w0 = Tensor::randn([24, 40], opts) * 0.2;
                let b0 = Tensor::randn([24], opts);
                let x0 = Tensor::randn([rows, 40], opts);
                let up = Tensor::randn([rows, 24], opts);
                let run = |ours: bool| {
                    let x = x0.copy().set_requires_grad(true);
                    let w = w0.copy().set_requires_grad(w_grad);
                    let b = with_bias.then(|| b0.copy().set_requires_grad(w_grad));
                    let y = if ours {
                        let layer = Linear {
                            weight: w.shallow_clone(),
                            bias: b.as_ref().map(Tensor::shallow_clone),
                            lora: None,
                            merged: false,
                        };
                        layer.forward(&x, mode).unwrap()
                    } else {
                        x.linear(&w, b.as_ref())
                    };
                    (&y * &up).sum(Kind::Float).backward();
                    let grads = [
                        Some(x.grad()),
                        w_grad.then(|| w.grad()),
                        b.filter(|_| w_grad).map(|b| b.grad()),
                    ];
                    (y.detach(), grads)
                };
                let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
                let case = format!("blas {blas}, {rows} rows, bias {with_bias}, w_grad {w_grad}");
                assert!(diff(&y, &y_ref) <= 1e-5, "{case}: forward");
                for (got, want) in g.iter().zip(&g_ref) {
                    if let (Some(got), Some(want)) = (got, want) {
                        assert!(diff(got, want) <= 1e-4, "{case}: gradient");
                    }
                }
            }
            crate::bridge::use_blas(before);
        }
    }
}
