//! The MLP activations: SwiGLU, `silu(gate) * up` (Llama, Mistral, Qwen, Phi-3), and GeGLU with
//! the tanh approximation, `gelu_tanh(gate) * up` (Gemma).
use super::{path, Path, When};
use crate::error::Result;
use tch::Tensor;

/// `silu(gate) * up`: the fused kernel (csrc/swiglu.cpp) while training on CPU in float32, else
/// libtorch's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match path(&[gate, up], When::Training)? {
        Path::Fused => Ok(crate::ffi::swiglu(gate, up)?),
        Path::Composite => Ok(gate.f_silu()?.f_mul(up)?),
    }
}

/// `gelu(gate, approximate="tanh") * up`, as transformers' `gelu_pytorch_tanh`: the fused kernel
/// (csrc/gelu_glu.cpp) while training on CPU in float32, else libtorch's ops.
pub fn gelu_tanh_glu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match path(&[gate, up], When::Training)? {
        Path::Fused => Ok(crate::ffi::gelu_tanh_glu(gate, up)?),
        Path::Composite => Ok(gate.f_gelu("tanh")?.f_mul(up)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, with_grads};
    use tch::{Device, Kind};

    type Fused = fn(&Tensor, &Tensor) -> std::result::Result<Tensor, tch::TchError>;
    type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;
    /// A fused activation's name, its kernel, its op, and libtorch's activation of the gate.
    type Case = (&'static str, Fused, Op, fn(&Tensor) -> Tensor);

    /// Each fused activation beside its op and libtorch's composite.
    fn activations() -> [Case; 2] {
        [
            ("swiglu", crate::ffi::swiglu, swiglu, |g| g.silu()),
            (
                "gelu_tanh_glu",
                crate::ffi::gelu_tanh_glu,
                gelu_tanh_glu,
                |g| g.gelu("tanh"),
            ),
        ]
    }

    /// Values and gradients equal libtorch's composite within float rounding; the op takes the
    /// kernel only with gradients (inference stays bit-equal to the composite).
    #[test]
    fn fused_activations_match_composite() {
        let opts = (Kind::Float, Device::Cpu);
        for (name, fused, op, act) in activations() {
            tch::manual_seed(3);
            for shape in [vec![1, 256, 1536], vec![3, 5, 7], vec![1]] {
                let gate = Tensor::randn(shape.as_slice(), opts) * 4.0;
                let up = Tensor::randn(shape.as_slice(), opts);
                let upstream = Tensor::randn(shape.as_slice(), opts);
                let case = format!("{name} {shape:?}");
                let ours = |t: &[Tensor]| fused(&t[0], &t[1]).unwrap();
                let composite = |t: &[Tensor]| act(&t[0]) * &t[1];
                assert_close(
                    &with_grads(ours, &[&gate, &up], &upstream),
                    &with_grads(composite, &[&gate, &up], &upstream),
                    1e-6,
                    &case,
                );
                let gate_grad = gate.copy().set_requires_grad(true);
                let trained = op(&gate_grad, &up).unwrap();
                assert!(trained.equal(&fused(&gate, &up).unwrap()), "{case}");
                assert!(op(&gate, &up).unwrap().equal(&(act(&gate) * &up)), "{case}");
            }
            // Saturated gates: finite values and gradients, as libtorch's.
            let gate = Tensor::from_slice(&[
                -1e4f32, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4, -0.0, 1e-30, 88.0, -88.0,
            ]);
            let up = gate.ones_like();
            let upstream = gate.ones_like();
            let ours = with_grads(|t| fused(&t[0], &t[1]).unwrap(), &[&gate, &up], &upstream);
            let reference = with_grads(|t| act(&t[0]) * &t[1], &[&gate, &up], &upstream);
            for t in &ours {
                assert!(bool::try_from(t.isfinite().all()).unwrap(), "{name}");
            }
            assert_close(&ours, &reference, 1e-6, &format!("{name} saturated"));
        }
    }

    #[test]
    fn fused_activations_reject_bad_inputs() {
        let f32s = (Kind::Float, Device::Cpu);
        let x = Tensor::zeros([2, 4, 2, 8], f32s);
        for (name, fused, _, _) in activations() {
            let errors = [
                fused(&x, &Tensor::zeros([2, 4, 2, 7], f32s)).unwrap_err(),
                fused(&x.to_kind(Kind::Double), &x.to_kind(Kind::Double)).unwrap_err(),
            ];
            for (err, expected) in errors.iter().zip(["shape", "float32"]) {
                assert!(
                    err.to_string().contains(expected),
                    "{name} {expected}: {err}"
                );
            }
        }
    }
}
