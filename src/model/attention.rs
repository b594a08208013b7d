//! `self_attn`: grouped-query attention with rotary embeddings, as the decoder families compute
//! it. What differs between families (biases, q/k norms, fused `qkv_proj`, query scale,
//! soft-capping, sliding windows) is an [`AttentionOptions`] field, not a branch on the
//! architecture.
use super::cache::LayerSlot;
use super::config::{LayerType, ModelConfig};
use super::linear::{Linear, LoraMode};
use super::loader::Loader;
use super::norm::RmsNorm;
use crate::error::Result;
use crate::ops::{self, Scores};
use tch::Tensor;

/// The shape and per-family features of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions {
    pub hidden_size: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub head_dim: i64,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// A bias on o (none of today's families; some configs say so).
    pub o_bias: bool,
    /// RMSNorm of each query and key head before the rotary embedding, with this eps (Qwen3,
    /// Gemma 3), Gemma's `1 + weight` form when `unit_offset`.
    pub qk_norm: Option<f64>,
    pub unit_offset: bool,
    /// One `qkv_proj` (Phi-3) instead of `q_proj`, `k_proj`, `v_proj`.
    pub fused_qkv: bool,
    /// Query scale, soft-capping (the GQA flag is derived from the heads).
    pub scale: Option<f64>,
    pub softcap: Option<f64>,
    /// Whether this layer attends within the sliding window.
    pub sliding: bool,
}

impl AttentionOptions {
    /// The options a Hugging Face config describes for layer `i`.
    pub fn of(cfg: &ModelConfig, i: usize) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            qkv_bias: cfg.qkv_bias,
            o_bias: cfg.o_bias,
            qk_norm: cfg.qk_norm.then_some(cfg.rms_norm_eps),
            unit_offset: cfg.norm_unit_offset,
            fused_qkv: cfg.fused_projections,
            scale: cfg.attn_scale,
            softcap: cfg.attn_softcap,
            sliding: cfg.window_of(i).is_some(),
        }
    }
}

/// What the layers of one [`LayerType`] attend with in one forward.
pub struct Span<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Boolean `[B, 1, T, S]` (true = attend), or None for plain causal attention.
    pub mask: Option<&'a Tensor>,
    pub is_causal: bool,
    /// The sliding window, for packed segments (whose masks are built per segment).
    pub window: Option<i64>,
}

/// Per-forward inputs shared by every layer.
pub struct Context<'a> {
    pub full: Span<'a>,
    /// Sliding layers' inputs; None when the model has none.
    pub sliding: Option<Span<'a>>,
    /// Lengths of consecutive runs of the (single) row that attend causally within themselves
    /// only (packed examples); None: the row is one sequence.
    pub segments: Option<&'a [i64]>,
    pub mode: LoraMode,
}

impl Context<'_> {
    /// The inputs of a layer of `ty`.
    pub fn span(&self, ty: LayerType) -> &Span<'_> {
        match (ty, &self.sliding) {
            (LayerType::Sliding, Some(s)) => s,
            _ => &self.full,
        }
    }
}

/// The q, k and v projections as the checkpoint stores them.
// One per layer: the unequal variant sizes cost nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    /// `qkv_proj`: the q rows, then k's, then v's (Phi-3).
    Fused { qkv_proj: Linear },
}

/// `self_attn`.
#[derive(Debug)]
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    scores: Scores,
    layer_type: LayerType,
}

impl Attention {
    pub fn load(vb: &Loader, o: AttentionOptions) -> Result<Self> {
        let (h, d) = (o.hidden_size, o.head_dim);
        let (q_out, kv_out) = (o.n_heads * d, o.n_kv_heads * d);
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            o.qk_norm
                .map(|eps| RmsNorm::load(&vb.pp(name), d, eps, o.unit_offset))
                .transpose()
        };
        let qkv = match o.fused_qkv {
            true => Qkv::Fused {
                qkv_proj: Linear::load(&vb.pp("qkv_proj"), h, q_out + 2 * kv_out, o.qkv_bias)?,
            },
            false => Qkv::Separate {
                q_proj: Linear::load(&vb.pp("q_proj"), h, q_out, o.qkv_bias)?,
                k_proj: Linear::load(&vb.pp("k_proj"), h, kv_out, o.qkv_bias)?,
                v_proj: Linear::load(&vb.pp("v_proj"), h, kv_out, o.qkv_bias)?,
            },
        };
        Ok(Self {
            qkv,
            o_proj: Linear::load(&vb.pp("o_proj"), q_out, h, o.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            n_heads: o.n_heads,
            n_kv_heads: o.n_kv_heads,
            head_dim: d,
            scores: Scores {
                scale: o.scale,
                softcap: o.softcap,
                gqa: o.n_heads != o.n_kv_heads,
            },
            layer_type: match o.sliding {
                true => LayerType::Sliding,
                false => LayerType::Full,
            },
        })
    }

    /// The same block over the same tensors.
    pub fn shallow_clone(&self) -> Self {
        let norm = |n: &Option<RmsNorm>| n.as_ref().map(RmsNorm::shallow_clone);
        Self {
            qkv: match &self.qkv {
                Qkv::Separate {
                    q_proj,
                    k_proj,
                    v_proj,
                } => Qkv::Separate {
                    q_proj: q_proj.shallow_clone(),
                    k_proj: k_proj.shallow_clone(),
                    v_proj: v_proj.shallow_clone(),
                },
                Qkv::Fused { qkv_proj } => Qkv::Fused {
                    qkv_proj: qkv_proj.shallow_clone(),
                },
            },
            o_proj: self.o_proj.shallow_clone(),
            q_norm: norm(&self.q_norm),
            k_norm: norm(&self.k_norm),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scores: self.scores,
            layer_type: self.layer_type,
        }
    }

    /// The block's projections under their names in the checkpoint (`q_proj`, ...).
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj)],
            Qkv::Fused { qkv_proj } => vec![("qkv_proj", qkv_proj)],
        };
        out.push(("o_proj", &self.o_proj));
        out
    }

    /// As [`linears`](Self::linears), mutably.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = match &mut self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj)],
            Qkv::Fused { qkv_proj } => vec![("qkv_proj", qkv_proj)],
        };
        out.push(("o_proj", &mut self.o_proj));
        out
    }

    /// `(q, k, v)` projections `[B, T, n * D]`.
    fn project(&self, x: &Tensor, mode: LoraMode) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward(x, mode)?,
                k_proj.forward(x, mode)?,
                v_proj.forward(x, mode)?,
            ),
            Qkv::Fused { qkv_proj } => {
                // Slices of one product, as transformers' Phi-3 takes them.
                let qkv = qkv_proj.forward(x, mode)?;
                let (q, kv) = (
                    self.n_heads * self.head_dim,
                    self.n_kv_heads * self.head_dim,
                );
                (
                    qkv.f_narrow(-1, 0, q)?,
                    qkv.f_narrow(-1, q, kv)?,
                    qkv.f_narrow(-1, q + kv, kv)?,
                )
            }
        })
    }

    /// The block's output for `x` `[B, T, hidden]`, appending this layer's keys and values to
    /// `cache` (and attending over the cached ones) when given.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<LayerSlot<'_>>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let span = ctx.span(self.layer_type);
        let (q, k, v) = self.project(x, ctx.mode)?;
        // `[B, T, n, D]`, normed per head when the model says so.
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.f_view([b, t, n, self.head_dim])?;
            match norm {
                Some(norm) => norm.forward(&y),
                None => Ok(y),
            }
        };
        let q = ops::rotary(&heads(q, self.n_heads, &self.q_norm)?, span.cos, span.sin)?;
        let k = ops::rotary(
            &heads(k, self.n_kv_heads, &self.k_norm)?,
            span.cos,
            span.sin,
        )?;
        let v = heads(v, self.n_kv_heads, &None)?.f_transpose(1, 2)?;
        let (k, v) = match cache {
            Some(mut slot) => slot.append(&k, &v)?,
            None => (k, v),
        };
        let s = self.scores;
        let out = match ctx.segments {
            Some(lengths) => ops::segment_attention(&q, &k, &v, lengths, span.window, s)?,
            None if span.mask.is_none() && span.is_causal => ops::causal_attention(&q, &k, &v, s)?,
            None => ops::masked_attention(&q, &k, &v, span.mask, span.is_causal, s)?,
        };
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.n_heads * self.head_dim])?;
        self.o_proj.forward(&out, ctx.mode)
    }
}
