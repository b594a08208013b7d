//! AdamW over live parameter tensors, with fp32 state and fp32 master weights for bf16/fp16
//! parameters, gradient-norm clipping, and exact save/restore of its state.
//!
//! This file holds the type and its construction; the hyperparameters and the checks are in
//! `config`, the step paths and gradient clipping in `step`, the state's save/restore in `state`.
mod config;
mod state;
mod step;
#[cfg(test)]
mod tests;

use tch::{Kind, Tensor};

use crate::error::Result;
pub use config::AdamWConfig;

/// The optimizer state of one parameter.
#[derive(Debug)]
struct ParamState {
    /// First moment (fp32; fp64 for an fp64 parameter).
    exp_avg: Tensor,
    /// Second moment (same dtype as `exp_avg`).
    exp_avg_sq: Tensor,
    /// fp32 master weights of a bf16/fp16 parameter; `None` for fp32/fp64 parameters.
    master: Option<Tensor>,
    /// Steps this parameter has taken (it skips the steps where its gradient is undefined).
    step: u64,
}

/// `torch.optim.AdamW` (decoupled weight decay; the default single-tensor algorithm with
/// `amsgrad=False`, `maximize=False`) over parameter tensors shared with the model.
///
/// The optimizer holds handles to the same tensors as the model (shallow clones), so
/// [`AdamW::step`] updates the model's weights in place. State and update math are fp32 for
/// fp32, bf16 and fp16 parameters (fp64 for fp64 parameters): a bf16/fp16 parameter gets an fp32
/// master copy, taken at construction, which is updated and then rounded into the parameter.
/// A bf16/fp16 parameter must therefore not be written outside the optimizer after construction
/// (the write would be overwritten by the master at the next step), except through
/// [`AdamW::load_state`].
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Tensor>,
    states: Vec<ParamState>,
    /// The hyperparameters; `lr` changes with [`AdamW::set_lr`].
    config: AdamWConfig,
    step_count: u64,
}

/// The dtype of the optimizer state of a parameter of dtype `kind`.
fn state_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

impl AdamW {
    /// An AdamW over `params` (handles to the model's tensors: leaves with `requires_grad`, of a
    /// floating dtype, each given once) with the hyperparameters `config` (see [`AdamWConfig`]).
    /// Invalid values and parameters are an [`Error::Config`](crate::error::Error::Config)
    /// naming them (an integer/bool parameter is an [`Error::Dtype`](crate::error::Error::Dtype)).
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        config::check_params(&params)?;
        let states = tch::no_grad(|| -> Result<Vec<ParamState>> {
            params
                .iter()
                .map(|p| {
                    let kind = p.f_kind()?;
                    let sk = state_kind(kind);
                    let master = if kind == sk {
                        None
                    } else {
                        Some(p.f_detach()?.f_to_dtype(sk, false, true)?)
                    };
                    let like = master.as_ref().unwrap_or(p);
                    Ok(ParamState {
                        exp_avg: like.f_zeros_like()?,
                        exp_avg_sq: like.f_zeros_like()?,
                        master,
                        step: 0,
                    })
                })
                .collect()
        })?;
        Ok(Self {
            params,
            states,
            config,
            step_count: 0,
        })
    }

    /// Clears every parameter's gradient (`.grad` becomes undefined), as `torch.optim`'s default
    /// `zero_grad(set_to_none=True)`: a parameter that then receives no gradient is skipped by the
    /// next [`AdamW::step`], and the next backward stores its gradient instead of adding it to
    /// zeros.
    pub fn zero_grad(&mut self) -> Result<()> {
        Ok(crate::ffi::clear_grads(
            &self.params.iter().collect::<Vec<_>>(),
        )?)
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate of the next steps (finite, >= 0; else
    /// [`Error::Config`](crate::error::Error::Config)).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        config::check_lr(lr)?;
        self.config.lr = lr;
        Ok(())
    }

    /// The decoupled weight decay.
    pub fn weight_decay(&self) -> f64 {
        self.config.weight_decay
    }

    /// `(beta1, beta2)`.
    pub fn betas(&self) -> (f64, f64) {
        self.config.betas
    }

    /// The denominator's epsilon.
    pub fn eps(&self) -> f64 {
        self.config.eps
    }

    /// How many times [`AdamW::step`] has run (or the `step` given to [`AdamW::load_state`]).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// The parameter handles, in the order given to [`AdamW::new`].
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }
}
