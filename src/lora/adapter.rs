//! One LoRA adapter: the pair A `[r, in]`, B `[out, r]` with PEFT's default initialisation, its
//! forward contribution and its weight delta.
use super::config::LoraConfig;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The trainable pair of a LoRA adapter.
#[derive(Debug)]
pub struct Adapter {
    /// `lora_A.weight`, `[r, in_features]`, requires grad.
    pub a: Tensor,
    /// `lora_B.weight`, `[out_features, r]`, requires grad.
    pub b: Tensor,
    /// Its hyper-parameters.
    pub config: LoraConfig,
}

impl Adapter {
    /// A fresh adapter: A kaiming-uniform with `a = sqrt(5)` (the `nn.Linear` default, i.e.
    /// U(-1/sqrt(in), 1/sqrt(in))), B zeros, so it adds nothing until trained. Uses torch's global
    /// generator (`torch.manual_seed` makes it reproducible).
    pub fn new(
        in_features: i64,
        out_features: i64,
        config: LoraConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if in_features <= 0 || out_features <= 0 {
            return Err(Error::Config(format!(
                "in_features and out_features must be > 0, got {in_features} and {out_features}"
            )));
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = tch::no_grad(|| -> Result<Tensor> {
            let mut a = Tensor::f_empty([config.rank, in_features], (Kind::Float, device))?;
            let _ = a.f_uniform_(-bound, bound)?;
            Ok(a.f_to_kind(kind)?)
        })?
        .set_requires_grad(true);
        let b =
            Tensor::f_zeros([out_features, config.rank], (kind, device))?.set_requires_grad(true);
        Ok(Self { a, b, config })
    }

    /// `in_features` of the adapted linear.
    pub fn in_features(&self) -> i64 {
        self.a.size()[1]
    }

    /// `out_features` of the adapted linear.
    pub fn out_features(&self) -> i64 {
        self.b.size()[0]
    }

    /// The adapted linear's forward: `x W^T + bias + scaling * B(A(dropout(x)))`, as one autograd
    /// node that accumulates both rank-r products into the frozen GEMM's results (see
    /// [`crate::bridge::lora_linear`]). Dropout only when `training` and p > 0.
    pub fn forward_with_base(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        training: bool,
    ) -> Result<Tensor> {
        let kind = x.f_kind()?;
        if self.a.f_kind()? != kind {
            return self.forward_mixed(x, weight, bias, training, kind);
        }
        let dropped = if training && self.config.dropout > 0.0 {
            Some(x.f_dropout(self.config.dropout, true)?)
        } else {
            None
        };
        Ok(crate::bridge::lora_linear(
            x,
            dropped.as_ref(),
            weight,
            bias,
            &self.a,
            &self.b,
            self.config.scaling(),
        )?)
    }

    /// The forward of an adapter whose dtype differs from the model's (float32 adapters on a
    /// bfloat16 or float16 model, as the trainer lays them), in PEFT's steps: the base linear in
    /// the model's dtype; the adapter's input cast to the adapter's dtype, then dropout,
    /// `(x A^T) B^T * scaling` there; the sum taken in the wider dtype and cast back to x's.
    fn forward_mixed(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        training: bool,
        kind: Kind,
    ) -> Result<Tensor> {
        let base = x.f_linear(weight, bias)?;
        let xa = x.f_to_kind(self.a.f_kind()?)?;
        let xa = if training && self.config.dropout > 0.0 {
            xa.f_dropout(self.config.dropout, true)?
        } else {
            xa
        };
        let lora = xa
            .f_linear::<&Tensor>(&self.a, None)?
            .f_linear::<&Tensor>(&self.b, None)?
            .f_mul_scalar(self.config.scaling())?;
        Ok(base.f_add(&lora)?.f_to_kind(kind)?)
    }

    /// `scaling * B @ A` in float32 (whatever the adapter's dtype), detached. A delta holding NaN or
    /// Inf is an [`Error::NonFinite`].
    pub fn delta_f32(&self) -> Result<Tensor> {
        let delta = tch::no_grad(|| -> Result<Tensor> {
            let a = self.a.f_to_kind(Kind::Float)?;
            let b = self.b.f_to_kind(Kind::Float)?;
            Ok(b.f_matmul(&a)?.f_mul_scalar(self.config.scaling())?)
        })?;
        if !all_finite(&delta)? {
            return Err(Error::NonFinite(
                "the LoRA delta scaling * B @ A contains NaN or Inf; weights left unchanged".into(),
            ));
        }
        Ok(delta)
    }

    /// Adds `sign * delta` to `weight` in place, computed in float32 and rounded once to the
    /// weight's dtype. The delta is checked before anything is written.
    pub fn add_delta_to(&self, weight: &mut Tensor, sign: f64) -> Result<()> {
        let delta = self.delta_f32()?;
        if weight.size() != delta.size() {
            return Err(Error::Shape(format!(
                "weight {:?} does not match the adapter delta {:?}",
                weight.size(),
                delta.size()
            )));
        }
        tch::no_grad(|| -> Result<()> {
            let updated = weight
                .f_to_kind(Kind::Float)?
                .f_add(&delta.f_mul_scalar(sign)?)?;
            weight.f_copy_(&updated)?;
            Ok(())
        })
    }
}

/// True when every element of `t` is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The adapted linear written out op by op, as PEFT computes it; `xd` is the adapter's input
    /// (x, or dropout(x)).
    fn composite(
        ad: &Adapter,
        x: &Tensor,
        xd: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Tensor {
        x.linear(w, bias)
            + xd.linear::<&Tensor>(&ad.a, None)
                .linear::<&Tensor>(&ad.b, None)
                * ad.config.scaling()
    }

    fn leaf(t: Tensor, grad: bool) -> Tensor {
        t.detach().set_requires_grad(grad)
    }

    fn grad_of(t: &Tensor) -> Tensor {
        let g = t.grad();
        if g.defined() {
            g
        } else {
            t.zeros_like()
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        if a.numel() == 0 {
            return 0.0;
        }
        (a - b).abs().max().double_value(&[])
    }

    /// Forward and every gradient of the fused node against the composite graph. Returns the
    /// forward difference and the worst gradient difference.
    #[allow(clippy::too_many_arguments)]
    fn compare(
        lead: &[i64],
        (i, o, r): (i64, i64, i64),
        with_bias: bool,
        dropout: f64,
        x_grad: bool,
        w_grad: bool,
        kind: Kind,
        seed: i64,
    ) -> (f64, f64) {
        tch::manual_seed(seed);
        let opts = (kind, Device::Cpu);
        let cfg = LoraConfig::new(r, 2.0 * r as f64, dropout, false).unwrap();
        let mut shape = lead.to_vec();
        shape.push(i);
        let x0 = Tensor::randn(shape.as_slice(), opts);
        let w0 = Tensor::randn([o, i], opts) * 0.2;
        let b0 = Tensor::randn([o], opts);
        let a0 = Tensor::randn([r, i], opts) * 0.2;
        let bb0 = Tensor::randn([o, r], opts) * 0.2;
        let mut out_shape = lead.to_vec();
        out_shape.push(o);
        let g = Tensor::randn(out_shape.as_slice(), opts);
        // One dropout mask, drawn here, for both sides: the global generator is shared with tests
        // running on other threads, so re-seeding before each side would not give equal masks.
        let keep = Tensor::rand(shape.as_slice(), opts)
            .ge(dropout)
            .to_kind(kind);
        let run = |fused: bool| -> (Tensor, Vec<Tensor>) {
            let (x, w) = (leaf(x0.copy(), x_grad), leaf(w0.copy(), w_grad));
            let bias = with_bias.then(|| leaf(b0.copy(), w_grad));
            let ad = Adapter {
                a: leaf(a0.copy(), true),
                b: leaf(bb0.copy(), true),
                config: cfg,
            };
            // dropout(x) as torch computes it, with the mask drawn above.
            let xd = (dropout > 0.0).then(|| &x * &keep / (1.0 - dropout));
            let y = match (fused, &xd) {
                // Without dropout: the adapter's own entry point.
                (true, None) => ad.forward_with_base(&x, &w, bias.as_ref(), true).unwrap(),
                (true, Some(xd)) => crate::bridge::lora_linear(
                    &x,
                    Some(xd),
                    &w,
                    bias.as_ref(),
                    &ad.a,
                    &ad.b,
                    ad.config.scaling(),
                )
                .unwrap(),
                (false, xd) => composite(&ad, &x, xd.as_ref().unwrap_or(&x), &w, bias.as_ref()),
            };
            assert_eq!(y.size(), out_shape);
            (&y * &g).sum(kind).backward();
            let mut grads = vec![grad_of(&ad.a), grad_of(&ad.b), grad_of(&x), grad_of(&w)];
            if let Some(b) = &bias {
                grads.push(grad_of(b));
            }
            assert_eq!(x.grad().defined(), x_grad);
            assert_eq!(w.grad().defined(), w_grad);
            (y.detach(), grads)
        };
        let (y_f, g_f) = run(true);
        let (y_c, g_c) = run(false);
        let worst = g_f
            .iter()
            .zip(&g_c)
            .map(|(a, b)| max_diff(a, b))
            .fold(0.0, f64::max);
        (max_diff(&y_f, &y_c), worst)
    }

    #[test]
    fn fused_forward_is_bit_identical_without_dropout() {
        for (lead, dims) in [(vec![3, 7], (24, 40, 4)), (vec![256], (576, 1536, 16))] {
            let (fwd, grads) = compare(&lead, dims, false, 0.0, true, false, Kind::Float, 3);
            assert_eq!(fwd, 0.0, "{lead:?} {dims:?}");
            assert!(grads <= 1e-4, "{lead:?} {dims:?}: {grads}");
        }
    }

    /// On CPU with 2 threads, 128 rows or more are dealt out to the threads, each running its
    /// rows' products through BLAS directly (csrc/lora_linear.cpp): even and odd splits, with or
    /// without bias, dropout, the input's gradient or a trainable weight, and through ATen
    /// instead of BLAS, match the composite; so do 100 rows (not split).
    #[test]
    fn fused_matches_composite_with_rows_split_over_threads() {
        tch::set_num_threads(2);
        for blas in [true, false] {
            let before = crate::bridge::use_blas(blas);
            for (lead, dims) in [
                (vec![2, 64], (40, 24, 4)),
                (vec![131], (48, 80, 8)),
                (vec![100], (48, 80, 8)),
            ] {
                for (with_bias, dropout, x_grad, w_grad) in [
                    (false, 0.0, true, false),
                    (true, 0.0, true, false),
                    (false, 0.3, true, false),
                    (true, 0.3, false, true),
                    (false, 0.0, false, false),
                ] {
                    let (fwd, grads) = compare(
                        &lead,
                        dims,
                        with_bias,
                        dropout,
                        x_grad,
                        w_grad,
                        Kind::Float,
                        7,
                    );
                    let case = format!(
                        "blas {blas} {lead:?} {dims:?} bias {with_bias} dropout {dropout} \
                         x_grad {x_grad} w_grad {w_grad}"
                    );
                    assert!(fwd <= 1e-5, "{case}: forward {fwd}");
                    assert!(grads <= 1e-4, "{case}: gradients {grads}");
                }
            }
            crate::bridge::use_blas(before);
        }
    }

    /// The row split reads its operands through their strides: a column-major input and weight
    /// (transposed views) and a strided input (every other column) give the contiguous results.
    #[test]
    fn rows_split_over_threads_take_any_layout() {
        tch::set_num_threads(2);
        let opts = (Kind::Float, Device::Cpu);
        let cfg = LoraConfig::new(4, 8.0, 0.0, false).unwrap();
        let ad = Adapter {
            a: Tensor::randn([4, 32], opts),
            b: Tensor::randn([24, 4], opts),
            config: cfg,
        };
        let x = Tensor::randn([160, 32], opts);
        let w = Tensor::randn([24, 32], opts);
        let expected = ad.forward_with_base(&x, &w, None, false).unwrap();
        // Other layouts may change oneMKL's summation order: float rounding of outputs ~30.
        let tol = 1e-6 * expected.abs().max().double_value(&[]);
        let x_cols = x.tr().contiguous().tr();
        let w_cols = w.tr().contiguous().tr();
        let x_strided = Tensor::zeros([160, 64], opts);
        x_strided.slice(1, 0, 64, 2).copy_(&x);
        for (name, x, w) in [
            ("column-major input", &x_cols, &w),
            ("column-major weight", &x, &w_cols),
            ("every other column", &x_strided.slice(1, 0, 64, 2), &w),
        ] {
            let y = ad.forward_with_base(x, w, None, false).unwrap();
            let d = max_diff(&y, &expected);
            assert!(d <= tol, "{name}: {d} > {tol}");
        }
    }

    #[test]
    fn fused_matches_composite_in_bf16() {
        let (fwd, grads) = compare(
            &[2, 5],
            (32, 16, 8),
            true,
            0.0,
            true,
            false,
            Kind::BFloat16,
            5,
        );
        assert!(fwd <= 0.05 && grads <= 0.1, "{fwd} {grads}");
    }

    #[test]
    fn fused_node_reports_bad_shapes_as_errors() {
        let cfg = LoraConfig::new(2, 4.0, 0.0, false).unwrap();
        let ad = Adapter::new(4, 3, cfg, Kind::Float, Device::Cpu).unwrap();
        let w = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        assert!(ad.forward_with_base(&x, &w, None, false).is_err());
        let x = Tensor::randn([2, 4], (Kind::Double, Device::Cpu));
        assert!(ad.forward_with_base(&x, &w, None, false).is_err());
        // A 0-d input (which the callers' shape checks never pass on) is refused here too.
        let ad1 = Adapter::new(1, 3, cfg, Kind::Float, Device::Cpu).unwrap();
        let w1 = Tensor::randn([3, 1], (Kind::Float, Device::Cpu));
        let scalar = Tensor::from(1.0f32);
        let err = ad1
            .forward_with_base(&scalar, &w1, None, false)
            .unwrap_err();
        assert!(err.to_string().contains("at least one dimension"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn fused_matches_composite_forward_and_gradients(
            lead in proptest::collection::vec(0i64..4, 0..3), i in 1i64..20, o in 1i64..20,
            r in 1i64..6, with_bias: bool, dropped: bool, x_grad: bool, w_grad: bool, seed in 0i64..1000,
        ) {
            let dropout = if dropped { 0.3 } else { 0.0 };
            let (fwd, grads) =
                compare(&lead, (i, o, r), with_bias, dropout, x_grad, w_grad, Kind::Float, seed);
            prop_assert!(fwd <= 1e-5, "forward differs by {}", fwd);
            prop_assert!(grads <= 1e-4, "a gradient differs by {}", grads);
        }
    }
}
