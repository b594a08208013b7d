//! The output head's two products in the loss, outside autograd: the logits `x W^T` of a large
//! vocabulary, and the gradient `g W` that reaches the hidden states.
use super::{path, Path, When};
use crate::error::Result;
use tch::Tensor;

/// Vocabulary rows per GEMM when the CPU head is computed in column blocks (see [`head_logits`]).
const HEAD_BLOCK: i64 = 512;

/// The logits `x W^T + bias` of a frozen head `weight` `[vocab, hidden]` for `x` `[rows, hidden]`.
///
/// On CPU, oneMKL runs the single `[rows, hidden] x [hidden, vocab]` product of a large vocabulary
/// well below its usual speed (BENCHMARKS.md, "output head in column blocks"). So in float32 on
/// the CPU (the fused path, [`When::Always`]), a head without bias and with more than two blocks of
/// vocabulary is computed block by block straight into the result (csrc/blas.cpp): the same dot
/// products, up to float rounding, with each thread computing its own rows, so the cross-entropy's
/// row loop (the same halves) reads logits its own core wrote. A chunk with too few rows for that
/// (a large vocabulary's: the loss's chunks hold 64 rows of 262144 logits) has its blocks dealt
/// out to the threads instead. Everything else takes `linear`.
pub fn head_logits(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let blocks = bias.is_none() && weight.size()[0] > 2 * HEAD_BLOCK;
    if blocks && path(&[x, weight], When::Always)? == Path::Fused {
        return Ok(crate::ffi::mm_rows(x, &weight.f_tr()?, HEAD_BLOCK)?);
    }
    Ok(x.f_linear(weight, bias)?)
}

/// `g W` for the logits' gradient `g` `[rows, vocab]` and the head `weight` `[vocab, hidden]`: the
/// gradient reaching the hidden states. In float32 on the CPU its rows (or, for too few rows, its
/// columns) are split over the threads as [`head_logits`]' are; otherwise libtorch's `mm`.
pub fn head_input_grad(g: &Tensor, weight: &Tensor) -> Result<Tensor> {
    match path(&[g, weight], When::Always)? {
        Path::Fused => Ok(crate::ffi::mm_rows(g, weight, 0)?),
        Path::Composite => Ok(g.f_mm(weight)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The head's forward (column blocks; rows split over 2 threads from 128 rows, blocks below)
    /// and its backward product (`g W`; columns split below 128 rows from 128 columns) match
    /// libtorch's products, through BLAS and through ATen.
    #[test]
    fn blocked_head_matches_linear() {
        tch::manual_seed(3);
        tch::set_num_threads(2);
        let opts = (Kind::Float, Device::Cpu);
        let close = |got: &Tensor, want: &Tensor, tol: f64, case: &str| {
            assert_eq!(got.size(), want.size(), "{case}");
            if want.numel() > 0 {
                let diff = (got - want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                assert!(diff <= tol * scale, "{case}: {diff} vs {scale}");
            }
        };
        for blas in [true, false] {
            let before = crate::ops::use_blas(blas);
            // 2600 = five 512-column blocks and a partial one; 131 rows split 66 + 65; 7 and 1
            // rows split the blocks (1025: 512 + 512 and 1) and, for 160 hidden, `g W`'s columns.
            let cases = [
                (7, 2600, 64),
                (7, 2600, 160),
                (1, 1025, 130),
                (300, 1536, 64),
                (131, 2600, 64),
                (0, 2600, 64),
            ];
            for (rows, vocab, hidden) in cases {
                let w = Tensor::randn([vocab, hidden], opts);
                let x = Tensor::randn([rows, hidden], opts);
                let case = format!("blas {blas}: {rows}x{vocab}x{hidden}");
                let got = head_logits(&x, &w, None).unwrap();
                close(&got, &x.linear::<&Tensor>(&w, None), 1e-6, &case);
                let g = Tensor::randn([rows, vocab], opts);
                let back = head_input_grad(&g, &w).unwrap();
                // A column split's single-threaded product sums the `vocab` terms in another
                // order than libtorch's shared one: a few float32 roundings more.
                let tol = if rows < 128 && hidden >= 128 {
                    4e-6
                } else {
                    1e-6
                };
                close(&back, &g.mm(&w), tol, &format!("{case} backward"));
            }
            crate::ops::use_blas(before);
        }
        let err = crate::ffi::mm_rows(
            &Tensor::zeros([3, 4], opts),
            &Tensor::zeros([5, 2], opts),
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("[m, k] and [k, n]"), "{err}");
    }

    #[test]
    fn head_with_a_bias_keeps_its_bias() {
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([3, 8], opts);
        let w = Tensor::randn([2048, 8], opts);
        let bias = Tensor::randn([2048], opts);
        let got = head_logits(&x, &w, Some(&bias)).unwrap();
        let want = x.linear(&w, Some(&bias));
        assert!(got.allclose(&want, 1e-6, 1e-6, false));
    }
}
