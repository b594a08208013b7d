//! The rotary position embedding as Hugging Face applies it ("rotate half", not Meta's interleaved
//! pairs): `x * cos + rotate_half(x) * sin`. The tables come from [`crate::model::rope`].
use super::{path, Path, When};
use crate::error::Result;
use tch::Tensor;

/// The heads `y` `[B, T, n, D]` moved to `[B, n, T, D]`, with the rotary embedding of `cos` and
/// `sin` `[B or 1, 1, T, D]`: the fused kernel (csrc/rotary.cpp) while training on CPU in float32,
/// else libtorch's ops.
pub fn rotary(y: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match path(&[y, cos, sin], When::Training)? {
        Path::Fused => Ok(crate::ffi::rotary(y, cos, sin)?),
        Path::Composite => apply(&y.f_transpose(1, 2)?, cos, sin),
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` `[B, H, T, D]`, from libtorch's ops.
fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, with_grads};
    use tch::{Device, Kind};

    #[test]
    fn fused_rotary_matches_composite() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        // (batch, length, heads, head dim, rows of the cos/sin tables)
        for (b, t, n, d, rows) in [
            (1, 256, 9, 64, 1),
            (2, 7, 3, 16, 2),
            (2, 5, 2, 2, 1),
            (1, 1, 1, 8, 1),
        ] {
            let angles = Tensor::randn([rows, 1, t, d / 2], opts) * 10.0;
            let angles = Tensor::cat(&[&angles, &angles], -1);
            let (cos, sin) = (angles.cos(), angles.sin());
            let x = Tensor::randn([b, t, n, d], opts);
            let up = Tensor::randn([b, n, t, d], opts);
            let case = format!("{b}x{t}x{n}x{d}, tables {rows}");
            let fused = |v: &[Tensor]| crate::ffi::rotary(&v[0], &cos, &sin).unwrap();
            let composite = |v: &[Tensor]| apply(&v[0].transpose(1, 2), &cos, &sin).unwrap();
            let ours = with_grads(fused, &[&x], &up);
            let reference = with_grads(composite, &[&x], &up);
            // The forward rounds as libtorch's ops do: the same bits.
            assert!(ours[0].equal(&reference[0]), "{case}");
            assert!(ours[0].is_contiguous(), "{case}");
            assert_close(&ours, &reference, 1e-6, &case);
            // The op: fused with gradients, libtorch's ops without.
            let x_grad = x.copy().set_requires_grad(true);
            assert!(
                rotary(&x_grad, &cos, &sin).unwrap().equal(&ours[0]),
                "{case}"
            );
            assert!(
                rotary(&x, &cos, &sin).unwrap().equal(&reference[0]),
                "{case}"
            );
        }
    }

    #[test]
    fn fused_rotary_rejects_bad_inputs() {
        let f32s = (Kind::Float, Device::Cpu);
        let x = Tensor::zeros([2, 4, 2, 8], f32s);
        let table = Tensor::zeros([1, 1, 4, 8], f32s);
        let errors = [
            crate::ffi::rotary(&x, &Tensor::zeros([1, 1, 5, 8], f32s), &table).unwrap_err(),
            crate::ffi::rotary(&x, &table, &Tensor::zeros([3, 1, 4, 8], f32s)).unwrap_err(),
            crate::ffi::rotary(&x.narrow(3, 0, 7), &table, &table).unwrap_err(),
            crate::ffi::rotary(&Tensor::zeros([4, 8], f32s), &table, &table).unwrap_err(),
        ];
        for (err, expected) in errors.iter().zip(["cos", "sin", "even", "[B, T"]) {
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }
}
