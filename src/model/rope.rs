//! The rotary position embedding's tables: inverse frequencies and the `cos`/`sin` of each
//! position, with the scalings transformers implements for the supported families: Llama 3.1's
//! (`"llama3"`), `"linear"` (Gemma 3's global layers) and Phi-3's `"longrope"`. Applying them is
//! [`crate::ops::rotary`].
use super::config::{RopeParams, RopeScaling};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// The inverse frequencies of one set of layers, `[head_dim / 2]`, float32.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
    /// longrope: the frequencies used once a forward reaches past this many positions.
    long: Option<(Tensor, i64)>,
    /// longrope: the factor on cos and sin.
    attention_factor: Option<f64>,
}

impl Rope {
    /// `1 / theta^(2i / d)`, rescaled per the parameters' scaling when present.
    pub fn new(params: &RopeParams, head_dim: i64, max_pos: i64, device: Device) -> Result<Self> {
        let d = head_dim;
        // Computed in float32 torch ops exactly as transformers does, so the angles agree bitwise.
        let exps = Tensor::f_arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(d as f64)?;
        let powers = Tensor::f_pow_scalar(params.theta, &exps)?;
        let inv_freq = powers.f_reciprocal()?;
        let on_device = |t: Tensor| t.f_to_device(device);
        let Some(s) = &params.scaling else {
            return Ok(Self {
                inv_freq: on_device(inv_freq)?,
                long: None,
                attention_factor: None,
            });
        };
        let factor = s.factor.unwrap_or(1.0);
        Ok(match s.rope_type.as_str() {
            "linear" => Self {
                inv_freq: on_device(inv_freq.f_div_scalar(factor)?)?,
                long: None,
                attention_factor: None,
            },
            "longrope" => {
                // Config parsing guarantees both factor lists and the original length.
                let original = s.original_max_position_embeddings.unwrap_or(max_pos);
                let scaled = |f: &Option<Vec<f64>>| -> Result<Tensor> {
                    let f: Vec<f32> = f.iter().flatten().map(|&x| x as f32).collect();
                    Ok(Tensor::f_from_slice(&f)?.f_mul(&powers)?.f_reciprocal()?)
                };
                Self {
                    inv_freq: on_device(scaled(&s.short_factor)?)?,
                    long: Some((on_device(scaled(&s.long_factor)?)?, original)),
                    attention_factor: Some(longrope_attention_factor(s, max_pos, original)),
                }
            }
            // "llama3" (the only other type config parsing lets through).
            _ => {
                let inv: Vec<f64> = Vec::<f32>::try_from(&inv_freq)?
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let scaled: Vec<f32> = llama3_scale(&inv, s, max_pos)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                Self {
                    inv_freq: on_device(Tensor::f_from_slice(&scaled)?)?,
                    long: None,
                    attention_factor: None,
                }
            }
        })
    }

    /// longrope: the sequence length past which the long factors apply.
    pub fn switch_length(&self) -> Option<i64> {
        self.long.as_ref().map(|(_, original)| *original)
    }

    /// `(cos, sin)` of shape `[B, 1, T, head_dim]` in `kind`, for `positions` `[B, T]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let inv_freq = match &self.long {
            // As transformers: the long factors once the forward reaches past the original length.
            Some((long, original))
                if positions.numel() > 0
                    && positions.f_max()?.f_int64_value(&[])? + 1 > *original =>
            {
                long
            }
            _ => &self.inv_freq,
        };
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        let (mut cos, mut sin) = (emb.f_cos()?, emb.f_sin()?);
        if let Some(a) = self.attention_factor {
            cos = cos.f_mul_scalar(a)?;
            sin = sin.f_mul_scalar(a)?;
        }
        Ok((cos.f_to_kind(kind)?, sin.f_to_kind(kind)?))
    }
}

/// longrope's factor on cos and sin: given, or `sqrt(1 + ln(factor) / ln(original))` with
/// `factor` given or `max_position_embeddings / original`.
fn longrope_attention_factor(s: &RopeScaling, max_pos: i64, original: i64) -> f64 {
    let factor = s.factor.unwrap_or(max_pos as f64 / original as f64);
    s.attention_factor.unwrap_or(if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
    })
}

/// Llama 3.1 scaling: low frequencies divided by `factor`, high ones kept, smooth in between.
fn llama3_scale(inv: &[f64], s: &RopeScaling, max_pos: i64) -> Vec<f64> {
    let factor = s.factor.unwrap_or(1.0);
    let old_ctx = s.original_max_position_embeddings.unwrap_or(max_pos) as f64;
    let low_wavelen = old_ctx / s.low_freq_factor;
    let high_wavelen = old_ctx / s.high_freq_factor;
    inv.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old_ctx / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}
