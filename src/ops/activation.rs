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

/// `gelu(gate, approximate="tanh") * up`, as transformers' `gelu_pytorch_tanh`.
pub fn gelu_tanh_glu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.f_gelu("tanh")?.f_mul(up)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, with_grads};
    use tch::{Device, Kind};

    #[test]
    fn fused_swiglu_matches_composite() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        for shape in [vec![1, 256, 1536], vec![3, 5, 7], vec![1]] {
            let gate = Tensor::randn(shape.as_slice(), opts) * 4.0;
            let up = Tensor::randn(shape.as_slice(), opts);
            let upstream = Tensor::randn(shape.as_slice(), opts);
            let case = format!("{shape:?}");
            let fused = |t: &[Tensor]| crate::ffi::swiglu(&t[0], &t[1]).unwrap();
            let composite = |t: &[Tensor]| t[0].silu() * &t[1];
            assert_close(
                &with_grads(fused, &[&gate, &up], &upstream),
                &with_grads(composite, &[&gate, &up], &upstream),
                1e-6,
                &case,
            );
            let gate_grad = gate.copy().set_requires_grad(true);
            let trained = swiglu(&gate_grad, &up).unwrap();
            assert!(trained.equal(&crate::ffi::swiglu(&gate, &up).unwrap()));
            assert!(
                swiglu(&gate, &up).unwrap().equal(&(gate.silu() * &up)),
                "{case}"
            );
        }
        // Saturated gates: finite values and gradients, as libtorch's.
        let gate =
            Tensor::from_slice(&[-100.0f32, -30.0, 0.0, 30.0, 100.0, -0.0, 1e-30, 88.0, -88.0]);
        let up = gate.ones_like();
        let upstream = gate.ones_like();
        let ours = with_grads(
            |t| crate::ffi::swiglu(&t[0], &t[1]).unwrap(),
            &[&gate, &up],
            &upstream,
        );
        let reference = with_grads(|t| t[0].silu() * &t[1], &[&gate, &up], &upstream);
        for t in &ours {
            assert!(bool::try_from(t.isfinite().all()).unwrap());
        }
        assert_close(&ours, &reference, 1e-6, "saturated");
    }

    #[test]
    fn fused_swiglu_rejects_bad_inputs() {
        let f32s = (Kind::Float, Device::Cpu);
        let x = Tensor::zeros([2, 4, 2, 8], f32s);
        let errors = [
            crate::ffi::swiglu(&x, &Tensor::zeros([2, 4, 2, 7], f32s)).unwrap_err(),
            crate::ffi::swiglu(&x.to_kind(Kind::Double), &x.to_kind(Kind::Double)).unwrap_err(),
        ];
        for (err, expected) in errors.iter().zip(["shape", "float32"]) {
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }
}
