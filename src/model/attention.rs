//! `self_attn`: grouped-query attention with rotary embeddings, as the Llama family computes it.
//! What differs between families (biases, q/k norms) is an [`AttentionOptions`] field, not a
//! branch on the architecture.
use super::config::ModelConfig;
use super::linear::{Linear, LoraMode};
use super::loader::Loader;
use super::norm::RmsNorm;
use crate::error::Result;
use crate::ops;
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
    /// RMSNorm of each query and key head before the rotary embedding, with this eps (Qwen3).
    pub qk_norm: Option<f64>,
}

impl AttentionOptions {
    /// The options a Hugging Face config describes.
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            qkv_bias: cfg.qkv_bias,
            o_bias: cfg.o_bias,
            qk_norm: cfg.qk_norm.then_some(cfg.rms_norm_eps),
        }
    }
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

/// `self_attn`.
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

impl Attention {
    pub fn load(vb: &Loader, o: AttentionOptions) -> Result<Self> {
        let (h, d) = (o.hidden_size, o.head_dim);
        let (q_out, kv_out) = (o.n_heads * d, o.n_kv_heads * d);
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            o.qk_norm
                .map(|eps| RmsNorm::load(&vb.pp(name), d, eps))
                .transpose()
        };
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), h, q_out, o.qkv_bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, kv_out, o.qkv_bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, kv_out, o.qkv_bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), q_out, h, o.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            n_heads: o.n_heads,
            n_kv_heads: o.n_kv_heads,
            head_dim: d,
        })
    }

    /// The same block over the same tensors.
    pub fn shallow_clone(&self) -> Self {
        let norm = |n: &Option<RmsNorm>| n.as_ref().map(RmsNorm::shallow_clone);
        Self {
            q_proj: self.q_proj.shallow_clone(),
            k_proj: self.k_proj.shallow_clone(),
            v_proj: self.v_proj.shallow_clone(),
            o_proj: self.o_proj.shallow_clone(),
            q_norm: norm(&self.q_norm),
            k_norm: norm(&self.k_norm),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// The block's output for `x` `[B, T, hidden]`, appending this layer's keys and values to
    /// `cache` (and attending over the cached ones) when given.
    pub fn forward(
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
        let q = ops::rotary(
            &heads(&self.q_proj, self.n_heads, &self.q_norm)?,
            ctx.cos,
            ctx.sin,
        )?;
        let mut k = ops::rotary(
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
            Some(lengths) => ops::segment_attention(&q, &k, &v, lengths, gqa)?,
            None if ctx.mask.is_none() && ctx.is_causal => ops::causal_attention(&q, &k, &v, gqa)?,
            None => ops::masked_attention(&q, &k, &v, ctx.mask, ctx.is_causal, gqa)?,
        };
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.n_heads * self.head_dim])?;
        self.o_proj.forward(&out, ctx.mode)
    }
}
