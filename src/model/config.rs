//! The Hugging Face `config.json` of a Llama-family decoder, deserialised with serde and checked.
use crate::error::{Error, Result};
use crate::io::json::{kind_name, Words};
use serde::Deserialize;
use std::path::Path;

/// The decoder families loratch implements (they share one code path; see `llama.rs`).
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
}

impl Architecture {
    /// The supported `architectures` names.
    pub const SUPPORTED: [&'static str; 4] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ];

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            _ => return None,
        })
    }
}

/// `rope_scaling` of Llama 3.1+ (`rope_type: "llama3"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    /// "llama3" (also read from the legacy key `type`). Other types are rejected.
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: Option<i64>,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
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
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<RopeScaling>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: i64,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    use_sliding_window: bool,
    eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
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
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama when `attention_bias`). o_proj has one only with
    /// `attention_bias` on Llama.
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    pub max_position_embeddings: i64,
    /// `eos_token_id` as a list (configs hold an int or a list).
    pub eos_token_ids: Vec<i64>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

impl RawConfig {
    /// The raw keys of a `config.json` text; errors name the key path.
    fn parse(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
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
    fn heads(&self) -> Result<(i64, i64)> {
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
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "rms_norm_eps must be a finite number > 0, got {}",
                self.rms_norm_eps
            )));
        }
        if kv_heads <= 0 || self.num_attention_heads % kv_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv_heads})",
                self.num_attention_heads
            )));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => {
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

    /// `rope_theta` and the supported `rope_scaling` ("llama3"; "default" is none), read from
    /// either the legacy keys or transformers 5's `rope_parameters`.
    fn rope(&self) -> Result<(f64, Option<RopeScaling>)> {
        let mut rope_theta = self.rope_theta;
        let mut rope_scaling = self.rope_scaling.clone();
        if let Some(p) = &self.rope_parameters {
            if let Some(t) = p.get("rope_theta").and_then(|v| v.as_f64()) {
                rope_theta = t;
            }
            if p.get("rope_type")
                .and_then(|v| v.as_str())
                .is_some_and(|t| t != "default")
            {
                rope_scaling = Some(
                    serde_json::from_value(p.clone())
                        .map_err(|e| Error::Config(format!("malformed rope_parameters: {e}")))?,
                );
            }
        }
        if let Some(s) = &rope_scaling {
            if s.rope_type != "llama3" && s.rope_type != "default" {
                return Err(Error::Config(format!(
                    "unsupported rope_scaling type {:?}: only \"llama3\"",
                    s.rope_type
                )));
            }
        }
        Ok((rope_theta, rope_scaling.filter(|s| s.rope_type == "llama3")))
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
        let architecture = Architecture::from_name(&arch_name).ok_or_else(|| {
            Error::Config(format!(
                "unsupported architecture {:?} (model_type {:?}); supported: {}",
                arch_name,
                raw.model_type.as_deref().unwrap_or("?"),
                Architecture::SUPPORTED.join(", ")
            ))
        })?;
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(Error::Config(format!(
                    "unsupported hidden_act {act:?}: only \"silu\""
                )));
            }
        }
        let (kv_heads, head_dim) = raw.heads()?;
        let (rope_theta, rope_scaling) = raw.rope()?;
        let sliding =
            raw.use_sliding_window && raw.sliding_window.as_ref().is_some_and(|v| !v.is_null());
        if sliding {
            return Err(Error::Config(
                "sliding-window attention is not supported".into(),
            ));
        }
        let qkv_bias = architecture == Architecture::Qwen2 || raw.attention_bias;
        let o_bias = matches!(
            architecture,
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen3
        ) && raw.attention_bias;
        Ok(Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            qk_norm: architecture == Architecture::Qwen3,
            max_position_embeddings: raw.max_position_embeddings,
            eos_token_ids: ids(&raw.eos_token_id),
        })
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
