//! The softmax cross-entropy of the loss, row by row, in the logits' own memory: no second
//! `[rows, vocab]` buffer for the log-probabilities or the gradient.
use super::{path, Path, When};
use crate::error::Result;
use tch::{Kind, Tensor};

/// Each row's cross-entropy of float32 `logits` `[rows, vocab]` against `targets` `[rows]`; with
/// `grad_scale = Some(s)` it overwrites the logits with the gradient of `s * sum(losses)`,
/// `s * (softmax - onehot)`. On CPU one fused pass per row (csrc/cross_entropy.cpp),
/// elsewhere libtorch's ops in the logits' memory (no second `[rows, vocab]` buffer either way).
pub fn cross_entropy_(
    logits: &mut Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<Tensor> {
    if !logits.is_contiguous() {
        *logits = logits.f_contiguous()?;
    }
    match path(&[logits], When::Always)? {
        Path::Fused => Ok(crate::ffi::cross_entropy_(logits, targets, grad_scale)?),
        Path::Composite => composite(logits, targets, grad_scale),
    }
}

/// [`cross_entropy_`] from libtorch's ops, for contiguous logits on any device.
fn composite(logits: &mut Tensor, targets: &Tensor, grad_scale: Option<f64>) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;
    use tch::Device;

    /// libtorch's cross-entropy per row and the gradient of `scale * sum` by autograd.
    fn reference_cross_entropy(logits: &Tensor, targets: &Tensor, scale: f64) -> (Tensor, Tensor) {
        let x = logits.copy().set_requires_grad(true);
        let loss = x.cross_entropy_loss::<&Tensor>(targets, None, tch::Reduction::None, -100, 0.0);
        (loss.sum(Kind::Float) * scale).backward();
        (loss.detach(), x.grad())
    }

    #[test]
    fn fused_cross_entropy_matches_libtorch() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
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
            let targets = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
            for scale in [1.0, 0.125] {
                let case = format!("{rows}x{vocab} spread {spread} scale {scale}");
                let (want_loss, want_grad) = reference_cross_entropy(&logits, &targets, scale);
                // Without a gradient: the losses, and the logits left alone.
                let mut x = logits.copy();
                let loss = cross_entropy_(&mut x, &targets, None).unwrap();
                assert!(x.equal(&logits), "{case}: logits changed");
                let tol = 1e-5 * (1.0 + max_diff(&want_loss, &want_loss.zeros_like()));
                assert!(max_diff(&loss, &want_loss) <= tol, "{case}: loss");
                // With one: the same losses, and the gradient over the logits.
                let mut x = logits.copy();
                let loss = cross_entropy_(&mut x, &targets, Some(scale)).unwrap();
                assert!(max_diff(&loss, &want_loss) <= tol, "{case}: loss");
                let diff = max_diff(&x, &want_grad);
                assert!(diff <= 1e-6 * scale, "{case}: gradient {diff}");
                // The composite path (other devices) gives the same.
                let mut y = logits.copy();
                let loss = composite(&mut y, &targets, Some(scale)).unwrap();
                assert!(max_diff(&loss, &want_loss) <= tol, "{case}: composite loss");
                assert!(
                    max_diff(&y, &want_grad) <= 1e-6 * scale,
                    "{case}: composite"
                );
            }
        }
    }

    #[test]
    fn fused_cross_entropy_rejects_bad_inputs_and_keeps_the_logits() {
        let opts = (Kind::Float, Device::Cpu);
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
            let err = crate::ffi::cross_entropy_(&mut x, &t, Some(1.0)).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
            assert!(x.equal(&before));
        }
        // A transposed (non-contiguous) buffer is refused by the kernel; `cross_entropy_` makes
        // it contiguous first.
        let base = Tensor::randn([10, 3], opts);
        let mut x = base.tr();
        assert!(crate::ffi::cross_entropy_(&mut x, &ids(&[1, 2, 3]), None).is_err());
        let (want_loss, want_grad) = reference_cross_entropy(&base.tr(), &ids(&[1, 2, 3]), 2.0);
        let loss = cross_entropy_(&mut x, &ids(&[1, 2, 3]), Some(2.0)).unwrap();
        assert!(max_diff(&loss, &want_loss) < 1e-5);
        assert!(max_diff(&x, &want_grad) < 1e-5);
    }
}
