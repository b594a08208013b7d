//! RMSNorm as transformers computes it: `LlamaRMSNorm`'s `weight * (x / sqrt(mean(x^2) + eps))`,
//! normalised in float32 and cast back before the weight, and Gemma's, whose float32 scale
//! (`1 + weight`) multiplies before the cast.
use super::{path, Path, When};
use crate::error::Result;
use tch::{Kind, Tensor};

/// RMSNorm of `x` `[..., H]` with `weight` `[H]`: the fused kernel (csrc/rms_norm.cpp) while
/// training on CPU in float32, else the composite ops.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match path(&[x, weight], When::Training)? {
        Path::Fused => Ok(crate::ffi::rms_norm(x, weight, eps)?),
        Path::Composite => composite(x, weight, eps),
    }
}

/// Gemma's RMSNorm of `x` `[..., H]`: `(x / sqrt(mean(x^2) + eps)) * scale` in float32, cast back
/// to `x`'s dtype; `scale` `[H]` is the float32 `1 + weight`. In float32 this is [`rms_norm`]'s
/// formula, so training on CPU takes the same fused kernel.
pub fn rms_norm_f32_scale(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    match path(&[x, scale], When::Training)? {
        Path::Fused => Ok(crate::ffi::rms_norm(x, scale, eps)?),
        Path::Composite => Ok(normalized(x, eps)?.f_mul(scale)?.f_to_kind(x.f_kind()?)?),
    }
}

/// `x / sqrt(mean(x^2) + eps)` in float32.
fn normalized(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.f_to_kind(Kind::Float)?;
    let var = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
    Ok(x32.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?)
}

/// The forward from libtorch ops, as transformers writes it.
fn composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let normed = normalized(x, eps)?;
    Ok(weight.f_mul(&normed.f_to_kind(x.f_kind()?)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, with_grads};
    use tch::Device;

    #[test]
    fn fused_rms_norm_matches_composite() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        // Rows of 576 (SmolLM2), per-head rows (qk_norm), and sizes that are no multiple of 8.
        for shape in [
            vec![1, 256, 576],
            vec![2, 5, 3, 64],
            vec![3, 13],
            vec![4, 1],
            vec![0, 8],
        ] {
            let h = *shape.last().unwrap();
            let x = Tensor::randn(shape.as_slice(), opts) * 3.0;
            let up = Tensor::randn(shape.as_slice(), opts);
            let weight = Tensor::randn([h], opts);
            let fused = |t: &[Tensor]| crate::ffi::rms_norm(&t[0], &t[1], 1e-5).unwrap();
            let reference = |t: &[Tensor]| composite(&t[0], &t[1], 1e-5).unwrap();
            let inputs = [&x, &weight];
            let case = format!("{shape:?}");
            // Input and (trainable) weight gradients.
            assert_close(
                &with_grads(fused, &inputs, &up),
                &with_grads(reference, &inputs, &up),
                1e-5,
                &case,
            );
            // The op: fused with gradients, libtorch's ops (bit for bit) without.
            let x_grad = x.copy().set_requires_grad(true);
            let trained = rms_norm(&x_grad, &weight, 1e-5).unwrap();
            assert!(trained.equal(&crate::ffi::rms_norm(&x, &weight, 1e-5).unwrap()));
            let plain = rms_norm(&x, &weight, 1e-5).unwrap();
            assert!(
                plain.equal(&composite(&x, &weight, 1e-5).unwrap()),
                "{case}"
            );
        }
    }

    #[test]
    fn fused_rms_norm_rejects_bad_inputs() {
        let f32s = (Kind::Float, Device::Cpu);
        let f64s = (Kind::Double, Device::Cpu);
        let x = Tensor::zeros([2, 4, 2, 8], f32s);
        let errors = [
            crate::ffi::rms_norm(&x, &Tensor::zeros([7], f32s), 1e-5).unwrap_err(),
            crate::ffi::rms_norm(&x.to_kind(Kind::Double), &Tensor::zeros([8], f64s), 1e-5)
                .unwrap_err(),
        ];
        for (err, expected) in errors.iter().zip(["weight", "float32"]) {
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }
}
