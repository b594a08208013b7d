//! The causal-LM loss: shifted cross-entropy over target tokens, with the output head computed in
//! row chunks so the `[tokens, vocab]` logits never exist at once, in the forward or the backward.
//!
//! Only positions whose next label is a target (not [`IGNORE_INDEX`]) reach the head. For a
//! frozen head the backward is done by hand per chunk: the gradient of the summed loss with
//! respect to a row's logits is `softmax(logits) - onehot(label)`, so the gradient reaching the
//! hidden state is `(softmax - onehot) @ W`. It is handed to autograd once for all rows, and
//! the decoder's backward runs from there. A head carrying a LoRA adapter falls back to
//! autograd through the (still chunked) head.
use tch::{Kind, Tensor};

use crate::data::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::model::{CausalLm, Linear, LoraMode, Weight};
use crate::ops;

/// At most this many logits (rows x vocab) per chunk: 16 Mi floats, 64 MiB in float32.
const CHUNK_LOGITS: i64 = 16 << 20;

/// What [`causal_lm_loss`] computed.
#[derive(Debug)]
pub struct LossSum {
    /// The sum of the token losses (float32 losses summed in float64).
    pub sum: f64,
    /// The number of target tokens.
    pub n_tokens: i64,
    /// Each target token's loss, float32 `[n_tokens]`, in row-major order of the predicting
    /// positions (detached).
    pub token_losses: Tensor,
}

/// The flat indices `b * T + t` of the positions that predict a target (`labels[b, t + 1]` is
/// not [`IGNORE_INDEX`]), and those targets.
pub fn target_positions(labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let size = labels.size();
    if size.len() != 2 {
        return Err(Error::Shape(format!("labels must be [B, T], got {size:?}")));
    }
    let (b, t) = (size[0], size[1]);
    let device = labels.device();
    // next[b, t] = labels[b, t + 1]; the last position predicts nothing.
    let next = Tensor::f_cat(
        &[
            labels.f_narrow(1, 1, t - 1)?,
            Tensor::f_full([b, 1], IGNORE_INDEX, (Kind::Int64, device))?,
        ],
        1,
    )?
    .f_reshape([-1])?;
    let idx = next.f_ne(IGNORE_INDEX)?.f_nonzero()?.f_reshape([-1])?;
    let targets = next.f_index_select(0, &idx)?;
    Ok((idx, targets))
}

/// The summed loss of the targets in `labels` (`[B, T]`, unshifted: `labels[t + 1]` is the target
/// of position `t`) given the final hidden states `hidden` `[B, T, H]`.
///
/// With `backward = Some(scale)` it also back-propagates `scale * sum` through `hidden` into the
/// adapters' `.grad` (accumulating); with `None` it only computes the loss (call it under
/// `no_grad` then). Target ids must be in `[0, vocab)`.
pub fn causal_lm_loss(
    lm: &CausalLm,
    hidden: &Tensor,
    labels: &Tensor,
    mode: LoraMode,
    backward: Option<f64>,
) -> Result<LossSum> {
    let (idx, targets) = target_positions(labels)?;
    let n = idx.size()[0];
    let h = hidden.size();
    if h.len() != 3 || h[..2] != labels.size()[..] {
        return Err(Error::Shape(format!(
            "hidden states {h:?} do not match labels {:?}",
            labels.size()
        )));
    }
    let float_opts = (Kind::Float, hidden.device());
    if n == 0 {
        return Ok(LossSum {
            sum: 0.0,
            n_tokens: 0,
            token_losses: Tensor::f_zeros([0], float_opts)?,
        });
    }
    let vocab = lm.config.vocab_size;
    lm.config
        .check_ids(&targets, "label ids", &format!(" or {IGNORE_INDEX}"))?;
    let rows = hidden
        .f_reshape([-1, h[2]])?
        .f_index_select(0, &idx.f_to_device(hidden.device())?)?;
    let targets = targets.f_to_device(hidden.device())?;
    let chunk = (CHUNK_LOGITS / vocab).max(1);
    let head = &lm.lm_head;
    // Whether the head's adapter takes part; without one the head's backward is done here.
    let adapted = head.lora.is_some() && !head.merged && mode.enabled;
    let losses = if !adapted || backward.is_none() {
        let softcap = lm.config.final_softcap;
        manual_head_loss(
            head, adapted, softcap, &rows, &targets, chunk, mode, backward,
        )?
    } else {
        let logits = |x: &Tensor| lm.softcap_logits(head.forward(x, mode)?);
        autograd_head_loss(&logits, &rows, &targets, chunk, backward.unwrap_or(1.0))?
    };
    let token_losses = Tensor::f_cat(&losses, 0)?;
    // One read of a device value per batch (a sync on CUDA), however many chunks.
    let sum = token_losses.f_sum(Kind::Double)?.f_double_value(&[])?;
    Ok(LossSum {
        sum,
        n_tokens: n,
        token_losses,
    })
}

/// The token losses of `rows` against `targets`, chunk by chunk, with the head's backward done by
/// hand: autograd stops at `rows`, and with `backward = Some(scale)` the gradient reaching `rows`
/// (`(softmax - onehot) * scale @ W`) is handed to autograd once for all chunks. `adapted`: the
/// head's adapter takes part in the logits (only without a backward). `softcap`: Gemma 2's
/// `cap * tanh(z / cap)` on the logits, whose derivative `1 - (y / cap)^2` the gradient takes.
#[allow(clippy::too_many_arguments)]
fn manual_head_loss(
    head: &Linear,
    adapted: bool,
    softcap: Option<f64>,
    rows: &Tensor,
    targets: &Tensor,
    chunk: i64,
    mode: LoraMode,
    backward: Option<f64>,
) -> Result<Vec<Tensor>> {
    let n = rows.size()[0];
    let detached = rows.f_detach()?;
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk as usize) {
        let len = chunk.min(n - start);
        let x = detached.f_narrow(0, start, len)?;
        let tgt = targets.f_narrow(0, start, len)?;
        let logits = tch::no_grad(|| match (adapted, &head.weight) {
            (false, Weight::Dense(w)) => ops::head_logits(&x, w, head.bias.as_ref()),
            _ => head.forward(&x, mode),
        })?;
        let mut logits = logits.f_to_kind(Kind::Float)?;
        // The capped logits' derivative by the raw ones, `1 - (y / cap)^2`.
        let mut capped_slope = None;
        if let Some(cap) = softcap {
            logits = logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?;
            if backward.is_some() {
                let ratio = logits.f_div_scalar(cap)?;
                capped_slope = Some(ratio.f_square()?.f_neg()?.f_add_scalar(1.0)?);
            }
        }
        losses.push(ops::cross_entropy_(&mut logits, &tgt, backward)?);
        if let Some(slope) = capped_slope {
            logits = logits.f_mul(&slope)?;
        }
        if backward.is_some() {
            // `logits` now holds the gradient (softmax - onehot) * scale.
            let g = logits.f_to_kind(head.weight.kind())?;
            grads.push(match &head.weight {
                Weight::Dense(w) => ops::head_input_grad(&g, w)?,
                Weight::Quantized(q) => q.input_grad(&g)?,
            });
        }
    }
    if backward.is_some() && rows.requires_grad() {
        let grad = Tensor::f_cat(&grads, 0)?;
        // d(sum(rows * grad)) / d(rows) = grad: hands the head's gradient to autograd.
        rows.f_mul(&grad)?.f_sum(rows.f_kind()?)?.f_backward()?;
    }
    Ok(losses)
}

/// The token losses of `rows` against `targets` through a head whose adapter trains: autograd
/// through the (still chunked) head `logits_of`, back-propagating `scale * sum`.
fn autograd_head_loss(
    logits_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    rows: &Tensor,
    targets: &Tensor,
    chunk: i64,
    scale: f64,
) -> Result<Vec<Tensor>> {
    let n = rows.size()[0];
    let mut losses = Vec::new();
    let mut total: Option<Tensor> = None;
    for start in (0..n).step_by(chunk as usize) {
        let len = chunk.min(n - start);
        let x = rows.f_narrow(0, start, len)?;
        let tgt = targets.f_narrow(0, start, len)?;
        let logits = logits_of(&x)?.f_to_kind(Kind::Float)?;
        let loss = logits.f_cross_entropy_loss::<&Tensor>(
            &tgt,
            None,
            tch::Reduction::None,
            IGNORE_INDEX,
            0.0,
        )?;
        let part = loss.f_sum(Kind::Float)?;
        total = Some(match total {
            Some(t) => t.f_add(&part)?,
            None => part,
        });
        losses.push(loss.f_detach()?);
    }
    if let Some(t) = total {
        t.f_mul_scalar(scale)?.f_backward()?;
    }
    Ok(losses)
}
