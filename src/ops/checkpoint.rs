//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
//! PyTorch's reentrant `torch.utils.checkpoint` with `preserve_rng_state`): a function of one
//! tensor as one autograd node that keeps only its input for the backward and recomputes its
//! inside there (csrc/checkpoint.cpp).
//!
//! The forward runs the function with gradients recorded, as a plain forward does, and frees that
//! graph at once; the backward reruns it on the saved input with the random generators as they
//! were in the forward (dropout draws the same masks) and back-propagates through the fresh graph.
//! The same ops run in the same order on the same values both times, so the output, the input's
//! gradient and the parameters' gradients equal those of the function without checkpointing.
use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// Whether this thread records gradients (off under `tch::no_grad`).
pub fn grad_enabled() -> bool {
    crate::ffi::grad_enabled()
}

/// `f(x)`, keeping only `x` for the backward and running `f` again there. `params` are the
/// tensors inside `f` that require gradients (they receive theirs through the node, also when `x`
/// requires none). `f` must own what it reads: it runs again in the backward, possibly after the
/// caller's borrows have ended, and is freed with the graph.
///
/// An error of `f` in the forward is returned as it is; one in the backward's rerun becomes the
/// backward's error ([`Error::Torch`] from `backward()`), with its message. Without anything that
/// requires gradients, or with gradients off, it is just `f(x)`.
pub fn checkpoint<F>(x: &Tensor, params: &[&Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + 'static,
{
    if !grad_enabled() || (params.is_empty() && !x.requires_grad()) {
        return f(x);
    }
    // The forward's error keeps its type: the closure leaves it here for the caller.
    let first_error: Arc<Mutex<Option<Error>>> = Arc::default();
    let slot = Arc::clone(&first_error);
    let run = move |x: &Tensor| -> std::result::Result<Tensor, String> {
        f(x).map_err(|e| {
            let message = format!("in a checkpointed layer's recompute: {e}");
            if let Ok(mut s) = slot.lock() {
                s.get_or_insert(e);
            }
            message
        })
    };
    crate::ffi::checkpoint(x, params, Box::new(run)).map_err(|e| {
        match first_error.lock().ok().and_then(|mut s| s.take()) {
            Some(typed) => typed,
            None => e.into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn leaf(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    /// `sum(tanh(x * w) * dropout(x))`'s gradients, with or without the node around the inside.
    fn grads(checkpointed: bool) -> (Vec<f32>, Vec<f32>, f64) {
        tch::manual_seed(7);
        let x = leaf(&[0.5, -1.0, 2.0, 0.25, 1.5, -0.75]);
        let w = leaf(&[1.5, 0.5, -2.0, 1.0, 0.25, 3.0]);
        let h = x.f_mul_scalar(2.0).unwrap();
        let inside = {
            let w = w.shallow_clone();
            move |h: &Tensor| -> Result<Tensor> {
                Ok(h.f_mul(&w)?.f_tanh()?.f_mul(&h.f_dropout(0.5, true)?)?)
            }
        };
        let y = if checkpointed {
            checkpoint(&h, &[&w], inside).unwrap()
        } else {
            inside(&h).unwrap()
        };
        let out = y.sum(Kind::Float);
        out.backward();
        // What the generator draws next: the recompute must leave it as the forward did.
        let next = Tensor::rand([1], (Kind::Double, Device::Cpu)).double_value(&[0]);
        let v = |t: Tensor| Vec::<f32>::try_from(t).unwrap();
        (v(x.grad()), v(w.grad()), next)
    }

    /// Another test thread drawing from the global generator between the seeding and the draws of
    /// one run makes the runs' masks differ: an unequal pair is retried. (A run takes
    /// microseconds, so most tries see no other draw.)
    #[test]
    fn gradients_and_generator_equal_the_plain_run() {
        let equal = (0..20).any(|_| grads(true) == grads(false));
        assert!(equal, "{:?} != {:?}", grads(true), grads(false));
    }

    #[test]
    fn the_input_may_need_no_gradient() {
        let w = leaf(&[1.0, 2.0]);
        let x = Tensor::from_slice(&[3.0f32, 4.0]);
        let ww = w.shallow_clone();
        let y = checkpoint(&x, &[&w], move |x| Ok(x.f_mul(&ww)?.f_square()?)).unwrap();
        assert!(y.requires_grad());
        y.sum(Kind::Float).backward();
        // d/dw (x w)^2 = 2 x^2 w
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![18.0, 64.0]);
    }

    #[test]
    fn no_gradients_no_node() {
        let x = leaf(&[1.0, 2.0]);
        let y = tch::no_grad(|| checkpoint(&x, &[], |x| Ok(x.f_mul_scalar(2.0)?)).unwrap());
        assert!(!y.requires_grad());
    }

    #[test]
    fn a_forward_error_keeps_its_type() {
        let x = leaf(&[1.0]);
        let err = checkpoint(&x, &[], |_| -> Result<Tensor> {
            Err(Error::Shape("bad".into()))
        })
        .unwrap_err();
        assert!(matches!(err, Error::Shape(ref m) if m == "bad"), "{err:?}");
    }

    #[test]
    fn a_recompute_error_or_panic_is_the_backwards_error() {
        for panics in [false, true] {
            let calls = std::sync::atomic::AtomicUsize::new(0);
            let x = leaf(&[1.0, 2.0]);
            let y = checkpoint(&x, &[], move |x| {
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    return Ok(x.f_mul_scalar(2.0)?);
                }
                if panics {
                    panic!("recompute blew up");
                }
                Err(Error::Shape("recompute failed".into()))
            })
            .unwrap();
            let err = y.sum(Kind::Float).f_backward().unwrap_err().to_string();
            let expected = if panics {
                "panic in a checkpointed function: recompute blew up"
            } else {
                "in a checkpointed layer's recompute: shape error: recompute failed"
            };
            assert!(err.contains(expected), "{err}");
            assert!(!x.grad().defined());
        }
    }

    #[test]
    fn the_function_is_freed_with_the_graph() {
        let alive = Arc::new(());
        let x = leaf(&[1.0]);
        let held = Arc::clone(&alive);
        let y = checkpoint(&x, &[], move |x| {
            let _ = &held;
            Ok(x.f_mul_scalar(3.0)?)
        })
        .unwrap();
        assert_eq!(Arc::strong_count(&alive), 2);
        y.sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![3.0]);
        drop(y);
        assert_eq!(Arc::strong_count(&alive), 1);
    }
}
