//! Boolean attention masks (true = attend) for cached decoding and padded batches, with an
//! optional sliding window ([`crate::ops::attention::causal_mask`] is the causal part).
use crate::error::Result;
use crate::ops::attention::causal_mask;
use tch::{Kind, Tensor};

/// Causal-and-padding mask `[B, 1, t, S]` from a `[B, S]` attention mask (keys within `window`
/// of their query when given). Every query may attend to itself, so rows of padding never become
/// all-masked (which would give NaN).
pub fn attention_mask_4d(mask: &Tensor, past: i64, t: i64, window: Option<i64>) -> Result<Tensor> {
    let s = mask.size()[1];
    let device = mask.device();
    let causal = causal_mask(past, t, window, device)?;
    let keys = mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
    let q = Tensor::f_arange_start(past, past + t, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(s, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let diag = k.f_eq_tensor(&q)?.f_unsqueeze(0)?.f_unsqueeze(0)?;
    Ok(causal.f_logical_and(&keys)?.f_logical_or(&diag)?)
}
