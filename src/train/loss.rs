//! The causal-LM loss: shifted cross-entropy over target tokens, with the output head computed in
//! row chunks so the `[tokens, vocab]` logits never exist at once, in the forward or the backward.
//!
//! Only positions whose next label is a target (not [`IGNORE_INDEX`]) reach the head. For a
//! frozen head the backward is done by hand per chunk: the gradient of the summed loss with
//! respect to a row's logits is `softmax(logits) - onehot(label)`, so the gradient reaching the
//! hidden state is `(softmax - onehot) @ W`. It is handed to autograd once for all rows, and
//! the decoder's backward runs from there. A head carrying a LoRA adapter falls back to
//! autograd through the (still chunked) head. A frozen head kept in a block format is walked in
//! chunks of the vocabulary instead ([`vocab_chunked_loss`]), so each of its rows is decoded once
//! per pass, not once per chunk of token rows.
use tch::{Device, Kind, Tensor};

use crate::data::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::model::{CausalLm, Linear, LoraMode, Weight};
use crate::ops;
use crate::ops::quant::QWeight;

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
    /// The target tokens whose logits' argmax (the first, as `torch.argmax`) is the label: TRL's
    /// `mean_token_accuracy` is `n_correct / n_tokens`.
    pub n_correct: i64,
}

/// How many of `targets` `[N]` equal the argmax of their row of `logits` `[N, V]`, as an int64
/// scalar tensor (not read back, so a chunk loop costs no device sync).
fn count_correct(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(logits
        .f_argmax(-1, false)?
        .f_eq_tensor(targets)?
        .f_sum(Kind::Int64)?)
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
    let pass = head_pass(lm, hidden, labels, mode, backward.map(Scale::Sum))?;
    if let Some((rows, grad)) = &pass.rows_grad {
        // d(sum(rows * grad)) / d(rows) = grad: hands the head's gradient to autograd.
        rows.f_mul(grad)?.f_sum(rows.f_kind()?)?.f_backward()?;
    }
    if let Some(total) = &pass.graph_sum {
        total.f_mul_scalar(backward.unwrap_or(1.0))?.f_backward()?;
    }
    // One read of device values per batch (a sync on CUDA), however many chunks.
    let both = Tensor::f_stack(
        &[
            pass.token_losses.f_sum(Kind::Double)?,
            pass.correct.f_to_kind(Kind::Double)?,
        ],
        0,
    )?;
    let both = Vec::<f64>::try_from(&both.f_to_device(Device::Cpu)?)?;
    Ok(LossSum {
        sum: both[0],
        n_tokens: pass.n_tokens,
        token_losses: pass.token_losses,
        n_correct: both[1] as i64,
    })
}

/// transformers' causal-LM loss (`ForCausalLMLoss`: the mean cross-entropy over the target
/// tokens of `labels`, unshifted as in [`causal_lm_loss`]) as a float32 0-dim tensor whose
/// backward reaches the adapters like the trainer's: the head is still computed in chunks and
/// its backward done by hand here, and the gradient reaching `hidden` (`(softmax - onehot) @ W /
/// n`) waits in the graph as the node `s - detach(s)`, `s = sum(rows * grad)`: worth exactly 0,
/// with gradient `grad` times whatever reaches the loss. Without target tokens the loss is NaN
/// with zero gradients, as transformers' mean over none. When `hidden` records no gradient the
/// tensor is the value alone.
pub fn mean_loss(
    lm: &CausalLm,
    hidden: &Tensor,
    labels: &Tensor,
    mode: LoraMode,
) -> Result<Tensor> {
    let grads = hidden.requires_grad();
    let pass = head_pass(lm, hidden, labels, mode, grads.then_some(Scale::Mean))?;
    let n = pass.n_tokens;
    let value = match &pass.graph_sum {
        Some(total) => return Ok(total.f_div_scalar(n as f64)?),
        None if n == 0 => f64::NAN,
        None => pass.token_losses.f_sum(Kind::Double)?.f_double_value(&[])? / n as f64,
    };
    let value = Tensor::f_from_slice(&[value as f32])?
        .f_reshape([])?
        .f_to_device(hidden.device())?;
    let zero_with_grad = match (&pass.rows_grad, grads) {
        (Some((rows, grad)), _) => rows.f_mul(grad)?.f_sum(Kind::Float)?,
        // No target: zero gradients, as transformers' (the graph still reaches the adapters).
        (None, true) => hidden.f_sum(Kind::Float)?.f_mul_scalar(0.0)?,
        (None, false) => return Ok(value),
    };
    let zero = zero_with_grad.f_sub(&zero_with_grad.f_detach()?)?;
    Ok(value.f_add(&zero)?)
}

/// How [`head_pass`] scales the gradient of the token losses' sum.
#[derive(Debug, Clone, Copy)]
enum Scale {
    /// By this factor.
    Sum(f64),
    /// By one over the number of target tokens (the mean's gradient).
    Mean,
}

/// What the head computed: the token losses, and for a backward either the gradient reaching the
/// target rows of the hidden states (the head done by hand) or, for a head with an adapter, the
/// autograd graph of the losses' sum.
struct HeadPass {
    n_tokens: i64,
    token_losses: Tensor,
    rows_grad: Option<(Tensor, Tensor)>,
    graph_sum: Option<Tensor>,
    /// How many targets are their row's argmax (an int64 scalar, not read back).
    correct: Tensor,
}

/// The head and the cross-entropy of [`causal_lm_loss`] and [`mean_loss`], in chunks; the
/// gradient handed back rather than back-propagated, so each caller decides when.
fn head_pass(
    lm: &CausalLm,
    hidden: &Tensor,
    labels: &Tensor,
    mode: LoraMode,
    backward: Option<Scale>,
) -> Result<HeadPass> {
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
        return Ok(HeadPass {
            n_tokens: 0,
            token_losses: Tensor::f_zeros([0], float_opts)?,
            rows_grad: None,
            graph_sum: None,
            correct: Tensor::f_zeros([], (Kind::Int64, hidden.device()))?,
        });
    }
    let backward = backward.map(|s| match s {
        Scale::Sum(scale) => scale,
        Scale::Mean => 1.0 / n as f64,
    });
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
    let softcap = lm.config.final_softcap;
    let (losses, grad, graph_sum, correct) =
        if let (false, Weight::Quantized(q)) = (adapted, &head.weight) {
            let (losses, grad, correct) = vocab_chunked_loss(
                CHUNK_LOGITS,
                q,
                head.bias.as_ref(),
                softcap,
                &rows,
                &targets,
                backward,
            )?;
            (vec![losses], grad, None, correct)
        } else if !adapted || backward.is_none() {
            let (losses, grad, correct) = manual_head_loss(
                head, adapted, softcap, &rows, &targets, chunk, mode, backward,
            )?;
            (losses, grad, None, correct)
        } else {
            let logits = |x: &Tensor| lm.softcap_logits(head.forward(x, mode)?);
            let (losses, total, correct) = autograd_head_loss(&logits, &rows, &targets, chunk)?;
            (losses, None, Some(total), correct)
        };
    Ok(HeadPass {
        n_tokens: n,
        token_losses: Tensor::f_cat(&losses, 0)?,
        rows_grad: grad.map(|g| (rows, g)),
        graph_sum,
        correct,
    })
}

/// The token losses of `rows` against `targets`, chunk by chunk, with the head's backward done by
/// hand: autograd stops at `rows`, and with `backward = Some(scale)` (and `rows` recording
/// gradients) it also returns the gradient reaching `rows`, `(softmax - onehot) * scale @ W`, for
/// the caller to hand to autograd once for all chunks. `adapted`: the
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
) -> Result<(Vec<Tensor>, Option<Tensor>, Tensor)> {
    let n = rows.size()[0];
    let detached = rows.f_detach()?;
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    let mut correct = Tensor::f_zeros([], (Kind::Int64, rows.device()))?;
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
        // Before the loss: it overwrites the logits with their gradient.
        correct = correct.f_add(&count_correct(&logits, &tgt)?)?;
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
    let grad = if backward.is_some() && rows.requires_grad() {
        Some(Tensor::f_cat(&grads, 0)?)
    } else {
        None
    };
    Ok((losses, grad, correct))
}

/// The token losses of `rows` `[N, H]` against `targets` through a frozen quantized head: the
/// vocabulary in chunks of at most `chunk_logits_max` logits ([`CHUNK_LOGITS`]), each chunk's head rows decoded once per
/// pass. The first pass keeps each row's running max, sum of exponentials and target logit (an
/// online logsumexp); with `backward = Some(scale)` a second pass forms `(softmax - onehot) *
/// scale` per chunk (through the soft-cap's derivative `1 - (y / cap)^2` when `softcap`) and
/// accumulates its product with the chunk's rows: the gradient reaching `rows`, returned as
/// [`manual_head_loss`] returns it. On a 262144-token head (Gemma) decoding the whole head
/// for each chunk of 64 token rows took most of a training step. Also returns how many targets
/// are their row's argmax (the first pass keeps each row's first maximal column).
fn vocab_chunked_loss(
    chunk_logits_max: i64,
    q: &QWeight,
    bias: Option<&Tensor>,
    softcap: Option<f64>,
    rows: &Tensor,
    targets: &Tensor,
    backward: Option<f64>,
) -> Result<(Tensor, Option<Tensor>, Tensor)> {
    let [vocab, _] = q.size();
    let n = rows.size()[0];
    let step = (chunk_logits_max / n.max(1)).clamp(1, vocab);
    let x = rows.f_detach()?;
    let float = (Kind::Float, x.device());
    // The chunk's logits (float32, soft-capped) and its decoded head rows.
    let chunk_logits = |v0: i64, len: i64| -> Result<(Tensor, Tensor)> {
        let ids = Tensor::f_arange_start(v0, v0 + len, (Kind::Int64, Device::Cpu))?;
        let w = q.embedding(&ids)?;
        let mut z = x.f_matmul(&w.f_transpose(0, 1)?)?;
        if let Some(b) = bias {
            z = z.f_add(&b.f_narrow(0, v0, len)?)?;
        }
        let mut y = z.f_to_kind(Kind::Float)?;
        if let Some(cap) = softcap {
            y = y.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?;
        }
        Ok((y, w))
    };
    // The targets' columns in a chunk (clamped) and whether each target lies in it.
    let tgt = targets.f_unsqueeze(1)?;
    let local = |v0: i64, len: i64| -> Result<(Tensor, Tensor)> {
        let at = tgt.f_sub_scalar(v0)?;
        let inside = at.f_ge(0)?.f_logical_and(&at.f_lt(len)?)?;
        Ok((at.f_clamp(0, len - 1)?, inside.f_to_kind(Kind::Float)?))
    };
    let mut max = Tensor::f_full([n], f64::NEG_INFINITY, float)?;
    let mut sum = Tensor::f_zeros([n], float)?;
    let mut target_logit = Tensor::f_zeros([n], float)?;
    let mut argmax = Tensor::f_zeros([n], (Kind::Int64, x.device()))?;
    for v0 in (0..vocab).step_by(step as usize) {
        let len = step.min(vocab - v0);
        let (y, _) = chunk_logits(v0, len)?;
        let (chunk_max, chunk_arg) = y.f_max_dim(1, false)?;
        // Strictly greater: on a tie the earlier chunk's column stays, as torch.argmax.
        let better = chunk_max.f_gt_tensor(&max)?;
        argmax = argmax.f_where_self(&better.f_logical_not()?, &chunk_arg.f_add_scalar(v0)?)?;
        let new_max = max.f_maximum(&chunk_max)?;
        let shifted = y.f_sub(&new_max.f_unsqueeze(1)?)?.f_exp()?;
        sum = sum
            .f_mul(&max.f_sub(&new_max)?.f_exp()?)?
            .f_add(&shifted.f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?)?;
        max = new_max;
        let (at, inside) = local(v0, len)?;
        let picked = y.f_gather(1, &at, false)?.f_mul(&inside)?;
        target_logit = target_logit.f_add(&picked.f_squeeze_dim(1)?)?;
    }
    let lse = max.f_add(&sum.f_log()?)?;
    let losses = lse.f_sub(&target_logit)?;
    let correct = argmax
        .f_eq_tensor(&targets.f_to_device(x.device())?)?
        .f_sum(Kind::Int64)?;
    let Some(scale) = backward.filter(|_| rows.requires_grad()) else {
        return Ok((losses, None, correct));
    };
    let mut grad = Tensor::f_zeros_like(&x)?;
    for v0 in (0..vocab).step_by(step as usize) {
        let len = step.min(vocab - v0);
        let (y, w) = chunk_logits(v0, len)?;
        let (at, inside) = local(v0, len)?;
        let mut g = y
            .f_sub(&lse.f_unsqueeze(1)?)?
            .f_exp()?
            .f_scatter_add(1, &at, &inside.f_neg()?)?
            .f_mul_scalar(scale)?;
        if let Some(cap) = softcap {
            let ratio = y.f_div_scalar(cap)?;
            g = g.f_mul(&ratio.f_square()?.f_neg()?.f_add_scalar(1.0)?)?;
        }
        grad = grad.f_add(&g.f_to_kind(w.kind())?.f_matmul(&w)?)?;
    }
    Ok((losses, Some(grad), correct))
}

/// The token losses of `rows` against `targets` through a head whose adapter trains, and their sum
/// with its autograd graph through the (still chunked) head `logits_of`, for the caller's backward.
fn autograd_head_loss(
    logits_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    rows: &Tensor,
    targets: &Tensor,
    chunk: i64,
) -> Result<(Vec<Tensor>, Tensor, Tensor)> {
    let n = rows.size()[0];
    let mut losses = Vec::new();
    let mut total: Option<Tensor> = None;
    let mut correct = Tensor::f_zeros([], (Kind::Int64, rows.device()))?;
    for start in (0..n).step_by(chunk as usize) {
        let len = chunk.min(n - start);
        let x = rows.f_narrow(0, start, len)?;
        let tgt = targets.f_narrow(0, start, len)?;
        let logits = logits_of(&x)?.f_to_kind(Kind::Float)?;
        correct = correct.f_add(&tch::no_grad(|| count_correct(&logits, &tgt))?)?;
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
    let total = match total {
        Some(t) => t,
        None => Tensor::f_zeros([], (Kind::Float, rows.device()))?,
    };
    Ok((losses, total, correct))
}

#[cfg(test)]
mod vocab_chunk_tests {
    use super::*;
    use crate::quant::QType;
    use crate::testing::max_diff;

    /// Losses and the gradient reaching the rows through a Q8_0 head, walked in vocabulary chunks
    /// of 7 to all 50 rows, with and without soft-capping: equal to the dense composite (the
    /// head decoded whole, libtorch's cross-entropy, autograd) to float32 rounding: within 4x
    /// the composite's own float32 error against float64, and never below one rounding of the
    /// largest value.
    #[test]
    fn vocab_chunks_equal_the_dense_loss() {
        tch::manual_seed(9);
        let opts = (Kind::Float, Device::Cpu);
        let (n, h, vocab) = (6, 64, 50);
        let w = Tensor::randn([vocab, h], opts) * 0.5;
        let q = QWeight::quantize(&w, QType::Q8_0).unwrap();
        let dense = q.dequantize(Kind::Float).unwrap();
        let rows = Tensor::randn([n, h], opts);
        // Half the targets are their row's argmax, so the accuracy count is tested on both kinds.
        let argmax = rows.matmul(&dense.tr()).argmax(-1, false);
        let targets = Tensor::from_slice(&[0i64, 49, 7, 7, 21, 35]);
        targets.narrow(0, 0, 3).copy_(&argmax.narrow(0, 0, 3));
        let expected_correct = argmax.eq_tensor(&targets).sum(Kind::Int64).int64_value(&[]);
        assert!(expected_correct >= 3, "{expected_correct}");
        for softcap in [None, Some(3.0)] {
            let reference = |kind: Kind| {
                let x = rows.to_kind(kind).detach().set_requires_grad(true);
                let mut logits = x.matmul(&dense.to_kind(kind).tr());
                if let Some(cap) = softcap {
                    logits = (logits / cap).tanh() * cap;
                }
                let loss = logits.cross_entropy_loss::<&Tensor>(
                    &targets,
                    None,
                    tch::Reduction::None,
                    -100,
                    0.0,
                );
                (loss.sum(kind) * 0.5).backward();
                (
                    loss.detach().to_kind(Kind::Double),
                    x.grad().to_kind(Kind::Double),
                )
            };
            let (loss32, grad32) = reference(Kind::Float);
            let (loss64, grad64) = reference(Kind::Double);
            let tol = |got: f64, exact: &Tensor, err: f64| {
                let scale = exact.abs().max().double_value(&[]);
                assert!(
                    got <= 4.0 * err.max(scale * 2f64.powi(-24)),
                    "{got:e} vs {err:e}"
                );
            };
            for chunk in [7 * n, 20 * n, 1 << 20] {
                let x = rows.detach().set_requires_grad(true);
                let (losses, grad, correct) =
                    vocab_chunked_loss(chunk, &q, None, softcap, &x, &targets, Some(0.5)).unwrap();
                assert_eq!(correct.int64_value(&[]), expected_correct);
                x.f_mul(&grad.unwrap()).unwrap().sum(Kind::Float).backward();
                let losses = losses.to_kind(Kind::Double);
                tol(
                    max_diff(&losses, &loss64),
                    &loss64,
                    max_diff(&loss32, &loss64),
                );
                tol(
                    max_diff(&x.grad().to_kind(Kind::Double), &grad64),
                    &grad64,
                    max_diff(&grad32, &grad64),
                );
            }
        }
    }
}
