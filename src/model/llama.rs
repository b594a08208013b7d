//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) as transformers computes it: decoder
//! layers of [`Attention`] and [`Mlp`] between RMSNorms, the embedding and the output head. Struct
//! fields are named after the checkpoint keys: `model.layers.{i}.self_attn.q_proj` is
//! `CausalLm.model.layers[i].self_attn.q_proj`.
use super::attention::{Attention, AttentionOptions, Context};
use super::cache::KvCache;
use super::config::ModelConfig;
use super::linear::{Linear, LoraMode, Quantize, Weight};
use super::loader::Loader;
use super::mask::{attention_mask_4d, causal_mask};
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::Rope;
use super::weights::WeightSource;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// `model.layers.{i}`.
#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(vb: &Loader, cfg: &ModelConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::load(&vb.pp("self_attn"), AttentionOptions::of(cfg))?,
            mlp: Mlp::load(&vb.pp("mlp"), h, cfg.intermediate_size)?,
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::load(&vb.pp("post_attention_layernorm"), h, eps)?,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let h = x.f_add(&self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            ctx,
            cache,
        )?)?;
        Ok(h.f_add(
            &self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?, ctx.mode)?,
        )?)
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
            .map(|i| DecoderLayer::load(&vb.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let head = root.pp("lm_head");
        let lm_head = if cfg.tie_word_embeddings || !head.contains("weight") {
            Linear::from_weight(embed_tokens.shallow_clone())
        } else {
            Linear::load(&head, cfg.hidden_size, cfg.vocab_size, false)?
        };
        let rope = Rope::new(cfg, device)?;
        Ok(Self {
            model: Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config,
            rope,
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
        let mask = match attention_mask {
            Some(m) => Some(attention_mask_4d(m, past, t)?),
            None if past > 0 && t > 1 => Some(causal_mask(past, t, self.device)?),
            None => None,
        };
        self.run(input_ids, &positions, mask.as_ref(), None, cache, mode)
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
        self.run(input_ids, position_ids, mask, None, None, mode)
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
            None,
            Some(segment_lengths),
            None,
            mode,
        )?;
        Ok(h.f_reshape([size[0], size[1], -1])?)
    }

    /// The decoder stack: embeddings, layers (appending to `cache`), final norm.
    fn run(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        segments: Option<&[i64]>,
        mut cache: Option<&mut KvCache>,
        mode: LoraMode,
    ) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let (cos, sin) = self.rope.cos_sin(positions, self.kind)?;
        let ctx = Context {
            cos: &cos,
            sin: &sin,
            mask,
            segments,
            is_causal: mask.is_none() && t > 1,
            mode,
        };
        let mut h = match &self.model.embed_tokens {
            Weight::Dense(w) => Tensor::f_embedding(w, input_ids, -1, false, false)?,
            Weight::Quantized(q) => q.embedding(input_ids)?,
        };
        let checkpointed = self.gradient_checkpointing
            && cache.is_none()
            && crate::ops::checkpoint::grad_enabled();
        for (i, layer) in self.model.layers.iter().enumerate() {
            h = if checkpointed {
                super::checkpoint::layer_forward(layer, &h, &ctx, &self.mappings)?
            } else {
                layer.forward(&h, &ctx, cache.as_deref_mut().map(|c| &mut c.layers[i]))?
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
        self.lm_head.forward(&h, mode)
    }

    /// Every linear layer with its module path (the checkpoint key without `.weight`), in
    /// layer order, then `lm_head`.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
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
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
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
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.weight.shallow_clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.shallow_clone(),
            ));
            if let Some(n) = &l.self_attn.q_norm {
                out.push((
                    format!("{p}.self_attn.q_norm.weight"),
                    n.weight.shallow_clone(),
                ));
            }
            if let Some(n) = &l.self_attn.k_norm {
                out.push((
                    format!("{p}.self_attn.k_norm.weight"),
                    n.weight.shallow_clone(),
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
            add(&l.input_layernorm.weight);
            add(&l.post_attention_layernorm.weight);
            for n in [&l.self_attn.q_norm, &l.self_attn.k_norm]
                .into_iter()
                .flatten()
            {
                add(&n.weight);
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
