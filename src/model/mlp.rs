//! `mlp`: the gated feed-forward block, `down_proj(act(gate_proj(x)) * up_proj(x))`, with SwiGLU
//! (`silu`) as Llama, Mistral and Qwen use it ([`crate::ops::swiglu`]).
use super::linear::{Linear, LoraMode};
use super::loader::Loader;
use crate::error::Result;
use tch::Tensor;

/// `mlp`: SwiGLU, `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// Loads the three projections of a `hidden -> intermediate -> hidden` block.
    pub fn load(vb: &Loader, hidden: i64, intermediate: i64) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(&vb.pp("gate_proj"), hidden, intermediate, false)?,
            up_proj: Linear::load(&vb.pp("up_proj"), hidden, intermediate, false)?,
            down_proj: Linear::load(&vb.pp("down_proj"), intermediate, hidden, false)?,
        })
    }

    /// The same block over the same tensors.
    pub fn shallow_clone(&self) -> Self {
        Self {
            gate_proj: self.gate_proj.shallow_clone(),
            up_proj: self.up_proj.shallow_clone(),
            down_proj: self.down_proj.shallow_clone(),
        }
    }

    pub fn forward(&self, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
        let (gate, up) = (
            self.gate_proj.forward(x, mode)?,
            self.up_proj.forward(x, mode)?,
        );
        self.down_proj
            .forward(&crate::ops::swiglu(&gate, &up)?, mode)
    }
}
