//! The decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3) as transformers computes
//! it: decoder layers of [`Attention`] and [`Mlp`] between RMSNorms, the embedding and the output
//! head, with the families' options (Gemma's scaled embedding, sandwich norms and final-logit
//! soft-capping; sliding-window layers). Struct fields are named after the checkpoint keys:
//! `model.layers.{i}.post_attention_layernorm` is `CausalLm.model.layers[i].post_attention_layernorm`.
use super::attention::{Attention, AttentionOptions, Context, Span};
use super::cache::{KvCache, LayerSlot};
use super::config::{LayerType, ModelConfig};
use super::linear::{Linear, LoraMode, Quantize, Weight};
use super::loader::Loader;
use super::mask::attention_mask_4d;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::Rope;
use super::weights::WeightSource;
use crate::error::{Error, Result};
use crate::ops::attention::causal_mask;
use tch::{Device, Kind, Tensor};

/// `model.layers.{i}`.
#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// Gemma: the norm before the MLP (`post_attention_layernorm` then norms the attention's
    /// output) and the one after it.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
}

impl DecoderLayer {
    fn load(vb: &Loader, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let (h, eps, offset) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset);
        let norm = |name: &str| RmsNorm::load(&vb.pp(name), h, eps, offset);
        let sandwich = |name: &str| cfg.sandwich_norms.then(|| norm(name)).transpose();
        Ok(Self {
            self_attn: Attention::load(&vb.pp("self_attn"), AttentionOptions::of(cfg, i))?,
            mlp: Mlp::load(
                &vb.pp("mlp"),
                h,
                cfg.intermediate_size,
                cfg.activation,
                cfg.fused_projections,
            )?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: sandwich("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: sandwich("post_feedforward_layernorm")?,
        })
    }

    /// The layer's norms with their names in the checkpoint (q/k norms under `self_attn.`).
    pub fn norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        let mut out = vec![
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
        ];
        let optional = [
            ("pre_feedforward_layernorm", &self.pre_feedforward_layernorm),
            (
                "post_feedforward_layernorm",
                &self.post_feedforward_layernorm,
            ),
            ("self_attn.q_norm", &self.self_attn.q_norm),
            ("self_attn.k_norm", &self.self_attn.k_norm),
        ];
        out.extend(
            optional
                .into_iter()
                .filter_map(|(name, n)| n.as_ref().map(|n| (name, n))),
        );
        out
    }

    /// The layer's projections with their paths below the layer (`self_attn.q_proj`, ...).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let attn = self.self_attn.linears().into_iter();
        attn.map(|(n, l)| (format!("self_attn.{n}"), l))
            .chain(
                self.mlp
                    .linears()
                    .into_iter()
                    .map(|(n, l)| (format!("mlp.{n}"), l)),
            )
            .collect()
    }

    /// As [`linears`](Self::linears), mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let attn = self.self_attn.linears_mut().into_iter();
        attn.map(|(n, l)| (format!("self_attn.{n}"), l))
            .chain(
                self.mlp
                    .linears_mut()
                    .into_iter()
                    .map(|(n, l)| (format!("mlp.{n}"), l)),
            )
            .collect()
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<LayerSlot<'_>>,
    ) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, cache)?;
        // Gemma norms the attention's output before the residual and the MLP's input with its own
        // norm; Llama norms the MLP's input with post_attention_layernorm.
        let (h, mlp_in) = match &self.pre_feedforward_layernorm {
            Some(pre) => {
                let h = x.f_add(&self.post_attention_layernorm.forward(&attn)?)?;
                let mlp_in = pre.forward(&h)?;
                (h, mlp_in)
            }
            None => {
                let h = x.f_add(&attn)?;
                let mlp_in = self.post_attention_layernorm.forward(&h)?;
                (h, mlp_in)
            }
        };
        let out = self.mlp.forward(&mlp_in, ctx.mode)?;
        let out = match &self.post_feedforward_layernorm {
            Some(post) => post.forward(&out)?,
            None => out,
        };
        Ok(h.f_add(&out)?)
    }
}

/// `model`: embeddings, decoder layers, final norm.
#[derive(Debug)]
pub struct Model {
    /// `[vocab, hidden]`, float or in a block format (rows decoded on lookup).
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// `*ForCausalLM`: the decoder and its output head (`lm_head`, tied to `embed_tokens` when the
/// config says so).
#[derive(Debug)]
pub struct CausalLm {
    pub model: Model,
    pub lm_head: Linear,
    pub config: ModelConfig,
    rope: Rope,
    /// Sliding layers' own rotary tables (Gemma 3's local base).
    rope_sliding: Option<Rope>,
    kind: Kind,
    device: Device,
    /// Whether forwards that record gradients keep only each decoder layer's input and recompute
    /// the layer in the backward (see [`super::checkpoint`]).
    gradient_checkpointing: bool,
    /// Memory maps viewed by zero-copy weights (and kept by checkpointed layers' reruns).
    /// Declared last: dropped after every weight.
    mappings: Vec<std::sync::Arc<memmap2::MmapMut>>,
}

impl CausalLm {
    /// Builds the model from a checkpoint, every weight in `kind` on `device`; the projections and
    /// the embedding held as `quantize` says.
    pub fn load(
        ck: &dyn WeightSource,
        config: ModelConfig,
        kind: Kind,
        device: Device,
        quantize: Quantize,
    ) -> Result<Self> {
        let cfg = &config;
        let root = Loader::new(ck, kind, device, quantize);
        let vb = root.pp("model");
        let embed_tokens = vb
            .pp("embed_tokens")
            .weight("weight", &[cfg.vocab_size, cfg.hidden_size])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&vb.pp("layers").pp(i), cfg, i as usize))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            &vb.pp("norm"),
            cfg.hidden_size,
            cfg.rms_norm_eps,
            cfg.norm_unit_offset,
        )?;
        let head = root.pp("lm_head");
        let lm_head = if cfg.tie_word_embeddings || !head.contains("weight") {
            Linear::from_weight(embed_tokens.shallow_clone())
        } else {
            Linear::load(&head, cfg.hidden_size, cfg.vocab_size, false)?
        };
        let (d, max_pos) = (cfg.head_dim, cfg.max_position_embeddings);
        let rope = Rope::new(&cfg.rope, d, max_pos, device)?;
        let rope_sliding = cfg
            .rope_sliding
            .as_ref()
            .map(|p| Rope::new(p, d, max_pos, device))
            .transpose()?;
        Ok(Self {
            model: Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config,
            rope,
            rope_sliding,
            kind,
            device,
            gradient_checkpointing: false,
            mappings: ck.mappings(),
        })
    }

    /// The weights' dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The weights' device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Turns activation checkpointing of the decoder layers on or off: with it, a forward that
    /// records gradients (and uses no KV cache) keeps only each layer's input for the backward
    /// and runs the layer again there, trading about one more forward of compute for the layers'
    /// activations. Results and gradients do not change.
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) {
        self.gradient_checkpointing = enabled;
    }

    /// Whether activation checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// Final hidden states `[B, T, hidden]` for `input_ids` `[B, T]` (int64, on the model's device).
    ///
    /// `attention_mask` `[B, S]` (1 = token, 0 = padding; S = cached + T) makes padded batches
    /// equal to unpadded runs: positions count real tokens only and no query attends to padding.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        mode: LoraMode,
    ) -> Result<Tensor> {
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let positions = match attention_mask {
            Some(m) => {
                let pos = m
                    .f_cumsum(1, Kind::Int64)?
                    .f_sub_scalar(1)?
                    .f_clamp_min(0)?;
                pos.f_narrow(1, past, t)?
            }
            None => Tensor::f_arange_start(past, past + t, (Kind::Int64, self.device))?
                .f_expand([b, t], false)?,
        };
        let mask = |window: Option<i64>| -> Result<Option<Tensor>> {
            Ok(match attention_mask {
                Some(m) => Some(attention_mask_4d(m, past, t, window)?),
                // A window binds once the keys reach it (transformers masks from there on).
                None if window.is_some_and(|w| past + t >= w) => {
                    Some(causal_mask(past, t, window, self.device)?)
                }
                None if past > 0 && t > 1 => Some(causal_mask(past, t, None, self.device)?),
                None => None,
            })
        };
        let masks = Masks {
            full: mask(None)?,
            sliding: self
                .sliding_window()
                .map(|w| mask(Some(w)))
                .transpose()?
                .flatten(),
        };
        self.run(input_ids, &positions, masks, None, cache, mode)
    }

    /// Final hidden states for a training batch whose rows may hold several examples:
    /// `position_ids` `[B, T]` restart at 0 for each example, and `mask` (bool `[B, 1, T, T]`,
    /// true = attend, e.g. [`crate::data::block_diagonal_mask`]) keeps examples apart. Without
    /// a mask attention is plain causal (right-padded rows need none: no real token attends to
    /// the padding after it).
    pub fn hidden_states_packed(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask: Option<&Tensor>,
        mode: LoraMode,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let sliding = match (self.sliding_window(), mask) {
            (Some(w), Some(m)) if t >= w => {
                Some(m.f_logical_and(&causal_mask(0, t, Some(w), self.device)?)?)
            }
            (Some(w), None) if t >= w => Some(causal_mask(0, t, Some(w), self.device)?),
            _ => mask.map(Tensor::shallow_clone),
        };
        let masks = Masks {
            full: mask.map(Tensor::shallow_clone),
            sliding,
        };
        self.run(input_ids, position_ids, masks, None, None, mode)
    }

    /// Final hidden states `[B, T, hidden]` for packed rows, given the lengths of the runs of
    /// their row-major flattened `B * T` tokens (each example, and each row's padding: see
    /// [`crate::data::Batch::segment_lengths`]). Every run attends causally within itself only,
    /// one attention call per run: no `[T, T]` mask is built, and no query spends work on keys of
    /// other examples or on padding. `position_ids` restart at 0 for each example.
    pub fn hidden_states_segments(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        segment_lengths: &[i64],
        mode: LoraMode,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let total: i64 = segment_lengths.iter().sum();
        // A segment [at, at + len) of the flattened tokens must stay within one row.
        let within_rows = size.len() == 2 && size[1] > 0 && {
            let mut at = 0;
            segment_lengths.iter().all(|&len| {
                let start = at;
                at += len;
                len > 0 && start / size[1] == (at - 1) / size[1]
            })
        };
        if !within_rows || position_ids.size() != size || total != size.iter().product::<i64>() {
            return Err(Error::Shape(format!(
                "segment lengths (positive, each within one row, summing to B * T) do not fit \
                 input_ids {size:?} and position_ids {:?}: {} lengths summing to {total}",
                position_ids.size(),
                segment_lengths.len()
            )));
        }
        // The rows are laid end to end as one sequence; no segment spans two rows.
        let flat = |t: &Tensor| t.f_reshape([1, -1]);
        let h = self.run(
            &flat(input_ids)?,
            &flat(position_ids)?,
            Masks::default(),
            Some(segment_lengths),
            None,
            mode,
        )?;
        Ok(h.f_reshape([size[0], size[1], -1])?)
    }

    /// The length past which longrope's long factors apply, when the model has them: cached
    /// keys of shorter sequences were rotated with the short ones.
    pub fn rope_switch_length(&self) -> Option<i64> {
        self.rope.switch_length()
    }

    /// The window of the model's sliding layers, if it has any.
    fn sliding_window(&self) -> Option<i64> {
        let cfg = &self.config;
        cfg.sliding_window
            .filter(|_| cfg.layer_types.contains(&LayerType::Sliding))
    }

    /// The decoder stack: embeddings, layers (appending to `cache`), final norm.
    fn run(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        masks: Masks,
        segments: Option<&[i64]>,
        mut cache: Option<&mut KvCache>,
        mode: LoraMode,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let (cos, sin) = self.rope.cos_sin(positions, self.kind)?;
        let local = match &self.rope_sliding {
            Some(r) => Some(r.cos_sin(positions, self.kind)?),
            None => None,
        };
        let window = self.sliding_window();
        let sliding = window.map(|w| {
            let (cos, sin) = local.as_ref().map_or((&cos, &sin), |(c, s)| (c, s));
            Span {
                cos,
                sin,
                mask: masks.sliding.as_ref(),
                is_causal: masks.sliding.is_none() && t > 1,
                window: Some(w),
            }
        });
        let ctx = Context {
            full: Span {
                cos: &cos,
                sin: &sin,
                mask: masks.full.as_ref(),
                is_causal: masks.full.is_none() && t > 1,
                window: None,
            },
            sliding,
            segments,
            mode,
        };
        let mut h = match &self.model.embed_tokens {
            Weight::Dense(w) => Tensor::f_embedding(w, input_ids, -1, false, false)?,
            Weight::Quantized(q) => q.embedding(input_ids)?,
        };
        if let Some(scale) = self.config.embed_scale {
            // As transformers: a float32 scalar tensor cast to the weights' dtype.
            let scale = Tensor::f_from_slice(&[scale as f32])?
                .f_reshape([])?
                .f_to_kind(self.kind)?
                .f_to_device(self.device)?;
            h = h.f_mul(&scale)?;
        }
        let checkpointed = self.gradient_checkpointing
            && cache.is_none()
            && crate::ops::checkpoint::grad_enabled();
        for (i, layer) in self.model.layers.iter().enumerate() {
            h = if checkpointed {
                super::checkpoint::layer_forward(layer, &h, &ctx, &self.mappings)?
            } else {
                layer.forward(&h, &ctx, cache.as_deref_mut().map(|c| c.layer(i)))?
            };
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.model.norm.forward(&h)
    }

    /// Logits `[B, T, vocab]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        mode: LoraMode,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask, cache, mode)?;
        self.softcap_logits(self.lm_head.forward(&h, mode)?)
    }

    /// Gemma 2's final-logit soft-capping, `cap * tanh(logits / cap)`, when the config has it.
    pub fn softcap_logits(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.config.final_softcap {
            Some(cap) => logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?,
            None => logits,
        })
    }

    /// Every linear layer with its module path (the checkpoint key without `.weight`), in
    /// layer order, then `lm_head`.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            for (name, lin) in l.linears() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out.push(("lm_head".to_string(), &self.lm_head));
        out
    }

    /// As [`linears`](Self::linears), mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            for (name, lin) in l.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// Every base weight under its checkpoint key (the tied head omitted, as transformers saves
    /// it), with linears adapted by LoRA given as `W + scaling * B @ A` unless already merged.
    pub fn merged_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.model.embed_tokens.to_dense()?,
        )];
        for (i, l) in self.model.layers.iter().enumerate() {
            for (name, norm) in l.norms() {
                out.push((
                    format!("model.layers.{i}.{name}.weight"),
                    norm.weight.shallow_clone(),
                ));
            }
        }
        out.push((
            "model.norm.weight".to_string(),
            self.model.norm.weight.shallow_clone(),
        ));
        for (path, lin) in self.linears() {
            if path == "lm_head" && self.config.tie_word_embeddings {
                continue;
            }
            let weight = match &lin.lora {
                Some(ad) if !lin.merged => tch::no_grad(|| -> Result<Tensor> {
                    Ok(lin
                        .weight
                        .to_dense()?
                        .f_to_kind(Kind::Float)?
                        .f_add(&ad.delta_f32()?)?
                        .f_to_kind(self.kind)?)
                })?,
                _ => lin.weight.to_dense()?,
            };
            out.push((format!("{path}.weight"), weight));
            if let Some(b) = &lin.bias {
                out.push((format!("{path}.bias"), b.shallow_clone()));
            }
        }
        Ok(out)
    }

    /// The block format of the quantized weights, if any ("q4_0", or "mixed" when several).
    pub fn quantization(&self) -> Option<String> {
        let mut names: Vec<&str> = std::iter::once(&self.model.embed_tokens)
            .chain(self.linears().into_iter().map(|(_, l)| &l.weight))
            .filter_map(|w| w.quantization())
            .collect();
        names.sort_unstable();
        names.dedup();
        match names.as_slice() {
            [] => None,
            [one] => Some(one.to_string()),
            many => Some(many.join("+")),
        }
    }

    /// Bytes held by the base weights (quantized ones as their blocks; the tied head counted once).
    pub fn weight_bytes(&self) -> i64 {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0i64;
        let mut add_weight =
            |(bytes, ptr): (i64, usize), seen: &mut std::collections::HashSet<usize>| {
                if seen.insert(ptr) {
                    total += bytes;
                }
            };
        add_weight(self.model.embed_tokens.bytes_and_ptr(), &mut seen);
        for (_, lin) in self.linears() {
            add_weight(lin.weight.bytes_and_ptr(), &mut seen);
        }
        let mut add = |t: &Tensor| {
            if seen.insert(t.data_ptr() as usize) {
                total += (t.numel() * t.kind().elt_size_in_bytes()) as i64;
            }
        };
        add(&self.model.norm.weight);
        for l in &self.model.layers {
            for (_, norm) in l.norms() {
                add(&norm.weight);
            }
        }
        for (_, lin) in self.linears() {
            if let Some(b) = &lin.bias {
                add(b);
            }
        }
        total
    }
}

/// The attention masks of one forward: full layers' and sliding layers' (None: plain causal).
#[derive(Default)]
struct Masks {
    full: Option<Tensor>,
    sliding: Option<Tensor>,
}
