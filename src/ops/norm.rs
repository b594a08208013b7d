//! RMSNorm as transformers' `LlamaRMSNorm` computes it: `weight * (x / sqrt(mean(x^2) + eps))`,
//! normalised in float32 and cast back before the weight.
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

/// The forward from libtorch ops, as transformers writes it.
fn composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = x.f_kind()?;
    let x32 = x.f_to_kind(Kind::Float)?;
    let var = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
    let normed = x32.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(weight.f_mul(&normed.f_to_kind(kind)?)?)
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
