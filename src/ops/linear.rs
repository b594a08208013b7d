//! The model's projections: the LoRA linear `x W^T + b + scaling * B(A(dropout(x)))` as one
//! autograd node (csrc/lora_linear.cpp) whose rank-r products accumulate into the frozen GEMM's own
//! results, and the frozen linear `x W^T + b` of a projection without an active adapter.
use super::{path, Path, When};
use crate::error::Result;
use tch::Tensor;

/// The adapter's part of a LoRA linear: A `[r, in]`, B `[out, r]`, the scaling of `B @ A` and the
/// dropout probability on the adapter's input.
#[derive(Debug, Clone, Copy)]
pub struct LoraTerm<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

/// `x W^T + bias + scaling * B(A(dropout(x)))`, dropout only when `training` and p > 0.
///
/// An adapter of x's dtype runs the fused node (csrc/lora_linear.cpp) on every device: on CPU in
/// float32 its products split rows over the threads, elsewhere it runs libtorch's products; its
/// forward equals PEFT's formula. An adapter of another dtype (float32 adapters on a bfloat16
/// model, as the trainer lays them) takes PEFT's steps in libtorch's ops ([`mixed`]).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: &LoraTerm,
    training: bool,
) -> Result<Tensor> {
    let kind = x.f_kind()?;
    if lora.a.f_kind()? != kind {
        return mixed(x, weight, bias, lora, training);
    }
    let dropped = if training && lora.dropout > 0.0 {
        Some(x.f_dropout(lora.dropout, true)?)
    } else {
        None
    };
    Ok(crate::ffi::lora_linear(
        x,
        dropped.as_ref(),
        weight,
        bias,
        lora.a,
        lora.b,
        lora.scaling,
    )?)
}

/// The forward of an adapter whose dtype differs from x's, in PEFT's steps: the base linear in
/// x's dtype; the adapter's input cast to the adapter's dtype, then dropout, `(x A^T) B^T *
/// scaling` there; the sum taken in the wider dtype and cast back to x's.
fn mixed(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: &LoraTerm,
    training: bool,
) -> Result<Tensor> {
    add_lora_term(x, &x.f_linear(weight, bias)?, lora, training)
}

/// `base + scaling * B(A(dropout(x)))` in PEFT's steps, for a base product computed elsewhere (a
/// quantized weight's): the adapter's input cast to the adapter's dtype, dropout, the two rank-r
/// products and the scaling there, the sum in the wider dtype, cast back to x's.
pub fn add_lora_term(x: &Tensor, base: &Tensor, lora: &LoraTerm, training: bool) -> Result<Tensor> {
    let kind = x.f_kind()?;
    let xa = x.f_to_kind(lora.a.f_kind()?)?;
    let xa = if training && lora.dropout > 0.0 {
        xa.f_dropout(lora.dropout, true)?
    } else {
        xa
    };
    let term = xa
        .f_linear::<&Tensor>(lora.a, None)?
        .f_linear::<&Tensor>(lora.b, None)?
        .f_mul_scalar(lora.scaling)?;
    Ok(base.f_add(&term)?.f_to_kind(kind)?)
}

thread_local! {
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While a value of this type lives, this thread's forwards are generation's (`hf::generate`'s
/// prompt and decoding steps): a frozen float32 CPU linear of at most 8 rows then reads
/// its weight through AVX2 dot products ([`crate::ffi::dense_few_rows`]), not libtorch's `linear`
/// (whose oneMKL kernels, on stock PyTorch on AMD processors, read the weight at a fraction of
/// the memory bandwidth). Its sums run in another order, so the logits differ from transformers'
/// by float32 rounding; every other forward keeps libtorch's `linear`, equal to it bit for bit.
pub struct DecodingSteps {
    before: bool,
}

impl DecodingSteps {
    pub fn enter() -> Self {
        Self {
            before: DECODING.with(|d| d.replace(true)),
        }
    }
}

impl Drop for DecodingSteps {
    fn drop(&mut self) {
        DECODING.with(|d| d.set(self.before));
    }
}

/// Whether [`frozen_linear`] takes the decoding steps' kernel for these operands.
fn decoding_kernel_fits(x: &Tensor, weight: &Tensor) -> Result<bool> {
    if !DECODING.with(|d| d.get()) || x.requires_grad() || weight.requires_grad() {
        return Ok(false);
    }
    #[cfg(target_arch = "x86_64")]
    let cpu =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = false;
    let size = weight.size();
    let fits = cpu
        && size.len() == 2
        && size[1] % 32 == 0
        && weight.is_contiguous()
        && x.numel() as i64 <= 8 * size[1]
        && matches!(path(&[x, weight], When::Always)?, Path::Fused);
    Ok(fits)
}

/// `x W^T + bias` for a projection without an active adapter: while training on CPU in float32
/// the frozen node (csrc/lora_linear.cpp), whose products split rows over the threads like the
/// LoRA node's; in generation's decoding steps the AVX2 dot products ([`DecodingSteps`]);
/// otherwise libtorch's `linear`, equal to transformers' bit for bit.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if decoding_kernel_fits(x, weight)? {
        return Ok(crate::ffi::dense_few_rows(x, weight, bias)?);
    }
    match path(&[x, weight], When::Training)? {
        Path::Fused => Ok(crate::ffi::frozen_linear(x, weight, bias)?),
        Path::Composite => Ok(x.f_linear(weight, bias)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;
    use proptest::prelude::*;
    use tch::{Device, Kind};

    /// Inside [`DecodingSteps`] a frozen float32 linear of at most 8 rows takes the AVX2 dot
    /// products: within the float32 reordering bound of libtorch's `linear` (each output a sum of
    /// `in` products, `2 in^2 u max|x| max|w|` apart at most), on one thread and two, with and
    /// without bias. Outside it, with 9 rows, or with an input that records gradients, the result
    /// is `linear`'s own, bit for bit.
    #[test]
    fn decoding_steps_take_the_dot_products_within_the_bound() {
        let threads = tch::get_num_threads();
        tch::manual_seed(3);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (out, inf) = (1000, 576);
        let w = Tensor::randn([out, inf], opts);
        let bias = Tensor::randn([out], opts);
        let bound = |x: &Tensor| {
            let mx = x.abs().max().double_value(&[]);
            let mw = w.abs().max().double_value(&[]);
            2.0 * (inf * inf) as f64 * mx * mw * f32::EPSILON as f64 / 2.0
        };
        let decoding = DecodingSteps::enter();
        for (rows, n_threads) in [(1, 1), (1, 2), (3, 2), (8, 1)] {
            tch::set_num_threads(n_threads);
            let x = Tensor::randn([1, rows, inf], opts);
            for b in [None, Some(&bias)] {
                let y = frozen_linear(&x, &w, b).unwrap();
                assert_eq!(y.size(), vec![1, rows, out]);
                let diff = max_diff(&y, &x.linear(&w, b));
                assert!(diff <= bound(&x), "{rows} rows: {diff}");
            }
        }
        tch::set_num_threads(threads);
        let nine = Tensor::randn([9, inf], opts);
        let exact = |x: &Tensor| {
            max_diff(
                &frozen_linear(x, &w, Some(&bias)).unwrap(),
                &x.linear(&w, Some(&bias)),
            )
        };
        assert_eq!(exact(&nine), 0.0);
        let graded = Tensor::randn([2, inf], opts).set_requires_grad(true);
        assert_eq!(exact(&graded), 0.0);
        drop(decoding);
        assert_eq!(exact(&Tensor::randn([2, inf], opts)), 0.0);
    }

    /// An adapter's tensors for the tests: A `[r, in]`, B `[out, r]` and the scaling.
    struct Pair {
        a: Tensor,
        b: Tensor,
        scaling: f64,
    }

    impl Pair {
        fn term(&self, dropout: f64) -> LoraTerm<'_> {
            LoraTerm {
                a: &self.a,
                b: &self.b,
                scaling: self.scaling,
                dropout,
            }
        }
    }

    /// The adapted linear written out op by op, as PEFT computes it; `xd` is the adapter's input
    /// (x, or dropout(x)).
    fn composite(ad: &Pair, x: &Tensor, xd: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
        x.linear(w, bias)
            + xd.linear::<&Tensor>(&ad.a, None)
                .linear::<&Tensor>(&ad.b, None)
                * ad.scaling
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
            let ad = Pair {
                a: leaf(a0.copy(), true),
                b: leaf(bb0.copy(), true),
                scaling: 2.0,
            };
            // dropout(x) as torch computes it, with the mask drawn above.
            let xd = (dropout > 0.0).then(|| &x * &keep / (1.0 - dropout));
            let y = match (fused, &xd) {
                // Without dropout: the adapter's own entry point.
                (true, None) => lora_linear(&x, &w, bias.as_ref(), &ad.term(0.0), true).unwrap(),
                (true, Some(xd)) => crate::ffi::lora_linear(
                    &x,
                    Some(xd),
                    &w,
                    bias.as_ref(),
                    &ad.a,
                    &ad.b,
                    ad.scaling,
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
            let before = crate::ops::use_blas(blas);
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
            crate::ops::use_blas(before);
        }
    }

    /// The row split reads its operands through their strides: a column-major input and weight
    /// (transposed views) and a strided input (every other column) give the contiguous results.
    #[test]
    fn rows_split_over_threads_take_any_layout() {
        tch::set_num_threads(2);
        let opts = (Kind::Float, Device::Cpu);
        let ad = Pair {
            a: Tensor::randn([4, 32], opts),
            b: Tensor::randn([24, 4], opts),
            scaling: 2.0,
        };
        let x = Tensor::randn([160, 32], opts);
        let w = Tensor::randn([24, 32], opts);
        let expected = lora_linear(&x, &w, None, &ad.term(0.0), false).unwrap();
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
            let y = lora_linear(x, w, None, &ad.term(0.0), false).unwrap();
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
        let opts = (Kind::Float, Device::Cpu);
        let ad = Pair {
            a: Tensor::randn([2, 4], opts),
            b: Tensor::zeros([3, 2], opts),
            scaling: 2.0,
        };
        let w = Tensor::randn([3, 4], opts);
        let x = Tensor::randn([2, 5], opts);
        assert!(lora_linear(&x, &w, None, &ad.term(0.0), false).is_err());
        // A float64 input with float32 weights and adapter: the base linear refuses it.
        let x = Tensor::randn([2, 4], (Kind::Double, Device::Cpu));
        assert!(lora_linear(&x, &w, None, &ad.term(0.0), false).is_err());
        // A 0-d input (which the callers' shape checks never pass on) is refused here too.
        let ad1 = Pair {
            a: Tensor::randn([2, 1], opts),
            b: Tensor::zeros([3, 2], opts),
            scaling: 2.0,
        };
        let w1 = Tensor::randn([3, 1], opts);
        let scalar = Tensor::from(1.0f32);
        let err = lora_linear(&scalar, &w1, None, &ad1.term(0.0), false).unwrap_err();
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

    /// The training forward without an adapter ([`frozen_linear`]: rows split over
    /// 2 threads from 128 rows) against libtorch's `linear`: output and the gradients of the
    /// input, a trainable weight and the bias, through BLAS and through ATen.
    #[test]
    fn frozen_training_forward_matches_linear() {
        tch::set_num_threads(2);
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        for blas in [true, false] {
            let before = crate::ops::use_blas(blas);
            for (rows, with_bias, w_grad) in
                [(131, false, false), (2 * 64, true, true), (9, true, false)]
            {
                let w0 = Tensor::randn([24, 40], opts) * 0.2;
                let b0 = Tensor::randn([24], opts);
                let x0 = Tensor::randn([rows, 40], opts);
                let up = Tensor::randn([rows, 24], opts);
                let run = |ours: bool| {
                    let x = x0.copy().set_requires_grad(true);
                    let w = w0.copy().set_requires_grad(w_grad);
                    let b = with_bias.then(|| b0.copy().set_requires_grad(w_grad));
                    let y = if ours {
                        frozen_linear(&x, &w, b.as_ref()).unwrap()
                    } else {
                        x.linear(&w, b.as_ref())
                    };
                    (&y * &up).sum(Kind::Float).backward();
                    let grads = [
                        Some(x.grad()),
                        w_grad.then(|| w.grad()),
                        b.filter(|_| w_grad).map(|b| b.grad()),
                    ];
                    (y.detach(), grads)
                };
                let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
                let case = format!("blas {blas}, {rows} rows, bias {with_bias}, w_grad {w_grad}");
                assert!(max_diff(&y, &y_ref) <= 1e-5, "{case}: forward");
                for (got, want) in g.iter().zip(&g_ref) {
                    if let (Some(got), Some(want)) = (got, want) {
                        assert!(max_diff(got, want) <= 1e-4, "{case}: gradient");
                    }
                }
            }
            crate::ops::use_blas(before);
        }
    }
}
