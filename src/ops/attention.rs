//! Attention of queries `[B, H, T, D]` over keys and values `[B, KV, S, D]` (grouped-query when
//! `KV < H`): plain causal attention, which trains on CPU with the blocked kernel
//! (csrc/causal_attention.cpp); attention under an explicit mask; and packed rows, whose examples
//! each attend causally within themselves.
use super::{path, Path, When};
use crate::error::Result;
use tch::Tensor;

/// Sequences up to this length train with the blocked kernel ([`blocked`]); its saved
/// probabilities grow with the square of the length, so longer ones use libtorch's attention.
const BLOCKED_MAX_LEN: i64 = 512;
/// Query positions per block of [`blocked`]: on SmolLM2-135M's 256-token rows on 2 CPU threads,
/// blocks of 64 were the fastest of 32 to 256 (BENCHMARKS.md, "attention block size").
const BLOCK: i64 = 64;

/// How one attention forms its scores: the query scale (`None`: `1 / sqrt(D)`), Gemma 2's
/// soft-capping `cap * tanh(s / cap)`, and whether keys are grouped (`KV < H`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    pub scale: Option<f64>,
    pub softcap: Option<f64>,
    pub gqa: bool,
}

/// Causal attention of `q` `[B, H, T, D]` over `k`, `v` `[B, KV, T, D]` (the same positions).
/// Training on CPU in float32 up to [`BLOCKED_MAX_LEN`] positions runs the blocked kernel, which
/// skips the products the mask hides (libtorch's CPU flash attention computes them); everything
/// else runs libtorch's `scaled_dot_product_attention`, or with soft-capping [`eager_attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, s: Scores) -> Result<Tensor> {
    if s.softcap.is_some() {
        return eager_attention(q, k, v, None, true, s);
    }
    let (t, d) = (q.size()[2], q.size()[3]);
    let fits = t <= BLOCKED_MAX_LEN && k.size()[2] == t;
    if fits && path(&[q, k, v], When::Training)? == Path::Fused {
        let scale = s.scale.unwrap_or(1.0 / (d as f64).sqrt());
        return Ok(blocked(q, k, v, scale, BLOCK)?);
    }
    Ok(Tensor::f_scaled_dot_product_attention::<&Tensor>(
        q, k, v, None, 0.0, true, s.scale, s.gqa,
    )?)
}

/// Attention under `mask` (boolean, broadcastable to `[B, H, T, S]`, true = attend) or plain
/// causal (`is_causal`) or full; libtorch's `scaled_dot_product_attention` (no fused kernel), or
/// with soft-capping [`eager_attention`].
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    is_causal: bool,
    s: Scores,
) -> Result<Tensor> {
    if s.softcap.is_some() {
        return eager_attention(q, k, v, mask, is_causal, s);
    }
    Ok(Tensor::f_scaled_dot_product_attention(
        q, k, v, mask, 0.0, is_causal, s.scale, s.gqa,
    )?)
}

/// Attention written out as transformers' `eager_attention_forward` (the only one of its paths
/// that soft-caps): keys repeated per group, `q k^T * scale`, soft-capped, plus a mask of 0 and
/// the dtype's lowest value, softmax in float32, times `v`. Without `mask`, `is_causal` masks
/// keys after each query (queries aligned to the last keys).
pub fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    is_causal: bool,
    s: Scores,
) -> Result<Tensor> {
    let (h, d) = (q.size()[1], q.size()[3]);
    let kind = q.f_kind()?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        let [b, kv, n, dd] = x.size()[..] else {
            return Ok(x.shallow_clone());
        };
        if kv == h {
            return Ok(x.shallow_clone());
        }
        Ok(x.f_unsqueeze(2)?
            .f_expand([b, kv, h / kv, n, dd], false)?
            .f_reshape([b, h, n, dd])?)
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scale = s.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mut scores = q.f_matmul(&k.f_transpose(2, 3)?)?.f_mul_scalar(scale)?;
    if let Some(cap) = s.softcap {
        scores = scores.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?;
    }
    let causal;
    let mask = match mask {
        Some(m) => Some(m),
        None if is_causal => {
            let (t, n) = (q.size()[2], k.size()[2]);
            causal = causal_mask(n - t, t, None, q.device())?;
            Some(&causal)
        }
        None => None,
    };
    if let Some(m) = mask {
        let zero = Tensor::f_zeros([], (kind, q.device()))?;
        let lowest = Tensor::f_full([], lowest_of(kind), (kind, q.device()))?;
        scores = scores.f_add(&zero.f_where_self(m, &lowest)?)?;
    }
    // transformers' softmax runs in float32 (float64 stays float64: the tests' exact reference).
    let softmax_kind = match kind {
        tch::Kind::Double => tch::Kind::Double,
        _ => tch::Kind::Float,
    };
    let probs = scores.f_softmax(-1, softmax_kind)?.f_to_kind(kind)?;
    Ok(probs.f_matmul(&v)?)
}

/// The causal mask of `t` queries after `past` earlier keys, `[1, 1, t, past + t]` (true =
/// attend): key `j` is seen by query `i` when `j <= i` and, with a `window`, `i - j < window`
/// (transformers' sliding window: the query itself and the `window - 1` keys before it).
pub fn causal_mask(past: i64, t: i64, window: Option<i64>, device: tch::Device) -> Result<Tensor> {
    let q = Tensor::f_arange_start(past, past + t, (tch::Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(past + t, (tch::Kind::Int64, device))?.f_unsqueeze(0)?;
    let mut mask = k.f_le_tensor(&q)?;
    if let Some(w) = window {
        mask = mask.f_logical_and(&k.f_gt_tensor(&q.f_sub_scalar(w)?)?)?;
    }
    Ok(mask.f_unsqueeze(0)?.f_unsqueeze(0)?)
}

/// `torch.finfo(kind).min`.
fn lowest_of(kind: tch::Kind) -> f64 {
    match kind {
        tch::Kind::Half => -65504.0,
        tch::Kind::BFloat16 => -3.3895313892515355e38,
        tch::Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Causal attention within each run of `lengths` consecutive positions (the examples of one packed
/// row): one attention per example, split and concatenated so each backward is one op; with a
/// `window`, a run at least that long attends to its last `window` positions only. Not the
/// blocked kernel: on the short examples of a packed row it saves nothing (BENCHMARKS.md,
/// "packed rows").
pub fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[i64],
    window: Option<i64>,
    s: Scores,
) -> Result<Tensor> {
    let (qs, ks, vs) = (
        q.f_split_with_sizes(lengths, 2)?,
        k.f_split_with_sizes(lengths, 2)?,
        v.f_split_with_sizes(lengths, 2)?,
    );
    let mut outs = Vec::with_capacity(lengths.len());
    for (((q, k), v), &len) in qs.iter().zip(&ks).zip(&vs).zip(lengths) {
        outs.push(match window.filter(|&w| len >= w) {
            Some(w) => {
                let mask = causal_mask(0, len, Some(w), q.device())?;
                masked_attention(q, k, v, Some(&mask), false, s)?
            }
            None => masked_attention(q, k, v, None, true, s)?,
        });
    }
    Ok(Tensor::f_cat(&outs, 2)?)
}

/// The blocked causal attention kernel itself (csrc/causal_attention.cpp), `softmax(q k^T * scale
/// + causal mask) v` in blocks of `block` query positions; for benchmarks and tests (model code
/// calls [`causal_attention`]). See [`crate::ffi::causal_attention`] for its layouts.
pub fn blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    block: i64,
) -> std::result::Result<Tensor, tch::TchError> {
    crate::ffi::causal_attention(q, k, v, scale, block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_diff, with_grads};
    use tch::{Device, Kind};

    fn gqa(gqa: bool) -> Scores {
        Scores {
            gqa,
            ..Scores::default()
        }
    }

    /// [`with_grads`] for the attention's three inputs.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        upstream: &Tensor,
    ) -> Vec<Tensor> {
        with_grads(|t| f(&t[0], &t[1], &t[2]), &[q, k, v], upstream)
    }

    #[test]
    fn blocked_attention_matches_sdpa() {
        tch::manual_seed(0);
        let opts = (Kind::Float, Device::Cpu);
        // (batch, heads, kv heads, length, head dim, block)
        let cases = [
            (1, 9, 3, 256, 64, 64),
            (2, 4, 4, 70, 16, 64),
            (1, 6, 2, 130, 8, 32),
            (1, 2, 1, 1, 8, 64),
            (1, 4, 2, 37, 16, 1),
            (2, 4, 2, 45, 16, 300),
        ];
        for (b, h, kv, t, d, block) in cases {
            let q = Tensor::randn([b, h, t, d], opts);
            let k = Tensor::randn([b, kv, t, d], opts);
            let v = Tensor::randn([b, kv, t, d], opts);
            let up = Tensor::randn([b, h, t, d], opts);
            let scale = 1.0 / (d as f64).sqrt();
            let ours = run(
                |q, k, v| blocked(q, k, v, scale, block).unwrap(),
                &q,
                &k,
                &v,
                &up,
            );
            let reference = run(
                |q, k, v| {
                    Tensor::scaled_dot_product_attention::<&Tensor>(
                        q,
                        k,
                        v,
                        None,
                        0.0,
                        true,
                        None,
                        h != kv,
                    )
                },
                &q,
                &k,
                &v,
                &up,
            );
            for (i, (a, r)) in ours.iter().zip(&reference).enumerate() {
                assert_eq!(a.size(), r.size(), "case {b}x{h}/{kv}x{t}x{d}, tensor {i}");
                let diff = max_diff(a, r);
                assert!(
                    diff < 1e-4,
                    "case {b}x{h}/{kv}x{t}x{d} block {block}, tensor {i}: {diff}"
                );
            }
            // The op gives the same results, blocked (grad) or not (no grad).
            let dispatched = run(
                |q, k, v| causal_attention(q, k, v, gqa(h != kv)).unwrap(),
                &q,
                &k,
                &v,
                &up,
            );
            let plain = tch::no_grad(|| causal_attention(&q, &k, &v, gqa(h != kv)).unwrap());
            assert!(max_diff(&dispatched[0], &reference[0]) < 1e-4);
            assert!(max_diff(&plain, &reference[0]) < 1e-4);
            // With gradients it took the blocked op, without them libtorch's: bit for bit.
            if block == BLOCK {
                assert!(dispatched[0].equal(&ours[0]), "case {b}x{h}/{kv}x{t}x{d}");
            }
            assert!(plain.equal(&reference[0]), "case {b}x{h}/{kv}x{t}x{d}");
        }
    }

    /// The blocked op reads its inputs through their strides and writes each gradient in its
    /// input's layout: the model's layouts (q and k from the rotary op, v a transposed view),
    /// a head dim that is not unit-stride (copied first), and the ATen fallback of its BLAS
    /// calls all give the contiguous run's results; odd strides of length-1 dims and expanded
    /// keys match libtorch's attention.
    #[test]
    fn blocked_attention_takes_any_layout() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let (b, h, kv, t, d) = (2, 6, 2, 75, 16);
        let q = Tensor::randn([b, h, t, d], opts);
        let k = Tensor::randn([b, kv, t, d], opts);
        let v = Tensor::randn([b, kv, t, d], opts);
        let up = Tensor::randn([b, h, t, d], opts);
        let attention = |q: &Tensor, k: &Tensor, v: &Tensor| blocked(q, k, v, 0.25, 16).unwrap();
        let reference = run(attention, &q, &k, &v, &up);
        // The output is [B, T, H, D] in memory.
        assert!(reference[0].transpose(1, 2).is_contiguous());
        // [B, T, n, D] memory seen as [B, n, T, D] (v's layout in the model).
        let moved = |x: &Tensor| x.transpose(1, 2).contiguous().transpose(1, 2);
        // Head dim strided: [B, n, D, T] memory seen as [B, n, T, D].
        let strided = |x: &Tensor| x.transpose(2, 3).contiguous().transpose(2, 3);
        for (name, layout) in [
            ("moved", &moved as &dyn Fn(&Tensor) -> Tensor),
            ("strided", &strided),
        ] {
            let ours = run(
                |q, k, v| attention(&layout(q), &layout(k), &layout(v)),
                &q,
                &k,
                &v,
                &up,
            );
            for (i, (a, r)) in ours.iter().zip(&reference).enumerate() {
                assert!(a.equal(r), "{name} layout, tensor {i}: {}", max_diff(a, r));
            }
        }
        let within_1e5 = |ours: &[Tensor], reference: &[Tensor], case: &str| {
            for (i, (a, r)) in ours.iter().zip(reference).enumerate() {
                let diff = max_diff(a, r);
                assert!(diff < 1e-5, "{case}, tensor {i}: {diff}");
            }
        };
        // One position, its rows given odd strides (a length-1 dim may have any), and keys and
        // values expanded along T (stride 0: BLAS cannot read them, so they are copied first).
        let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Tensor::scaled_dot_product_attention::<&Tensor>(
                q,
                k,
                v,
                None,
                0.0,
                true,
                Some(0.25),
                true,
            )
        };
        let odd = |x: &Tensor| {
            let s = x.size();
            x.as_strided(s.as_slice(), [s[1] * s[3], s[3], 1, 1], None)
        };
        let (q1, k1, v1) = (
            Tensor::randn([1, 4, 1, 8], opts),
            Tensor::randn([1, 2, 1, 8], opts),
            Tensor::randn([1, 2, 1, 8], opts),
        );
        let up1 = Tensor::randn([1, 4, 1, 8], opts);
        let ours = run(
            |q, k, v| attention(&odd(q), &odd(k), &odd(v)),
            &q1,
            &k1,
            &v1,
            &up1,
        );
        let reference1 = run(sdpa, &q1, &k1, &v1, &up1);
        within_1e5(&ours, &reference1, "one position");
        let q5 = Tensor::randn([1, 4, 5, 8], opts);
        let up5 = Tensor::randn([1, 4, 5, 8], opts);
        let wide = |x: &Tensor| x.expand([1, 2, 5, 8], false);
        let ours = run(
            |q, k, v| attention(q, &wide(k), &wide(v)),
            &q5,
            &k1,
            &v1,
            &up5,
        );
        let reference5 = run(|q, k, v| sdpa(q, &wide(k), &wide(v)), &q5, &k1, &v1, &up5);
        within_1e5(&ours, &reference5, "expanded keys");
        let before = crate::ops::use_blas(false);
        let fallback = run(attention, &q, &k, &v, &up);
        crate::ops::use_blas(before);
        within_1e5(&fallback, &reference, "ATen fallback");
    }

    #[test]
    fn blocked_attention_rejects_bad_shapes() {
        let opts = (Kind::Float, Device::Cpu);
        let q = Tensor::zeros([1, 3, 8, 4], opts);
        let k2 = Tensor::zeros([1, 2, 8, 4], opts);
        let short = Tensor::zeros([1, 3, 7, 4], opts);
        let flat = Tensor::zeros([3, 8, 4], opts);
        for (q, k, v) in [
            (&q, &k2, &k2),
            (&q, &short, &short),
            (&q, &q, &short),
            (&flat, &flat, &flat),
        ] {
            let err = blocked(q, k, v, 0.5, 4).unwrap_err();
            assert!(err.to_string().contains("causal attention"), "{err}");
        }
        let err = blocked(&q, &q, &q, 0.5, 0).unwrap_err();
        assert!(err.to_string().contains("block"), "{err}");
    }

    /// Packed rows: each run attends within itself, as separate attentions would.
    #[test]
    fn segment_attention_equals_separate_attentions() {
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) = (
            Tensor::randn([1, 4, 9, 8], opts),
            Tensor::randn([1, 2, 9, 8], opts),
            Tensor::randn([1, 2, 9, 8], opts),
        );
        let got = segment_attention(&q, &k, &v, &[4, 5], None, gqa(true)).unwrap();
        for (start, len) in [(0, 4), (4, 5)] {
            let part = |t: &Tensor| t.narrow(2, start, len);
            let want =
                masked_attention(&part(&q), &part(&k), &part(&v), None, true, gqa(true)).unwrap();
            assert!(got.narrow(2, start, len).equal(&want), "segment at {start}");
        }
    }
}
