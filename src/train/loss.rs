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
use crate::model::{CausalLm, LoraMode};

/// At most this many logits (rows x vocab) per chunk: 16 Mi floats, 64 MiB in float32.
const CHUNK_LOGITS: i64 = 16 << 20;

/// Vocabulary rows per GEMM when the CPU head is computed in column blocks (see [`head_logits`]).
const HEAD_BLOCK: i64 = 512;

/// The output head's logits for `x` `[rows, hidden]`, when no adapter of the head takes part.
///
/// On CPU, oneMKL runs the single `[rows, hidden] x [hidden, vocab]` product of a large vocabulary
/// well below its usual speed (256 x 576 x 49152: about 60 GFLOP/s against 105 in 512-column
/// blocks, default dispatch; the fixed training step is ~6% faster in an alternated A/B of the
/// binary). So the product is written block by block straight into the result: the same dot
/// products, up to float rounding. With a row split ([`crate::bridge::mm_rows`]) each thread
/// computes its own rows, so the cross-entropy's row loop (the same halves) reads logits its own
/// core wrote. Other devices, heads with a bias and small vocabularies take the plain `linear`.
fn head_logits(head: &crate::model::Linear, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
    let w = &head.weight;
    if w.device() != tch::Device::Cpu
        || head.bias.is_some()
        || head.out_features() <= 2 * HEAD_BLOCK
    {
        return head.forward(x, mode);
    }
    Ok(crate::bridge::mm_rows(x, &w.f_tr()?, HEAD_BLOCK)?)
}

/// Each row's cross-entropy of float32 `logits` `[rows, vocab]` against `targets` `[rows]`; with
/// `grad_scale = Some(s)` it overwrites the logits with the gradient of `s * sum(losses)`,
/// `s * (softmax - onehot)`. On CPU one fused pass per row ([`crate::bridge::cross_entropy_`]),
/// elsewhere libtorch's ops in the logits' memory (no second `[rows, vocab]` buffer either way).
fn cross_entropy_(
    logits: &mut Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<Tensor> {
    if !logits.is_contiguous() {
        *logits = logits.f_contiguous()?;
    }
    if logits.device() == tch::Device::Cpu {
        return Ok(crate::bridge::cross_entropy_(logits, targets, grad_scale)?);
    }
    composite_cross_entropy_(logits, targets, grad_scale)
}

/// [`cross_entropy_`] from libtorch's ops, for contiguous logits on any device.
fn composite_cross_entropy_(
    logits: &mut Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<Tensor> {
    let tgt = targets.f_unsqueeze(1)?;
    // log_softmax in place (one vectorised pass per row, no second [rows, vocab] buffer).
    let out = logits.shallow_clone();
    let logp = logits.f_internal_log_softmax_out(&out, -1, false)?;
    let loss = logp.f_gather(1, &tgt, false)?.f_neg()?.f_squeeze_dim(1)?;
    if let Some(scale) = grad_scale {
        let minus_one = Tensor::f_full([tgt.size()[0], 1], -1.0, (Kind::Float, logits.device()))?;
        let _ = logits.f_exp_()?;
        let _ = logits.f_scatter_add_(1, &tgt, &minus_one)?;
        let _ = logits.f_mul_scalar_(scale)?;
    }
    Ok(loss)
}

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
    let manual = head.lora.is_none() || head.merged || !mode.enabled;
    let mut losses = Vec::new();
    if manual || backward.is_none() {
        // Autograd stops at `rows`; the head's backward is done here.
        let detached = rows.f_detach()?;
        let mut grads = Vec::new();
        for start in (0..n).step_by(chunk as usize) {
            let len = chunk.min(n - start);
            let x = detached.f_narrow(0, start, len)?;
            let tgt = targets.f_narrow(0, start, len)?;
            let mut logits =
                tch::no_grad(|| head_logits(head, &x, mode))?.f_to_kind(Kind::Float)?;
            losses.push(cross_entropy_(&mut logits, &tgt, backward)?);
            if backward.is_some() {
                // `logits` now holds the gradient (softmax - onehot) * scale.
                let g = logits.f_to_kind(head.weight.f_kind()?)?;
                grads.push(crate::bridge::mm_rows(&g, &head.weight, 0)?);
            }
        }
        if backward.is_some() && rows.requires_grad() {
            let grad = Tensor::f_cat(&grads, 0)?;
            // d(sum(rows * grad)) / d(rows) = grad: hands the head's gradient to autograd.
            rows.f_mul(&grad)?.f_sum(rows.f_kind()?)?.f_backward()?;
        }
    } else {
        let scale = backward.unwrap_or(1.0);
        let mut total: Option<Tensor> = None;
        for start in (0..n).step_by(chunk as usize) {
            let len = chunk.min(n - start);
            let x = rows.f_narrow(0, start, len)?;
            let tgt = targets.f_narrow(0, start, len)?;
            let logits = head.forward(&x, mode)?.f_to_kind(Kind::Float)?;
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
    }
    let token_losses = Tensor::f_cat(&losses, 0)?;
    // One read of a device value per batch (a sync on CUDA), however many chunks.
    let sum = token_losses.f_sum(Kind::Double)?.f_double_value(&[])?;
    Ok(LossSum {
        sum,
        n_tokens: n,
        token_losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Linear;

    fn mode() -> LoraMode {
        LoraMode {
            enabled: true,
            training: false,
        }
    }

    /// The head's forward (column blocks; rows split over 2 threads from 128 rows) and its
    /// backward product (`g W`) match libtorch's products, through BLAS and through ATen.
    #[test]
    fn blocked_head_matches_linear() {
        tch::manual_seed(3);
        tch::set_num_threads(2);
        let opts = (Kind::Float, tch::Device::Cpu);
        let close = |got: &Tensor, want: &Tensor, case: &str| {
            assert_eq!(got.size(), want.size(), "{case}");
            if want.numel() > 0 {
                let diff = (got - want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                assert!(diff <= 1e-6 * scale, "{case}: {diff} vs {scale}");
            }
        };
        for blas in [true, false] {
            let before = crate::bridge::use_blas(blas);
            // 2600 = five 512-column blocks and a partial one; 131 rows split 66 + 65.
            for (rows, vocab) in [(7, 2600), (1, 1025), (300, 1536), (131, 2600), (0, 2600)] {
                let head = Linear::from_weight(Tensor::randn([vocab, 64], opts));
                let x = Tensor::randn([rows, 64], opts);
                let case = format!("blas {blas}: {rows}x{vocab}");
                let got = head_logits(&head, &x, mode()).unwrap();
                close(&got, &x.linear::<&Tensor>(&head.weight, None), &case);
                let g = Tensor::randn([rows, vocab], opts);
                let back = crate::bridge::mm_rows(&g, &head.weight, 0).unwrap();
                close(&back, &g.mm(&head.weight), &format!("{case} backward"));
            }
            crate::bridge::use_blas(before);
        }
        let err = crate::bridge::mm_rows(
            &Tensor::zeros([3, 4], opts),
            &Tensor::zeros([5, 2], opts),
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("[m, k] and [k, n]"), "{err}");
    }

    /// libtorch's cross-entropy per row and the gradient of `scale * sum` by autograd.
    fn reference_cross_entropy(logits: &Tensor, targets: &Tensor, scale: f64) -> (Tensor, Tensor) {
        let x = logits.copy().set_requires_grad(true);
        let loss =
            x.cross_entropy_loss::<&Tensor>(targets, None, tch::Reduction::None, IGNORE_INDEX, 0.0);
        (loss.sum(Kind::Float) * scale).backward();
        (loss.detach(), x.grad())
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        if a.numel() == 0 {
            return 0.0;
        }
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn fused_cross_entropy_matches_libtorch() {
        tch::manual_seed(5);
        let opts = (Kind::Float, tch::Device::Cpu);
        // Vocabularies that are and are not multiples of the 8 AVX2 lanes; spread-out, flat and
        // large logits (softmax saturating at 0 and 1).
        for (rows, vocab, spread) in [
            (5, 4099, 3.0),
            (3, 49152, 8.0),
            (1, 1, 1.0),
            (4, 7, 0.0),
            (6, 64, 300.0),
            (0, 16, 1.0),
        ] {
            let logits = Tensor::randn([rows, vocab], opts) * spread;
            let targets = Tensor::randint(vocab, [rows], (Kind::Int64, tch::Device::Cpu));
            for scale in [1.0, 0.125] {
                let case = format!("{rows}x{vocab} spread {spread} scale {scale}");
                let (want_loss, want_grad) = reference_cross_entropy(&logits, &targets, scale);
                // Without a gradient: the losses, and the logits left alone.
                let mut x = logits.copy();
                let loss = cross_entropy_(&mut x, &targets, None).unwrap();
                assert!(x.equal(&logits), "{case}: logits changed");
                let tol = 1e-5 * (1.0 + max_abs_diff(&want_loss, &want_loss.zeros_like()));
                assert!(max_abs_diff(&loss, &want_loss) <= tol, "{case}: loss");
                // With one: the same losses, and the gradient over the logits.
                let mut x = logits.copy();
                let loss = cross_entropy_(&mut x, &targets, Some(scale)).unwrap();
                assert!(max_abs_diff(&loss, &want_loss) <= tol, "{case}: loss");
                let diff = max_abs_diff(&x, &want_grad);
                assert!(diff <= 1e-6 * scale, "{case}: gradient {diff}");
                // The composite path (other devices) gives the same.
                let mut y = logits.copy();
                let loss = composite_cross_entropy_(&mut y, &targets, Some(scale)).unwrap();
                assert!(
                    max_abs_diff(&loss, &want_loss) <= tol,
                    "{case}: composite loss"
                );
                assert!(
                    max_abs_diff(&y, &want_grad) <= 1e-6 * scale,
                    "{case}: composite"
                );
            }
        }
    }

    #[test]
    fn fused_cross_entropy_rejects_bad_inputs_and_keeps_the_logits() {
        let opts = (Kind::Float, tch::Device::Cpu);
        let logits = Tensor::randn([3, 10], opts);
        let ids = |v: &[i64]| Tensor::from_slice(v);
        let cases: Vec<(Tensor, Tensor, &str)> = vec![
            (logits.copy(), ids(&[0, 10, 2]), "outside [0, 10)"),
            (logits.copy(), ids(&[0, -1, 2]), "outside [0, 10)"),
            (logits.copy(), ids(&[0, 1]), "targets must be"),
            (
                logits.copy(),
                ids(&[0, 1, 2]).to_kind(Kind::Int),
                "targets must be",
            ),
            (
                logits.to_kind(Kind::Double),
                ids(&[0, 1, 2]),
                "logits must be",
            ),
            (logits.reshape([30]), ids(&[0, 1, 2]), "logits must be"),
        ];
        for (mut x, t, want) in cases {
            let before = x.copy();
            let err = crate::bridge::cross_entropy_(&mut x, &t, Some(1.0)).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
            assert!(x.equal(&before));
        }
        // A transposed (non-contiguous) buffer is refused by the kernel; `cross_entropy_` makes
        // it contiguous first.
        let base = Tensor::randn([10, 3], opts);
        let mut x = base.tr();
        assert!(crate::bridge::cross_entropy_(&mut x, &ids(&[1, 2, 3]), None).is_err());
        let (want_loss, want_grad) = reference_cross_entropy(&base.tr(), &ids(&[1, 2, 3]), 2.0);
        let loss = cross_entropy_(&mut x, &ids(&[1, 2, 3]), Some(2.0)).unwrap();
        assert!(max_abs_diff(&loss, &want_loss) < 1e-5);
        assert!(max_abs_diff(&x, &want_grad) < 1e-5);
    }

    #[test]
    fn head_with_a_bias_keeps_its_bias() {
        let opts = (Kind::Float, tch::Device::Cpu);
        let x = Tensor::randn([3, 8], opts);
        let mut head = Linear::from_weight(Tensor::randn([2048, 8], opts));
        head.bias = Some(Tensor::randn([2048], opts));
        let got = head_logits(&head, &x, mode()).unwrap();
        let want = x.linear(&head.weight, head.bias.as_ref());
        assert!(got.allclose(&want, 1e-6, 1e-6, false));
    }
}
