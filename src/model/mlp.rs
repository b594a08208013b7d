//! `mlp`: the gated feed-forward block, `down_proj(act(gate) * up)`, with SwiGLU (`silu`: Llama,
//! Mistral, Qwen, Phi-3) or GeGLU-tanh (Gemma) ([`crate::ops::swiglu`],
//! [`crate::ops::gelu_tanh_glu`]); gate and up as two projections or, for Phi-3, one fused
//! `gate_up_proj` split after the product.
use super::config::Activation;
use super::linear::{Linear, LoraMode};
use super::loader::Loader;
use crate::error::Result;
use tch::Tensor;

/// The gate and up projections as the checkpoint stores them.
#[derive(Debug)]
pub enum GateUp {
    /// `gate_proj` and `up_proj`.
    Separate { gate_proj: Linear, up_proj: Linear },
    /// `gate_up_proj`: gate rows, then up rows (Phi-3).
    Fused { gate_up_proj: Linear },
}

/// `mlp`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_up: GateUp,
    pub down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    /// Loads the projections of a `hidden -> intermediate -> hidden` block.
    pub fn load(
        vb: &Loader,
        hidden: i64,
        intermediate: i64,
        activation: Activation,
        fused: bool,
    ) -> Result<Self> {
        let gate_up = match fused {
            true => GateUp::Fused {
                gate_up_proj: Linear::load(
                    &vb.pp("gate_up_proj"),
                    hidden,
                    2 * intermediate,
                    false,
                )?,
            },
            false => GateUp::Separate {
                gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, intermediate, false)?,
                up_proj: Linear::load(&vb.pp("up_proj"), hidden, intermediate, false)?,
            },
        };
        Ok(Self {
            gate_up,
            down_proj: Linear::load(&vb.pp("down_proj"), intermediate, hidden, false)?,
            activation,
        })
    }

    /// The same block over the same tensors.
    pub fn shallow_clone(&self) -> Self {
        Self {
            gate_up: match &self.gate_up {
                GateUp::Separate { gate_proj, up_proj } => GateUp::Separate {
                    gate_proj: gate_proj.shallow_clone(),
                    up_proj: up_proj.shallow_clone(),
                },
                GateUp::Fused { gate_up_proj } => GateUp::Fused {
                    gate_up_proj: gate_up_proj.shallow_clone(),
                },
            },
            down_proj: self.down_proj.shallow_clone(),
            activation: self.activation,
        }
    }

    /// The block's projections under their names in the checkpoint (`gate_proj`, ...).
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                vec![("gate_proj", gate_proj), ("up_proj", up_proj)]
            }
            GateUp::Fused { gate_up_proj } => vec![("gate_up_proj", gate_up_proj)],
        };
        out.push(("down_proj", &self.down_proj));
        out
    }

    /// As [`linears`](Self::linears), mutably.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = match &mut self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                vec![("gate_proj", gate_proj), ("up_proj", up_proj)]
            }
            GateUp::Fused { gate_up_proj } => vec![("gate_up_proj", gate_up_proj)],
        };
        out.push(("down_proj", &mut self.down_proj));
        out
    }

    pub fn forward(&self, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward(x, mode)?, up_proj.forward(x, mode)?)
            }
            GateUp::Fused { gate_up_proj } => {
                // transformers' `chunk(2, dim=-1)`: two views of the product.
                let both = gate_up_proj.forward(x, mode)?;
                let half = gate_up_proj.out_features() / 2;
                (both.f_narrow(-1, 0, half)?, both.f_narrow(-1, half, half)?)
            }
        };
        let hidden = match self.activation {
            Activation::Silu => crate::ops::swiglu(&gate, &up)?,
            Activation::GeluTanh => crate::ops::gelu_tanh_glu(&gate, &up)?,
        };
        self.down_proj.forward(&hidden, mode)
    }
}
