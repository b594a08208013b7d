//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) as transformers computes it. Struct
//! fields are named after the checkpoint keys: `model.layers.{i}.self_attn.q_proj` is
//! `CausalLm.model.layers[i].self_attn.q_proj`.
use super::cache::KvCache;
use super::config::ModelConfig;
use super::linear::{Linear, LoraMode};
use super::rope::Rope;
use super::weights::Checkpoint;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// `LlamaRMSNorm`: `weight * (x / sqrt(mean(x^2) + eps))`, normalised in float32.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(
        ck: &Checkpoint,
        path: &str,
        dim: i64,
        eps: f64,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: ck.load(&format!("{path}.weight"), &[dim], kind, device)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if trains_on_cpu_f32(&[x, &self.weight])? {
            return Ok(crate::bridge::rms_norm(x, &self.weight, self.eps)?);
        }
        self.composite(x)
    }

    /// The forward from libtorch ops, as transformers writes it.
    fn composite(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.f_kind()?;
        let x32 = x.f_to_kind(Kind::Float)?;
        let var = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }
}

/// `self_attn`: grouped-query attention with rotary embeddings.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

/// Per-forward inputs shared by every layer.
pub struct Context<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Boolean `[B, 1, T, S]` (true = attend), or None for plain causal attention.
    pub mask: Option<&'a Tensor>,
    /// Lengths of consecutive runs of the (single) row that attend causally within themselves
    /// only (packed examples); None: the row is one sequence.
    pub segments: Option<&'a [i64]>,
    pub is_causal: bool,
    pub mode: LoraMode,
}

impl Attention {
    fn load(ck: &Checkpoint, p: &str, cfg: &ModelConfig, kind: Kind, dev: Device) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::load(
                    ck,
                    &format!("{p}.{name}"),
                    d,
                    cfg.rms_norm_eps,
                    kind,
                    dev,
                )?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q_proj: Linear::load(
                ck,
                &format!("{p}.q_proj"),
                h,
                q_out,
                cfg.qkv_bias,
                kind,
                dev,
            )?,
            k_proj: Linear::load(
                ck,
                &format!("{p}.k_proj"),
                h,
                kv_out,
                cfg.qkv_bias,
                kind,
                dev,
            )?,
            v_proj: Linear::load(
                ck,
                &format!("{p}.v_proj"),
                h,
                kv_out,
                cfg.qkv_bias,
                kind,
                dev,
            )?,
            o_proj: Linear::load(ck, &format!("{p}.o_proj"), q_out, h, cfg.o_bias, kind, dev)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        // `[B, T, n, D]`, normed per head when the model says so.
        let heads = |proj: &Linear, n: i64, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = proj
                .forward(x, ctx.mode)?
                .f_view([b, t, n, self.head_dim])?;
            match norm {
                Some(norm) => norm.forward(&y),
                None => Ok(y),
            }
        };
        let q = rotary(
            &heads(&self.q_proj, self.n_heads, &self.q_norm)?,
            ctx.cos,
            ctx.sin,
        )?;
        let mut k = rotary(
            &heads(&self.k_proj, self.n_kv_heads, &self.k_norm)?,
            ctx.cos,
            ctx.sin,
        )?;
        let mut v = heads(&self.v_proj, self.n_kv_heads, &None)?.f_transpose(1, 2)?;
        if let Some((ck, cv)) = cache {
            if ck.numel() > 0 {
                k = Tensor::f_cat(&[&*ck, &k], 2)?;
                v = Tensor::f_cat(&[&*cv, &v], 2)?;
            }
            *ck = k.shallow_clone();
            *cv = v.shallow_clone();
        }
        let gqa = self.n_heads != self.n_kv_heads;
        let out = match ctx.segments {
            // One causal attention per example (split and cat: each backward is one op). Not
            // the blocked op: on the short examples of a packed row it saves nothing. Tried with
            // its segments taken in one call: 96 FAQ examples trained in 30.0-30.4 s against
            // 30.3-31.3 s this way (two alternated runs each), for an extra sum(len^2) of saved
            // probabilities per head and layer.
            Some(lengths) => {
                let (qs, ks, vs) = (
                    q.f_split_with_sizes(lengths, 2)?,
                    k.f_split_with_sizes(lengths, 2)?,
                    v.f_split_with_sizes(lengths, 2)?,
                );
                let outs = qs
                    .iter()
                    .zip(&ks)
                    .zip(&vs)
                    .map(|((q, k), v)| {
                        Tensor::f_scaled_dot_product_attention::<&Tensor>(
                            q, k, v, None, 0.0, true, None, gqa,
                        )
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Tensor::f_cat(&outs, 2)?
            }
            None if ctx.mask.is_none() && ctx.is_causal => causal_self_attention(&q, &k, &v, gqa)?,
            None => Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                ctx.mask,
                0.0,
                ctx.is_causal,
                None,
                gqa,
            )?,
        };
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.n_heads * self.head_dim])?;
        self.o_proj.forward(&out, ctx.mode)
    }
}

/// Whether an op over `tensors` runs its fused CPU kernel (csrc/): all float32 on the CPU, on one
/// device, and some of them recording gradients. Those kernels round differently from libtorch's
/// composite ops (by float rounding), so forwards without gradients (inference, evaluation) keep
/// the composite ops and stay equal to transformers bit for bit.
pub(super) fn trains_on_cpu_f32(tensors: &[&Tensor]) -> Result<bool> {
    for t in tensors {
        if t.device() != Device::Cpu || t.f_kind()? != Kind::Float {
            return Ok(false);
        }
    }
    Ok(tensors.iter().any(|t| t.requires_grad()))
}

/// The heads `y` `[B, T, n, D]` moved to `[B, n, T, D]`, with the rotary embedding of `cos` and
/// `sin` `[B, 1, T, D]`.
fn rotary(y: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if trains_on_cpu_f32(&[y, cos, sin])? {
        return Ok(crate::bridge::rotary(y, cos, sin)?);
    }
    Rope::apply(&y.f_transpose(1, 2)?, cos, sin)
}

/// `silu(gate) * up`.
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if trains_on_cpu_f32(&[gate, up])? {
        return Ok(crate::bridge::swiglu(gate, up)?);
    }
    Ok(gate.f_silu()?.f_mul(up)?)
}

/// Sequences up to this length train with [`crate::bridge::causal_attention`]; its saved
/// probabilities grow with the square of the length, so longer ones use libtorch's attention.
const BLOCKED_ATTENTION_MAX_LEN: i64 = 512;
/// Query positions per block of [`crate::bridge::causal_attention`]: for SmolLM2-135M's 256-token
/// rows on 2 CPU threads, a layer's attention forward and backward (with the model's reshapes
/// around it) took 2.2-2.5 ms with blocks of 64 (medians of five rounds of 100 calls, two runs),
/// against 2.4-2.6 (32), 2.5-2.6 (128), 3.3-3.6 (256) and libtorch's flash attention 4.2-4.3.
const ATTENTION_BLOCK: i64 = 64;

/// Causal attention of `q` `[B, H, T, D]` over `k`, `v` `[B, KV, T, D]` (the same positions),
/// scaled by `1 / sqrt(D)`. Training on CPU in float32 runs the blocked op, which skips the
/// products the mask hides (libtorch's CPU flash attention computes them for T <= 512);
/// everything else runs libtorch's `scaled_dot_product_attention`.
fn causal_self_attention(q: &Tensor, k: &Tensor, v: &Tensor, gqa: bool) -> Result<Tensor> {
    let (t, d) = (q.size()[2], q.size()[3]);
    let blocked =
        t <= BLOCKED_ATTENTION_MAX_LEN && k.size()[2] == t && trains_on_cpu_f32(&[q, k, v])?;
    if blocked {
        let scale = 1.0 / (d as f64).sqrt();
        return Ok(crate::bridge::causal_attention(
            q,
            k,
            v,
            scale,
            ATTENTION_BLOCK,
        )?);
    }
    Ok(Tensor::f_scaled_dot_product_attention::<&Tensor>(
        q, k, v, None, 0.0, true, None, gqa,
    )?)
}

/// `mlp`: SwiGLU, `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn load(ck: &Checkpoint, p: &str, cfg: &ModelConfig, kind: Kind, dev: Device) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(ck, &format!("{p}.gate_proj"), h, i, false, kind, dev)?,
            up_proj: Linear::load(ck, &format!("{p}.up_proj"), h, i, false, kind, dev)?,
            down_proj: Linear::load(ck, &format!("{p}.down_proj"), i, h, false, kind, dev)?,
        })
    }

    fn forward(&self, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
        let (gate, up) = (
            self.gate_proj.forward(x, mode)?,
            self.up_proj.forward(x, mode)?,
        );
        self.down_proj.forward(&swiglu(&gate, &up)?, mode)
    }
}

/// `model.layers.{i}`.
#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(ck: &Checkpoint, p: &str, cfg: &ModelConfig, kind: Kind, dev: Device) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::load(ck, &format!("{p}.self_attn"), cfg, kind, dev)?,
            mlp: Mlp::load(ck, &format!("{p}.mlp"), cfg, kind, dev)?,
            input_layernorm: RmsNorm::load(ck, &format!("{p}.input_layernorm"), h, eps, kind, dev)?,
            post_attention_layernorm: RmsNorm::load(
                ck,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
                kind,
                dev,
            )?,
        })
    }

    fn forward(
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
    pub embed_tokens: Tensor,
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
    /// Memory maps viewed by zero-copy weights. Declared last: dropped after every weight.
    _mappings: Vec<std::sync::Arc<memmap2::MmapMut>>,
}

impl CausalLm {
    /// Builds the model from a checkpoint, every weight in `kind` on `device`.
    pub fn load(ck: &Checkpoint, config: ModelConfig, kind: Kind, device: Device) -> Result<Self> {
        let cfg = &config;
        let embed_tokens = ck.load(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
            kind,
            device,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(ck, &format!("model.layers.{i}"), cfg, kind, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            ck,
            "model.norm",
            cfg.hidden_size,
            cfg.rms_norm_eps,
            kind,
            device,
        )?;
        let lm_head = if cfg.tie_word_embeddings || !ck.contains("lm_head.weight") {
            Linear::from_weight(embed_tokens.shallow_clone())
        } else {
            Linear::load(
                ck,
                "lm_head",
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                kind,
                device,
            )?
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
            _mappings: ck.mappings(),
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
        let mut h = Tensor::f_embedding(&self.model.embed_tokens, input_ids, -1, false, false)?;
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, &ctx, slot)?;
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
            self.model.embed_tokens.shallow_clone(),
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
                        .f_to_kind(Kind::Float)?
                        .f_add(&ad.delta_f32()?)?
                        .f_to_kind(self.kind)?)
                })?,
                _ => lin.weight.shallow_clone(),
            };
            out.push((format!("{path}.weight"), weight));
            if let Some(b) = &lin.bias {
                out.push((format!("{path}.bias"), b.shallow_clone()));
            }
        }
        Ok(out)
    }

    /// Bytes held by the base weights (the tied head counted once).
    pub fn weight_bytes(&self) -> i64 {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0i64;
        let mut add = |t: &Tensor| {
            if seen.insert(t.data_ptr() as usize) {
                total += (t.numel() * t.kind().elt_size_in_bytes()) as i64;
            }
        };
        add(&self.model.embed_tokens);
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
            add(&lin.weight);
            if let Some(b) = &lin.bias {
                add(b);
            }
        }
        total
    }
}

/// Causal mask for `t` new queries after `past` cached keys: `[1, 1, t, past + t]`.
fn causal_mask(past: i64, t: i64, device: Device) -> Result<Tensor> {
    let q = Tensor::f_arange_start(past, past + t, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(past + t, (Kind::Int64, device))?.f_unsqueeze(0)?;
    Ok(k.f_le_tensor(&q)?.f_unsqueeze(0)?.f_unsqueeze(0)?)
}

/// Causal-and-padding mask `[B, 1, t, S]` from a `[B, S]` attention mask. Every query may attend
/// to itself, so rows of padding never become all-masked (which would give NaN).
fn attention_mask_4d(mask: &Tensor, past: i64, t: i64) -> Result<Tensor> {
    let s = mask.size()[1];
    let device = mask.device();
    let causal = causal_mask(past, t, device)?;
    let keys = mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
    let q = Tensor::f_arange_start(past, past + t, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(s, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let diag = k.f_eq_tensor(&q)?.f_unsqueeze(0)?.f_unsqueeze(0)?;
    Ok(causal.f_logical_and(&keys)?.f_logical_or(&diag)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output and the gradients of `inputs` (copies, recording gradients) under `upstream`.
    fn with_grads(
        f: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[&Tensor],
        upstream: &Tensor,
    ) -> Vec<Tensor> {
        let leaves: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.copy().set_requires_grad(true))
            .collect();
        let out = f(&leaves);
        let loss = (&out * upstream).sum(Kind::Float);
        let mut all = vec![out.detach()];
        all.extend(Tensor::run_backward(&[loss], &leaves, false, false));
        all
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

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
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
                |q, k, v| crate::bridge::causal_attention(q, k, v, scale, block).unwrap(),
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
            // The model's dispatcher gives the same results, blocked (grad) or not (no grad).
            let dispatched = run(
                |q, k, v| causal_self_attention(q, k, v, h != kv).unwrap(),
                &q,
                &k,
                &v,
                &up,
            );
            let plain = tch::no_grad(|| causal_self_attention(&q, &k, &v, h != kv).unwrap());
            assert!(max_diff(&dispatched[0], &reference[0]) < 1e-4);
            assert!(max_diff(&plain, &reference[0]) < 1e-4);
            // With gradients it took the blocked op, without them libtorch's: bit for bit.
            if block == ATTENTION_BLOCK {
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
        let attention = |q: &Tensor, k: &Tensor, v: &Tensor| {
            crate::bridge::causal_attention(q, k, v, 0.25, 16).unwrap()
        };
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
        let before = crate::bridge::use_blas(false);
        let fallback = run(attention, &q, &k, &v, &up);
        crate::bridge::use_blas(before);
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
            let err = crate::bridge::causal_attention(q, k, v, 0.5, 4).unwrap_err();
            assert!(err.to_string().contains("causal attention"), "{err}");
        }
        let err = crate::bridge::causal_attention(&q, &q, &q, 0.5, 0).unwrap_err();
        assert!(err.to_string().contains("block"), "{err}");
    }

    fn assert_close(ours: &[Tensor], reference: &[Tensor], tol: f64, case: &str) {
        assert_eq!(ours.len(), reference.len(), "{case}");
        for (i, (a, r)) in ours.iter().zip(reference).enumerate() {
            assert_eq!(a.size(), r.size(), "{case}, tensor {i}");
            if r.numel() == 0 {
                continue;
            }
            let scale = r.abs().max().double_value(&[]).max(1.0);
            let diff = max_diff(a, r);
            assert!(diff <= tol * scale, "{case}, tensor {i}: {diff}");
        }
    }

    #[test]
    fn fused_rms_norm_matches_composite() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        // Rows of 576 (SmolLM2), per-head rows (qk_norm), and sizes that are no multiple of 8.
        for shape in [
            vec![1, 256, 576],
            vec![2, 5, 3, 64],
            vec![3, 13],
            vec![4, 1],
            vec![0, 8],
        ] {
            let h = *shape.last().unwrap();
            let x = Tensor::randn(shape.as_slice(), opts) * 3.0;
            let up = Tensor::randn(shape.as_slice(), opts);
            let norm = RmsNorm {
                weight: Tensor::randn([h], opts),
                eps: 1e-5,
            };
            let fused = |t: &[Tensor]| crate::bridge::rms_norm(&t[0], &t[1], 1e-5).unwrap();
            let composite = |t: &[Tensor]| {
                RmsNorm {
                    weight: t[1].shallow_clone(),
                    eps: 1e-5,
                }
                .composite(&t[0])
                .unwrap()
            };
            let inputs = [&x, &norm.weight];
            let case = format!("{shape:?}");
            // Input and (trainable) weight gradients.
            assert_close(
                &with_grads(fused, &inputs, &up),
                &with_grads(composite, &inputs, &up),
                1e-5,
                &case,
            );
            // The dispatcher: fused with gradients, libtorch's ops (bit for bit) without.
            let x_grad = x.copy().set_requires_grad(true);
            let trained = norm.forward(&x_grad).unwrap();
            assert!(trained.equal(&crate::bridge::rms_norm(&x, &norm.weight, 1e-5).unwrap()));
            let plain = norm.forward(&x).unwrap();
            assert!(plain.equal(&norm.composite(&x).unwrap()), "{case}");
        }
    }

    #[test]
    fn fused_rotary_matches_rope() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        // (batch, length, heads, head dim, rows of the cos/sin tables)
        for (b, t, n, d, rows) in [
            (1, 256, 9, 64, 1),
            (2, 7, 3, 16, 2),
            (2, 5, 2, 2, 1),
            (1, 1, 1, 8, 1),
        ] {
            let angles = Tensor::randn([rows, 1, t, d / 2], opts) * 10.0;
            let angles = Tensor::cat(&[&angles, &angles], -1);
            let (cos, sin) = (angles.cos(), angles.sin());
            let x = Tensor::randn([b, t, n, d], opts);
            let up = Tensor::randn([b, n, t, d], opts);
            let case = format!("{b}x{t}x{n}x{d}, tables {rows}");
            let fused = |v: &[Tensor]| crate::bridge::rotary(&v[0], &cos, &sin).unwrap();
            let composite = |v: &[Tensor]| Rope::apply(&v[0].transpose(1, 2), &cos, &sin).unwrap();
            let ours = with_grads(fused, &[&x], &up);
            let reference = with_grads(composite, &[&x], &up);
            // The forward rounds as libtorch's ops do: the same bits.
            assert!(ours[0].equal(&reference[0]), "{case}");
            assert!(ours[0].is_contiguous(), "{case}");
            assert_close(&ours, &reference, 1e-6, &case);
            // The dispatcher: fused with gradients, libtorch's ops without.
            let x_grad = x.copy().set_requires_grad(true);
            assert!(
                rotary(&x_grad, &cos, &sin).unwrap().equal(&ours[0]),
                "{case}"
            );
            assert!(
                rotary(&x, &cos, &sin).unwrap().equal(&reference[0]),
                "{case}"
            );
        }
    }

    #[test]
    fn fused_swiglu_matches_composite() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        for shape in [vec![1, 256, 1536], vec![3, 5, 7], vec![1]] {
            let gate = Tensor::randn(shape.as_slice(), opts) * 4.0;
            let up = Tensor::randn(shape.as_slice(), opts);
            let upstream = Tensor::randn(shape.as_slice(), opts);
            let case = format!("{shape:?}");
            let fused = |t: &[Tensor]| crate::bridge::swiglu(&t[0], &t[1]).unwrap();
            let composite = |t: &[Tensor]| t[0].silu() * &t[1];
            assert_close(
                &with_grads(fused, &[&gate, &up], &upstream),
                &with_grads(composite, &[&gate, &up], &upstream),
                1e-6,
                &case,
            );
            let gate_grad = gate.copy().set_requires_grad(true);
            let trained = swiglu(&gate_grad, &up).unwrap();
            assert!(trained.equal(&crate::bridge::swiglu(&gate, &up).unwrap()));
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
            |t| crate::bridge::swiglu(&t[0], &t[1]).unwrap(),
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
    fn fused_ops_reject_bad_inputs() {
        let f32s = (Kind::Float, Device::Cpu);
        let f64s = (Kind::Double, Device::Cpu);
        let x = Tensor::zeros([2, 4, 2, 8], f32s);
        let table = Tensor::zeros([1, 1, 4, 8], f32s);
        let errors = [
            crate::bridge::rms_norm(&x, &Tensor::zeros([7], f32s), 1e-5).unwrap_err(),
            crate::bridge::rms_norm(&x.to_kind(Kind::Double), &Tensor::zeros([8], f64s), 1e-5)
                .unwrap_err(),
            crate::bridge::rotary(&x, &Tensor::zeros([1, 1, 5, 8], f32s), &table).unwrap_err(),
            crate::bridge::rotary(&x, &table, &Tensor::zeros([3, 1, 4, 8], f32s)).unwrap_err(),
            crate::bridge::rotary(&x.narrow(3, 0, 7), &table, &table).unwrap_err(),
            crate::bridge::rotary(&Tensor::zeros([4, 8], f32s), &table, &table).unwrap_err(),
            crate::bridge::swiglu(&x, &Tensor::zeros([2, 4, 2, 7], f32s)).unwrap_err(),
            crate::bridge::swiglu(&x.to_kind(Kind::Double), &x.to_kind(Kind::Double)).unwrap_err(),
        ];
        for (err, expected) in errors.iter().zip([
            "weight", "float32", "cos", "sin", "even", "[B, T", "shape", "float32",
        ]) {
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }
}
