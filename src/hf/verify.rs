//! `loratch merge --verify`: before a merged model is written, the logits of the merged weights
//! (the very tensors [`crate::model::CausalLm::merged_state_dict`] gives the writer) are compared
//! on a few prompts with the base model plus its unmerged adapters, and with the base alone. A
//! merge that disagrees with base + adapter beyond float rounding, or that changes nothing (a
//! zero adapter, targets that matched nothing), fails with [`Error::MergeCheck`].
//!
//! The bound. Merged and unmerged differ only in rounding: `fl(W + s·B·A)` instead of `W` and
//! `s·B·A` applied separately, and the matmuls summing in another order. With unit roundoff `u`
//! of the model's dtype (2^-24 for float32), a dot product of length `K` carries a rounding
//! error of about `sqrt(K)·u` relative to the size of its terms (Higham's statistical estimate;
//! `K·u` is the worst case), and each of the `L` decoder layers (plus the head) adds its own
//! before the next one carries it on. Relative to the size of the logits that gives
//! `bound = (L + 1) · sqrt(K_max) · u · max(1, max |logits|)`, `K_max` the longest dot product
//! (the widest `in_features`). For SmolLM2-135M in float32 (L = 30, K_max = 1536, logits up to
//! ~30) that is ~2.2e-3, while the observed difference is ~7e-5, and a wrong merge (one
//! module's delta added twice, with small random adapters) moved the logits by ~1.2e-2 (a
//! safety factor of 8 on the bound let that pass, so there is none). A merge "changes nothing" when the merged
//! logits are within `4 · u · max(1, max |logits|)` of the base's (one rounding of the logits).
use std::mem;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::hf::loaded::LoadedModel;
use crate::model::linear::Weight;

/// The prompts `--verify` runs when none is given.
pub const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Question: How do I keep bread fresh for longer?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
];

/// What the check measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeCheck {
    /// max |merged - (base + adapter)| over the prompts' logits.
    pub mismatch: f64,
    /// max |merged - base|: what the merge changes.
    pub change: f64,
    /// The largest `mismatch` accepted (see the module docs).
    pub bound: f64,
    /// The largest `change` that counts as no change.
    pub unchanged_below: f64,
}

/// The unit roundoff of a float dtype.
fn unit_roundoff(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 2f64.powi(-53),
        Kind::Half => 2f64.powi(-11),
        Kind::BFloat16 => 2f64.powi(-8),
        _ => 2f64.powi(-24),
    }
}

/// The mismatch bound of the module docs.
pub fn mismatch_bound(kind: Kind, n_layers: i64, max_dot: i64, logit_scale: f64) -> f64 {
    (n_layers as f64 + 1.0) * (max_dot as f64).sqrt() * unit_roundoff(kind) * logit_scale.max(1.0)
}

/// The logits of every prompt, concatenated over positions, in float32.
fn logits(model: &LoadedModel, prompts: &[Vec<i64>]) -> Result<Tensor> {
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        let ids = Tensor::from_slice(p).f_unsqueeze(0)?;
        let l = tch::no_grad(|| model.forward(&ids, None))?;
        out.push(l.f_to_kind(Kind::Float)?.f_reshape([-1])?);
    }
    Ok(Tensor::f_cat(&out, 0)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])?)
}

/// Checks the merge of `model`'s (unmerged, enabled) adapters on `prompts` (token ids); see the
/// module docs. The model is left as it was.
pub fn verify_merge(model: &mut LoadedModel, prompts: &[Vec<i64>]) -> Result<MergeCheck> {
    verify_merge_with(model, prompts, |_| Ok(()))
}

/// [`verify_merge`], with `tamper` applied to the merged weights first (tests use it to stand
/// for a broken merge).
pub fn verify_merge_with(
    model: &mut LoadedModel,
    prompts: &[Vec<i64>],
    tamper: impl FnOnce(&mut Vec<(String, Tensor)>) -> Result<()>,
) -> Result<MergeCheck> {
    if model.lora.is_none() || model.merged || !model.enabled {
        return Err(Error::State(
            "verifying a merge needs loaded, enabled and unmerged adapters".into(),
        ));
    }
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Input(
            "verifying a merge needs non-empty prompts".into(),
        ));
    }
    let adapted = logits(model, prompts)?;
    model.set_enabled(false)?;
    let base = logits(model, prompts);
    let mut merged = model.lm.merged_state_dict().and_then(|mut m| {
        tamper(&mut m)?;
        Ok(m)
    });
    // The merged weights in place of the adapted linears' (adapters off), then put back.
    let mut swapped = Vec::new();
    if let Ok(weights) = &mut merged {
        for (path, lin) in model.lm.linears_mut() {
            let key = format!("{path}.weight");
            if lin.lora.is_none() {
                continue;
            }
            if let Some((_, w)) = weights.iter_mut().find(|(k, _)| *k == key) {
                let w = mem::replace(w, Tensor::new());
                swapped.push((path, mem::replace(&mut lin.weight, Weight::Dense(w))));
            }
        }
    }
    let merged_logits = merged.and_then(|_| logits(model, prompts));
    for (path, lin) in model.lm.linears_mut() {
        if let Some(i) = swapped.iter().position(|(p, _)| *p == path) {
            lin.weight = swapped.swap_remove(i).1;
        }
    }
    model.set_enabled(true)?;
    let (base, merged) = (base?, merged_logits?);
    let scale = adapted.f_abs()?.f_max()?.f_double_value(&[])?;
    let max_dot = model
        .lm
        .linears()
        .iter()
        .map(|(_, l)| l.in_features())
        .max()
        .unwrap_or(1);
    let kind = model.lm.kind();
    let check = MergeCheck {
        mismatch: max_abs_diff(&merged, &adapted)?,
        change: max_abs_diff(&merged, &base)?,
        bound: mismatch_bound(kind, model.lm.config.num_hidden_layers, max_dot, scale),
        unchanged_below: 4.0 * unit_roundoff(kind) * scale.max(1.0),
    };
    if check.mismatch.is_nan() || check.mismatch > check.bound {
        return Err(Error::MergeCheck(format!(
            "the merged model's logits differ from base + adapter by {:.3e} (bound {:.3e}): \
             the merge is wrong",
            check.mismatch, check.bound
        )));
    }
    if check.change <= check.unchanged_below {
        return Err(Error::MergeCheck(format!(
            "the merge changes nothing: the merged logits equal the base model's (max \
             difference {:.3e}); is the adapter zero (untrained B) or did its targets match \
             nothing?",
            check.change
        )));
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::loaded::LoadOptions;
    use crate::hf::LoadConfig;
    use crate::lora::{targets::Targets, LoraSpec};
    use crate::tokenizer::test_model_dir;

    fn smollm2_with_lora() -> (LoadedModel, Vec<Vec<i64>>) {
        let opts = LoadOptions::parse(&LoadConfig::default()).unwrap();
        let mut model = LoadedModel::load(&test_model_dir(), &opts).unwrap();
        let targets = Targets::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]);
        model
            .init_lora(LoraSpec::simple(4, 8.0, targets), Kind::Float)
            .unwrap();
        let prompts = vec![
            vec![1, 9690, 198, 2683, 314],
            vec![504, 3575, 282, 4649, 314],
        ];
        (model, prompts)
    }

    #[test]
    fn a_real_merge_passes_a_zero_adapter_and_a_broken_merge_fail() {
        let (mut model, prompts) = smollm2_with_lora();
        // A fresh adapter has B = 0: merging changes nothing.
        let err = verify_merge(&mut model, &prompts).unwrap_err();
        assert!(
            matches!(&err, Error::MergeCheck(m) if m.contains("changes nothing")),
            "{err}"
        );
        tch::manual_seed(0);
        tch::no_grad(|| {
            for mut p in model.parameters().unwrap() {
                p.f_copy_(&(p.randn_like() * 0.02)).unwrap();
            }
        });
        let before = logits(&model, &prompts).unwrap();
        let check = verify_merge(&mut model, &prompts).unwrap();
        assert!(
            check.mismatch <= check.bound && check.change > 10.0 * check.bound,
            "{check:?}"
        );
        // The model is as it was.
        assert!(logits(&model, &prompts).unwrap().equal(&before));
        // The adapter's delta added twice to one weight stands for a broken merge path.
        let lin = model
            .lm
            .linears()
            .into_iter()
            .find(|(p, _)| p.ends_with(".0.self_attn.q_proj"));
        let delta = lin.unwrap().1.lora.as_ref().unwrap().delta_f32().unwrap();
        let err = verify_merge_with(&mut model, &prompts, |w| {
            let (_, t) = w
                .iter_mut()
                .find(|(k, _)| k == "model.layers.0.self_attn.q_proj.weight")
                .unwrap();
            *t = t.f_add(&delta)?;
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::MergeCheck(m) if m.contains("merge is wrong")),
            "{err}"
        );
        assert!(logits(&model, &prompts).unwrap().equal(&before));
    }

    #[test]
    fn bound_scales_with_rounding() {
        let f32b = mismatch_bound(Kind::Float, 30, 1536, 30.0);
        assert!((f32b - 31.0 * 1536f64.sqrt() * 2f64.powi(-24) * 30.0).abs() < 1e-15);
        assert!(mismatch_bound(Kind::BFloat16, 30, 1536, 30.0) / f32b == 65536.0);
    }
}
