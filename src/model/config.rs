//! The Hugging Face `config.json` of a decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
//! Phi-3), deserialised with serde and checked. What a family does differently becomes a field of
//! [`ModelConfig`] (the blocks read fields, never the architecture); a key whose feature loratch
//! lacks is refused, naming the key.
use crate::error::{Error, Result};
use crate::io::json::{kind_name, Words};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

mod rope;
pub use rope::{RopeParams, RopeScaling};

/// The decoder families loratch implements (one code path with per-family options; see `llama.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`: Llama 2/3/3.1/3.2, SmolLM2.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v projections with biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm on q and k (`q_norm`, `k_norm`).
    Qwen3,
    /// `Gemma2ForCausalLM`: `(1 + w)` norms, four per layer, GELU-tanh, scaled embedding,
    /// alternating sliding-window layers, attention and final-logit soft-capping.
    Gemma2,
    /// `Gemma3ForCausalLM` (text, `gemma3_text`): Gemma 2's layout with q/k norms, no
    /// soft-capping, and sliding layers with their own rope base.
    Gemma3,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`, longrope scaling.
    Phi3,
}

impl Architecture {
    /// The supported `architectures` names.
    pub const SUPPORTED: [&'static str; 7] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
    ];

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            "Gemma2ForCausalLM" => Self::Gemma2,
            "Gemma3ForCausalLM" => Self::Gemma3,
            "Phi3ForCausalLM" => Self::Phi3,
            _ => return None,
        })
    }

    /// The family read from `model_type` when `architectures` is absent (a text config).
    fn from_model_type(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma2" => Self::Gemma2,
            "gemma3_text" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU): Llama, Mistral, Qwen, Phi-3.
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU with the tanh approximation): Gemma.
    GeluTanh,
}

/// What a decoder layer's attention sees (`layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Every earlier position (`full_attention`).
    Full,
    /// The last `sliding_window` positions, itself included (`sliding_attention`).
    Sliding,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: i64,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    sliding_window: Option<Value>,
    #[serde(default)]
    use_sliding_window: bool,
    layer_types: Option<Vec<String>>,
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<i64>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    attention_dropout: Option<f64>,
    resid_pdrop: Option<f64>,
    embd_pdrop: Option<f64>,
    eos_token_id: Option<Value>,
}

fn default_max_pos() -> i64 {
    2048
}

/// A validated decoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    /// The rotary embedding of full-attention layers (and of every layer without `rope_sliding`).
    pub rope: RopeParams,
    /// Sliding layers' own rotary embedding (Gemma 3's local base).
    pub rope_sliding: Option<RopeParams>,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama when `attention_bias`). o_proj has one only with
    /// `attention_bias` on Llama.
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms scale by `1 + weight`, computed in float32 (Gemma).
    pub norm_unit_offset: bool,
    /// Norms after attention and around the MLP (Gemma: four per layer).
    pub sandwich_norms: bool,
    /// q/k/v and gate/up as one fused projection each (`qkv_proj`, `gate_up_proj`: Phi-3).
    pub fused_projections: bool,
    pub activation: Activation,
    /// The embedding's output multiplied by this (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f64>,
    /// Attention's query scale when not `1 / sqrt(head_dim)` (Gemma: `query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f64>,
    /// `cap * tanh(scores / cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap * tanh(logits / cap)` on the output logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// The window of [`LayerType::Sliding`] layers.
    pub sliding_window: Option<i64>,
    /// One per layer.
    pub layer_types: Vec<LayerType>,
    pub max_position_embeddings: i64,
    /// `eos_token_id` as a list (configs hold an int or a list).
    pub eos_token_ids: Vec<i64>,
}

fn ids(v: &Option<Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

/// `Error::Config` for `key` holding `value`, which loratch does not implement.
fn unsupported(key: &str, value: impl std::fmt::Debug, what: &str) -> Error {
    Error::Config(format!("unsupported {key} {value:?}: {what}"))
}

impl RawConfig {
    /// The raw keys of a `config.json` text; errors name the key path.
    fn parse(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("malformed config.json: {e}")))?;
        // serde would read an array positionally as the struct's fields.
        if !value.is_object() {
            return Err(Error::Config(format!(
                "malformed config.json: expected a JSON object, got {}",
                kind_name(&value, Words::Json)
            )));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            // The path is "." when the error is not inside a key (bad JSON, not an object).
            let at = e.path().to_string();
            match at.as_str() {
                "." => Error::Config(format!("malformed config.json: {}", e.inner())),
                _ => Error::Config(format!("malformed config.json: {at}: {}", e.inner())),
            }
        })
    }

    /// The checked sizes and `(num_key_value_heads, head_dim)`.
    fn heads(&self, arch: Architecture) -> Result<(i64, i64)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ];
        for (k, v) in positive {
            if v <= 0 {
                return Err(Error::Config(format!("{k} must be > 0, got {v}")));
            }
        }
        let kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if kv_heads <= 0 || self.num_attention_heads % kv_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv_heads})",
                self.num_attention_heads
            )));
        }
        // Gemma's configuration classes default head_dim to 256, not hidden / heads.
        let head_dim = match (self.head_dim, arch.is_gemma()) {
            (Some(d), _) => d,
            (None, true) => 256,
            (None, false) => {
                if self.hidden_size % self.num_attention_heads != 0 {
                    return Err(Error::Config(
                        "hidden_size is not a multiple of num_attention_heads".into(),
                    ));
                }
                self.hidden_size / self.num_attention_heads
            }
        };
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "head_dim must be even and > 0, got {head_dim}"
            )));
        }
        Ok((kv_heads, head_dim))
    }

    /// Each layer's attention span, and the window of the sliding ones.
    fn layers(&self, arch: Architecture) -> Result<(Vec<LayerType>, Option<i64>)> {
        let n = self.num_hidden_layers as usize;
        let window = match &self.sliding_window {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(w) if w > 0 => Some(w),
                _ => {
                    return Err(Error::Config(format!(
                        "sliding_window must be null or an integer > 0, got {v}"
                    )))
                }
            },
        };
        // The classes' defaults when the key is absent: 4096 for Gemma and Mistral.
        let window = match arch {
            _ if self.sliding_window.is_some() => window,
            Architecture::Gemma2 | Architecture::Gemma3 | Architecture::Mistral => Some(4096),
            _ => None,
        };
        let window = match arch {
            // Llama has no sliding window; Qwen's applies only with `use_sliding_window`.
            Architecture::Llama => None,
            Architecture::Qwen2 | Architecture::Qwen3 if !self.use_sliding_window => None,
            Architecture::Qwen2 | Architecture::Qwen3 if window.is_some() => {
                return Err(unsupported(
                    "use_sliding_window",
                    true,
                    "Qwen's sliding-window layers are not implemented",
                ))
            }
            _ => window,
        };
        let Some(window) = window else {
            return Ok((vec![LayerType::Full; n], None));
        };
        let types = match (&self.layer_types, arch) {
            (Some(names), _) => {
                if names.len() != n {
                    return Err(Error::Config(format!(
                        "layer_types has {} entries for {n} layers",
                        names.len()
                    )));
                }
                names
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match t.as_str() {
                        "full_attention" => Ok(LayerType::Full),
                        "sliding_attention" => Ok(LayerType::Sliding),
                        other => Err(unsupported(
                            &format!("layer_types[{i}]"),
                            other,
                            "loratch has \"full_attention\" and \"sliding_attention\"",
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            // transformers' defaults: Gemma 2 alternates from a sliding layer; Gemma 3 has one
            // full layer in every `sliding_window_pattern`.
            (None, Architecture::Gemma2) => (0..n)
                .map(|i| [LayerType::Sliding, LayerType::Full][i % 2])
                .collect(),
            (None, Architecture::Gemma3) => {
                let every = self.sliding_window_pattern.unwrap_or(6).max(1) as usize;
                (0..n)
                    .map(|i| match (i + 1) % every {
                        0 => LayerType::Full,
                        _ => LayerType::Sliding,
                    })
                    .collect()
            }
            (None, _) => vec![LayerType::Sliding; n],
        };
        Ok((types, Some(window)))
    }

    /// The MLP activation (`hidden_activation` for Gemma, else `hidden_act`).
    fn activation(&self, arch: Architecture) -> Result<Activation> {
        if arch.is_gemma() {
            let act = self
                .hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh");
            return match act {
                "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
                other => Err(unsupported(
                    "hidden_activation",
                    other,
                    "only \"gelu_pytorch_tanh\"",
                )),
            };
        }
        match self.hidden_act.as_deref() {
            None | Some("silu") => Ok(Activation::Silu),
            Some(other) => Err(unsupported("hidden_act", other, "only \"silu\"")),
        }
    }

    /// Refuses what the base model would do that loratch does not: dropout in the base model
    /// (LoRA's own dropout is implemented) and bidirectional attention.
    fn check_unsupported(&self) -> Result<()> {
        for (key, p) in [
            ("attention_dropout", self.attention_dropout),
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
        ] {
            if let Some(p) = p.filter(|&p| p != 0.0) {
                return Err(unsupported(
                    key,
                    p,
                    "dropout inside the base model is not implemented (lora_dropout is)",
                ));
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(unsupported(
                "use_bidirectional_attention",
                true,
                "only causal attention",
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Checks that every id of the non-empty integer tensor `ids` is in `[0, vocab_size)`: an
    /// [`Error::Input`] "`{what}` must be in [0, vocab)`{note}`; got min .., max .." otherwise.
    pub fn check_ids(&self, ids: &tch::Tensor, what: &str, note: &str) -> Result<()> {
        let vocab = self.vocab_size;
        let (lo, hi) = (
            ids.f_min()?.f_int64_value(&[])?,
            ids.f_max()?.f_int64_value(&[])?,
        );
        if lo < 0 || hi >= vocab {
            return Err(Error::Input(format!(
                "{what} must be in [0, {vocab}){note}; got min {lo}, max {hi}"
            )));
        }
        Ok(())
    }

    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and checks a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw = RawConfig::parse(text)?;
        let arch_name = raw.architectures.first().cloned().unwrap_or_default();
        let from_type = || {
            raw.architectures
                .is_empty()
                .then(|| {
                    raw.model_type
                        .as_deref()
                        .and_then(Architecture::from_model_type)
                })
                .flatten()
        };
        let architecture = Architecture::from_name(&arch_name)
            .or_else(from_type)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unsupported architecture {:?} (model_type {:?}); supported: {}",
                    arch_name,
                    raw.model_type.as_deref().unwrap_or("?"),
                    Architecture::SUPPORTED.join(", ")
                ))
            })?;
        raw.check_unsupported()?;
        let activation = raw.activation(architecture)?;
        let (kv_heads, head_dim) = raw.heads(architecture)?;
        let (rope, rope_sliding) = raw.rope(architecture, head_dim)?;
        let (layer_types, sliding_window) = raw.layers(architecture)?;
        let gemma = architecture.is_gemma();
        let eps = raw
            .rms_norm_eps
            .unwrap_or(if architecture == Architecture::Phi3 {
                1e-5
            } else {
                1e-6
            });
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::Config(format!(
                "rms_norm_eps must be a finite number > 0, got {eps}"
            )));
        }
        let positive = |key: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(Error::Config(format!(
                "{key} must be a finite number > 0 or null, got {x}"
            ))),
            _ => Ok(v),
        };
        // Gemma 2's class defaults (50, 30) apply when the keys are absent.
        let gemma2 = architecture == Architecture::Gemma2;
        let attn_softcap = positive(
            "attn_logit_softcapping",
            raw.attn_logit_softcapping.or(gemma2.then_some(50.0)),
        )?;
        let final_softcap = positive(
            "final_logit_softcapping",
            raw.final_logit_softcapping.or(gemma2.then_some(30.0)),
        )?;
        let query_scalar = positive("query_pre_attn_scalar", raw.query_pre_attn_scalar)?;
        let qkv_bias = architecture == Architecture::Qwen2 || raw.attention_bias;
        let o_bias =
            !matches!(architecture, Architecture::Qwen2 | Architecture::Phi3) && raw.attention_bias;
        if architecture == Architecture::Phi3 && raw.attention_bias {
            return Err(unsupported("attention_bias", true, "Phi-3 has no biases"));
        }
        Ok(Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope,
            rope_sliding,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias,
            o_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            norm_unit_offset: gemma,
            sandwich_norms: gemma,
            fused_projections: architecture == Architecture::Phi3,
            activation,
            embed_scale: gemma.then(|| (raw.hidden_size as f64).sqrt()),
            attn_scale: gemma.then(|| query_scalar.unwrap_or(256.0).powf(-0.5)),
            attn_softcap,
            final_softcap,
            sliding_window,
            layer_types,
            max_position_embeddings: raw.max_position_embeddings,
            eos_token_ids: ids(&raw.eos_token_id),
        })
    }

    /// The window of layer `i`, if it slides.
    pub fn window_of(&self, i: usize) -> Option<i64> {
        match self.layer_types.get(i) {
            Some(LayerType::Sliding) => self.sliding_window,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": true, "eos_token_id": 2}"#;

    #[test]
    fn smollm2_config_parses() {
        let c = ModelConfig::from_json(SMOL).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.head_dim, c.num_key_value_heads), (64, 3));
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = SMOL.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("Qwen3ForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn a_config_that_is_not_an_object_is_refused() {
        // An array used to be read positionally as the fields, in declaration order.
        for text in [
            "[[\"LlamaForCausalLM\"], 49152, 576]",
            "\"LlamaForCausalLM\"",
            "null",
        ] {
            let err = ModelConfig::from_json(text).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err}");
            assert!(err.to_string().contains("expected a JSON object"), "{err}");
        }
    }

    #[test]
    fn malformed_json_is_a_config_error() {
        assert!(matches!(
            ModelConfig::from_json("{not json"),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            ModelConfig::from_json("{}"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn a_wrongly_typed_value_names_its_key() {
        let text = SMOL.replace("\"hidden_size\": 576", "\"hidden_size\": \"576\"");
        match ModelConfig::from_json(&text) {
            Err(Error::Config(msg)) => assert!(
                msg.contains("hidden_size: invalid type: string \"576\""),
                "{msg}"
            ),
            other => panic!("expected a config error, got {other:?}"),
        }
        let text = SMOL.replace("\"eos_token_id\": 2", "\"rope_scaling\": {\"factor\": 8}");
        let msg = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(
            msg.contains("rope_scaling: missing field `rope_type`"),
            "{msg}"
        );
        // Outside any key: no path.
        let msg = ModelConfig::from_json("\"x\"").unwrap_err().to_string();
        assert!(
            msg.contains("malformed config.json: expected a JSON object, got a string"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), SMOL.replace("30", "\"30\"")).unwrap();
        let msg = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("config.json: malformed config.json: num_hidden_layers: invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn qwen_families_set_their_flags() {
        let q2 =
            ModelConfig::from_json(&SMOL.replace("LlamaForCausalLM", "Qwen2ForCausalLM")).unwrap();
        assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm);
        let q3 =
            ModelConfig::from_json(&SMOL.replace("LlamaForCausalLM", "Qwen3ForCausalLM")).unwrap();
        assert!(!q3.qkv_bias && q3.qk_norm);
    }
}
