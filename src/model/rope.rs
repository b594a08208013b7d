//! The rotary position embedding's tables: inverse frequencies and the `cos`/`sin` of each
//! position, with Llama 3.1's frequency scaling (`rope_type: "llama3"`). Applying them is
//! [`crate::ops::rotary`].
use super::config::{ModelConfig, RopeScaling};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// The inverse frequencies of one model, `[head_dim / 2]`, float32.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// `1 / theta^(2i / d)`, rescaled per `rope_scaling` when present.
    pub fn new(cfg: &ModelConfig, device: Device) -> Result<Self> {
        let d = cfg.head_dim;
        // Computed in float32 torch ops exactly as transformers does, so the angles agree bitwise.
        let exps = Tensor::f_arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(d as f64)?;
        let inv_freq = Tensor::f_pow_scalar(cfg.rope_theta, &exps)?.f_reciprocal()?;
        let inv_freq = match &cfg.rope_scaling {
            Some(s) => {
                let inv: Vec<f64> = Vec::<f32>::try_from(&inv_freq)?
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let scaled: Vec<f32> = llama3_scale(&inv, s, cfg.max_position_embeddings)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                Tensor::f_from_slice(&scaled)?
            }
            None => inv_freq,
        };
        Ok(Self {
            inv_freq: inv_freq.f_to_device(device)?,
        })
    }

    /// `(cos, sin)` of shape `[B, 1, T, head_dim]` in `kind`, for `positions` `[B, T]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }
}

/// Llama 3.1 scaling: low frequencies divided by `factor`, high ones kept, smooth in between.
fn llama3_scale(inv: &[f64], s: &RopeScaling, max_pos: i64) -> Vec<f64> {
    let old_ctx = s.original_max_position_embeddings.unwrap_or(max_pos) as f64;
    let low_wavelen = old_ctx / s.low_freq_factor;
    let high_wavelen = old_ctx / s.high_freq_factor;
    inv.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (old_ctx / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}
