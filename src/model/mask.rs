//! Boolean attention masks (true = attend) for cached decoding and padded batches.
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Causal mask for `t` new queries after `past` cached keys: `[1, 1, t, past + t]`.
pub fn causal_mask(past: i64, t: i64, device: Device) -> Result<Tensor> {
    let q = Tensor::f_arange_start(past, past + t, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(past + t, (Kind::Int64, device))?.f_unsqueeze(0)?;
    Ok(k.f_le_tensor(&q)?.f_unsqueeze(0)?.f_unsqueeze(0)?)
}

/// Causal-and-padding mask `[B, 1, t, S]` from a `[B, S]` attention mask. Every query may attend
/// to itself, so rows of padding never become all-masked (which would give NaN).
pub fn attention_mask_4d(mask: &Tensor, past: i64, t: i64) -> Result<Tensor> {
    let s = mask.size()[1];
    let device = mask.device();
    let causal = causal_mask(past, t, device)?;
    let keys = mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
    let q = Tensor::f_arange_start(past, past + t, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(s, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let diag = k.f_eq_tensor(&q)?.f_unsqueeze(0)?.f_unsqueeze(0)?;
    Ok(causal.f_logical_and(&keys)?.f_logical_or(&diag)?)
}
