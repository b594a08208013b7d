//! Activation checkpointing of decoder layers ([`crate::ops::checkpoint`]): each layer keeps only
//! its input for the backward and runs again there. The rerun owns what it reads (shallow clones
//! of the layer's tensors and of the forward's [`Context`], and the memory maps its zero-copy
//! weights view), so it needs no borrow of the model: a model dropped or changed before the
//! backward leaves the graph's copy intact, and the gradients still reach the adapter tensors
//! (the clones share them).
use super::attention::{Context, Span};
use super::linear::LoraMode;
use super::llama::DecoderLayer;
use crate::error::Result;
use memmap2::MmapMut;
use std::sync::Arc;
use tch::Tensor;

/// A [`Span`] that owns its tensors (shallow clones).
struct OwnedSpan {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    is_causal: bool,
    window: Option<i64>,
}

impl OwnedSpan {
    fn of(s: &Span) -> Self {
        Self {
            cos: s.cos.shallow_clone(),
            sin: s.sin.shallow_clone(),
            mask: s.mask.map(Tensor::shallow_clone),
            is_causal: s.is_causal,
            window: s.window,
        }
    }

    fn view(&self) -> Span<'_> {
        Span {
            cos: &self.cos,
            sin: &self.sin,
            mask: self.mask.as_ref(),
            is_causal: self.is_causal,
            window: self.window,
        }
    }
}

/// A [`Context`] that owns its tensors (shallow clones) and segment lengths.
struct OwnedContext {
    full: OwnedSpan,
    sliding: Option<OwnedSpan>,
    segments: Option<Vec<i64>>,
    mode: LoraMode,
}

impl OwnedContext {
    fn of(ctx: &Context) -> Self {
        Self {
            full: OwnedSpan::of(&ctx.full),
            sliding: ctx.sliding.as_ref().map(OwnedSpan::of),
            segments: ctx.segments.map(<[i64]>::to_vec),
            mode: ctx.mode,
        }
    }

    fn view(&self) -> Context<'_> {
        Context {
            full: self.full.view(),
            sliding: self.sliding.as_ref().map(OwnedSpan::view),
            segments: self.segments.as_deref(),
            mode: self.mode,
        }
    }
}

/// `layer`'s output for `x`, keeping only `x` (and the layer's own tensors) for the backward.
/// `mappings`: the memory maps that the model's zero-copy weights view.
pub(super) fn layer_forward(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &Context,
    mappings: &[Arc<MmapMut>],
) -> Result<Tensor> {
    let layer = layer.shallow_clone();
    let params = layer.trainable(ctx.mode);
    let ctx = OwnedContext::of(ctx);
    let mappings = mappings.to_vec();
    crate::ops::checkpoint(x, &params.iter().collect::<Vec<_>>(), move |x| {
        let _views_stay_valid = &mappings;
        layer.forward(x, &ctx.view(), None)
    })
}

impl DecoderLayer {
    /// The same layer over the same tensors.
    pub fn shallow_clone(&self) -> Self {
        let norm = |n: &Option<super::norm::RmsNorm>| n.as_ref().map(|n| n.shallow_clone());
        Self {
            self_attn: self.self_attn.shallow_clone(),
            mlp: self.mlp.shallow_clone(),
            input_layernorm: self.input_layernorm.shallow_clone(),
            post_attention_layernorm: self.post_attention_layernorm.shallow_clone(),
            pre_feedforward_layernorm: norm(&self.pre_feedforward_layernorm),
            post_feedforward_layernorm: norm(&self.post_feedforward_layernorm),
        }
    }

    /// The tensors a forward in `mode` differentiates: those that require gradients among the
    /// weights, and the adapters that take part (enabled, not merged).
    fn trainable(&self, mode: LoraMode) -> Vec<Tensor> {
        let mut out = Vec::new();
        for (_, lin) in self.linears() {
            out.extend(
                lin.weight
                    .dense()
                    .filter(|w| w.requires_grad())
                    .map(Tensor::shallow_clone),
            );
            out.extend(
                lin.bias
                    .iter()
                    .filter(|b| b.requires_grad())
                    .map(Tensor::shallow_clone),
            );
            if let Some(ad) = lin.lora.as_ref().filter(|_| mode.enabled && !lin.merged) {
                out.extend(
                    [&ad.a, &ad.b]
                        .into_iter()
                        .filter(|t| t.requires_grad())
                        .map(Tensor::shallow_clone),
                );
            }
        }
        out.extend(
            self.norms()
                .into_iter()
                .filter(|(_, n)| n.weight.requires_grad())
                .map(|(_, n)| n.weight.shallow_clone()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::block_diagonal_mask;
    use crate::lora::{Adapter, LoraConfig};
    use crate::model::{CausalLm, Checkpoint, ModelConfig};
    use tch::{Device, Kind};

    const VOCAB: i64 = 64;
    const HIDDEN: i64 = 32;

    /// A tiny Qwen2 (q/k/v biases, GQA 4/2 heads, 2 layers, untied head) with random weights,
    /// written to a temp dir.
    fn tiny_model_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let (h, inter, heads, kv, hd) = (HIDDEN, 48i64, 4i64, 2i64, 8i64);
        let config = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": 2,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": VOCAB,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "hidden_act": "silu"
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        tch::manual_seed(11);
        let randn =
            |shape: &[i64], std: f64| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std;
        let mut t = vec![
            (
                "model.embed_tokens.weight".to_string(),
                randn(&[VOCAB, h], 0.5),
            ),
            ("lm_head.weight".to_string(), randn(&[VOCAB, h], 0.2)),
            ("model.norm.weight".to_string(), randn(&[h], 0.1) + 1.0),
        ];
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for (name, o, i) in [
                ("self_attn.q_proj", heads * hd, h),
                ("self_attn.k_proj", kv * hd, h),
                ("self_attn.v_proj", kv * hd, h),
                ("self_attn.o_proj", h, heads * hd),
                ("mlp.gate_proj", inter, h),
                ("mlp.up_proj", inter, h),
                ("mlp.down_proj", h, inter),
            ] {
                t.push((format!("{p}.{name}.weight"), randn(&[o, i], 0.2)));
                if name.starts_with("self_attn.") && name != "self_attn.o_proj" {
                    t.push((format!("{p}.{name}.bias"), randn(&[o], 0.1)));
                }
            }
            for n in ["input_layernorm", "post_attention_layernorm"] {
                t.push((format!("{p}.{n}.weight"), randn(&[h], 0.1) + 1.0));
            }
        }
        crate::io::safetensors::save(
            &dir.path().join("model.safetensors"),
            &t,
            &Default::default(),
        )
        .unwrap();
        dir
    }

    fn load(dir: &std::path::Path, kind: Kind) -> CausalLm {
        let config = ModelConfig::from_dir(dir).unwrap();
        let ck = Checkpoint::open(dir).unwrap();
        tch::no_grad(|| {
            CausalLm::load(
                &ck,
                config,
                kind,
                Device::Cpu,
                crate::model::Quantize::Stored,
            )
        })
        .unwrap()
    }

    /// Which module paths get adapters.
    type Targets = fn(&str) -> bool;

    /// Adapters (of `kind`, dropout `p`, non-zero B) on the modules whose path `targets` accepts.
    fn add_adapters(lm: &mut CausalLm, targets: Targets, kind: Kind, p: f64) {
        tch::manual_seed(5);
        for (path, lin) in lm.linears_mut() {
            lin.lora = None;
            if targets(&path) {
                let cfg = LoraConfig::new(4, 8.0, p, false).unwrap();
                let ad = Adapter::new(
                    lin.in_features(),
                    lin.out_features(),
                    cfg,
                    kind,
                    Device::Cpu,
                )
                .unwrap();
                tch::no_grad(|| {
                    let _ = ad.b.shallow_clone().normal_(0.0, 0.3);
                });
                lin.lora = Some(ad);
            }
        }
    }

    /// How a batch reaches the decoder.
    #[derive(Debug, Clone, Copy)]
    enum Input {
        /// Left-padded rows with an attention mask.
        Padded,
        /// Packed rows with a block-diagonal mask.
        BlockMask,
        /// Packed rows as segment lengths.
        Segments,
    }

    const B: i64 = 2;
    const T: i64 = 70;

    /// Logits `[B, T, vocab]` for fixed token ids, as `input` feeds them.
    fn logits(lm: &CausalLm, input: Input, mode: LoraMode) -> Result<Tensor> {
        let ids = Tensor::arange(B * T, (Kind::Int64, Device::Cpu))
            .f_mul_scalar(37)?
            .f_remainder(VOCAB)?
            .f_reshape([B, T])?;
        // Row 0: examples of 30 and 40 tokens; row 1: 50 tokens, 15, then 5 of padding.
        let lengths = [30i64, 40, 50, 15, 5];
        let ids_of_segment: Vec<i64> = [1, 2, 3, 4, 0]
            .iter()
            .zip(lengths)
            .flat_map(|(&id, n)| std::iter::repeat_n(id, n as usize))
            .collect();
        let seg = Tensor::from_slice(&ids_of_segment).f_reshape([B, T])?;
        let pos: Vec<i64> = lengths.iter().flat_map(|&n| 0..n).collect();
        let pos = Tensor::from_slice(&pos).f_reshape([B, T])?;
        let h = match input {
            Input::Padded => {
                let mask = Tensor::ones([B, T], (Kind::Int64, Device::Cpu));
                let _ = mask.narrow(1, 0, 9).get(1).fill_(0);
                lm.hidden_states(&ids, Some(&mask), None, mode)?
            }
            Input::BlockMask => {
                let mask = block_diagonal_mask(&seg)?;
                lm.hidden_states_packed(&ids, &pos, Some(&mask), mode)?
            }
            Input::Segments => lm.hidden_states_segments(&ids, &pos, &lengths, mode)?,
        };
        lm.lm_head.forward(&h, mode)
    }

    /// A fixed upstream gradient of `size` in `kind` (not drawn: no generator involved).
    fn upstream(size: &[i64], kind: Kind) -> Tensor {
        let n = size.iter().product::<i64>();
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37)
            .sin()
            .reshape(size)
            .to_kind(kind)
    }

    /// The logits and every adapter's gradients of `sum(logits * upstream)`, with checkpointing
    /// `on` or off.
    fn run(lm: &mut CausalLm, input: Input, mode: LoraMode, on: bool) -> Vec<Tensor> {
        lm.set_gradient_checkpointing(on);
        for (_, lin) in lm.linears() {
            if let Some(ad) = &lin.lora {
                for t in [&ad.a, &ad.b] {
                    crate::ffi::clear_grads(&[t]).unwrap();
                }
            }
        }
        let out = logits(lm, input, mode).unwrap();
        (&out * upstream(&out.size(), out.kind()))
            .sum(Kind::Float)
            .backward();
        let mut all = vec![out.detach()];
        for (_, lin) in lm.linears() {
            if let Some(ad) = &lin.lora {
                all.extend([ad.a.grad().copy(), ad.b.grad().copy()]);
            }
        }
        all
    }

    fn all_linear(p: &str) -> bool {
        p != "lm_head"
    }
    fn all_with_head(_: &str) -> bool {
        true
    }
    fn q_v(p: &str) -> bool {
        p.ends_with("q_proj") || p.ends_with("v_proj")
    }
    fn mlp(p: &str) -> bool {
        p.contains(".mlp.")
    }

    /// Checkpointing reruns the same ops in the same order on the same values, so the logits and
    /// every gradient equal the plain run's bit for bit.
    ///
    /// Without dropout: its masks come from torch's global generator, which the other tests of
    /// this process draw from on other threads meanwhile, so two runs here would not see the
    /// same masks. Dropout is checked where nothing else draws: tests/trainer.rs (holding its
    /// generator lock) and tests/python/test_gradient_checkpointing.py; the generator's replay
    /// itself in `ops::checkpoint`'s tests.
    #[test]
    fn gradients_equal_the_plain_run_bit_for_bit() {
        let dir = tiny_model_dir();
        let targets: [(&str, Targets); 4] = [
            ("all-linear", all_linear),
            ("all-linear + lm_head", all_with_head),
            ("q_proj, v_proj", q_v),
            ("mlp", mlp),
        ];
        // float32 model and adapters; bfloat16 models with float32 adapters (the trainer's
        // layout) and with bfloat16 ones.
        for (model_kind, adapter_kind) in [
            (Kind::Float, Kind::Float),
            (Kind::BFloat16, Kind::Float),
            (Kind::BFloat16, Kind::BFloat16),
        ] {
            let mut lm = load(dir.path(), model_kind);
            for (name, t) in targets {
                add_adapters(&mut lm, t, adapter_kind, 0.0);
                for input in [Input::Padded, Input::BlockMask, Input::Segments] {
                    let mode = LoraMode {
                        enabled: true,
                        training: false,
                    };
                    let case = format!(
                        "{model_kind:?} model, {adapter_kind:?} adapters, {name}, {input:?}"
                    );
                    // Other tests flip process-wide settings for a moment (the fused kernels'
                    // BLAS path, `ops::use_blas`), which can change the rounding between the two
                    // runs: an unequal pair is retried; a real difference fails every time.
                    for attempt in 1..=3 {
                        let plain = run(&mut lm, input, mode, false);
                        let checkpointed = run(&mut lm, input, mode, true);
                        assert!(plain.len() > 1 && plain[1].defined(), "{case}");
                        assert_eq!(plain.len(), checkpointed.len(), "{case}");
                        let differs = plain
                            .iter()
                            .zip(&checkpointed)
                            .position(|(a, b)| !a.equal(b));
                        match differs {
                            None => break,
                            Some(i) if attempt == 3 => panic!("{case}: tensor {i} differs"),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forwards_without_gradients_and_cached_decoding_are_unchanged() {
        let dir = tiny_model_dir();
        let mut lm = load(dir.path(), Kind::Float);
        add_adapters(&mut lm, all_linear, Kind::Float, 0.0);
        let mode = LoraMode {
            enabled: true,
            training: false,
        };
        let ids = Tensor::from_slice(&[3i64, 9, 27, 17, 51, 25]).reshape([1, 6]);
        let outputs = |lm: &CausalLm| {
            let plain = tch::no_grad(|| lm.forward(&ids, None, None, mode)).unwrap();
            let mut cache = crate::model::KvCache::new(lm.model.layers.len());
            let first = lm
                .forward(&ids.narrow(1, 0, 4), None, Some(&mut cache), mode)
                .unwrap();
            let rest = lm
                .forward(&ids.narrow(1, 4, 2), None, Some(&mut cache), mode)
                .unwrap();
            (plain, Tensor::cat(&[first, rest], 1))
        };
        let (plain_off, cached_off) = outputs(&lm);
        lm.set_gradient_checkpointing(true);
        let (plain_on, cached_on) = outputs(&lm);
        assert!(plain_off.equal(&plain_on));
        assert!(!plain_on.requires_grad());
        assert!(cached_off.equal(&cached_on));
    }

    /// The layers' backward needs nothing of the model: it may be gone, and the adapters it
    /// trained still get their gradients. (A bfloat16 model of a float32 file: its weights are
    /// copies, not views of the file's mapping, which the final norm's node of the outer graph
    /// would read after the model freed it.)
    #[test]
    fn the_backward_outlives_the_model() {
        let dir = tiny_model_dir();
        let mut lm = load(dir.path(), Kind::BFloat16);
        add_adapters(&mut lm, all_linear, Kind::Float, 0.0);
        let mode = LoraMode {
            enabled: true,
            training: false,
        };
        let expected = run(&mut lm, Input::Segments, mode, false);
        lm.set_gradient_checkpointing(true);
        let a = lm.model.layers[1]
            .mlp
            .down_proj
            .lora
            .as_ref()
            .unwrap()
            .a
            .shallow_clone();
        crate::ffi::clear_grads(&[&a]).unwrap();
        let out = logits(&lm, Input::Segments, mode).unwrap();
        drop(lm);
        (&out * upstream(&out.size(), out.kind()))
            .sum(Kind::Float)
            .backward();
        // down_proj's A of layer 1: the last layer's last adapter but one, before lm_head (none).
        let n = expected.len();
        assert!(a.grad().equal(&expected[n - 2]));
    }

    /// A failure in a layer's rerun (here an adapter tensor swapped for one of the wrong shape
    /// between the forward and the backward) is the backward's error, not an abort.
    #[test]
    fn an_error_in_the_recompute_is_the_backwards_error() {
        let dir = tiny_model_dir();
        let mut lm = load(dir.path(), Kind::Float);
        add_adapters(&mut lm, all_linear, Kind::Float, 0.0);
        lm.set_gradient_checkpointing(true);
        let mode = LoraMode {
            enabled: true,
            training: false,
        };
        let out = logits(&lm, Input::Padded, mode).unwrap();
        let mut a = lm.model.layers[0].self_attn.linears()[0]
            .1
            .lora
            .as_ref()
            .unwrap()
            .a
            .shallow_clone();
        tch::no_grad(|| a.set_data(&Tensor::zeros([3, 5], (Kind::Float, Device::Cpu))));
        let err = out.sum(Kind::Float).f_backward().unwrap_err().to_string();
        assert!(err.contains("in a checkpointed layer's recompute"), "{err}");
    }
}
