//! A GGUF file (llama.cpp, Ollama) as a model checkpoint: the `config.json` keys from its
//! `<arch>.*` metadata, checkpoint keys from llama.cpp's tensor names (`blk.0.attn_q.weight` →
//! `model.layers.0.self_attn.q_proj.weight`), llama.cpp's q/k row permutation of Llama weights
//! undone, and the frozen matrices kept in their stored block format unless asked otherwise.
use super::config::ModelConfig;
use super::linear::{Quantize, Weight};
use super::weights::WeightSource;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::ops::quant::QWeight;
use crate::quant::QType;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A GGUF architecture loratch builds, with its Hugging Face name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    const SUPPORTED: [&'static str; 3] = ["llama", "qwen2", "qwen3"];

    fn of(arch: &str) -> Option<Self> {
        Some(match arch {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            _ => return None,
        })
    }

    fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// llama.cpp's converter permutes the q/k rows of Llama-family weights only.
    fn permuted(self) -> bool {
        self == Self::Llama
    }
}

/// The checkpoint key of a llama.cpp tensor name (`None` for tensors loratch does not read).
fn hf_key(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    matches!(param, "weight" | "bias").then(|| format!("model.layers.{layer}.{module}.{param}"))
}

/// A GGUF file read as a checkpoint.
pub struct GgufCheckpoint {
    file: GgufFile,
    family: Family,
    /// Checkpoint key → GGUF tensor name.
    names: HashMap<String, String>,
    heads: i64,
    kv_heads: i64,
}

impl GgufCheckpoint {
    /// Opens `path` and checks that its architecture is one loratch builds.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = file
            .get_str("general.architecture")?
            .ok_or_else(|| err(&file, "missing key general.architecture"))?
            .to_string();
        let family = Family::of(&arch).ok_or_else(|| {
            err(
                &file,
                &format!(
                    "unsupported architecture {arch:?} (general.architecture); loratch reads {}",
                    Family::SUPPORTED.map(|a| format!("{a:?}")).join(", ")
                ),
            )
        })?;
        if file.tensor("rope_freqs.weight").is_some() {
            return Err(err(
                &file,
                "tensor rope_freqs.weight (rope frequency factors, Llama 3.1+ scaling) is not \
                 supported yet",
            ));
        }
        let names = file
            .tensors()
            .iter()
            .filter_map(|t| Some((hf_key(&t.name)?, t.name.clone())))
            .collect();
        let heads = req_u64(&file, &format!("{arch}.attention.head_count"))? as i64;
        let kv_heads = file
            .get_u64(&format!("{arch}.attention.head_count_kv"))?
            .map_or(heads, |v| v as i64);
        Ok(Self {
            file,
            family,
            names,
            heads,
            kv_heads,
        })
    }

    /// The file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The model's `config.json`, as transformers writes it for this GGUF.
    pub fn config_json(&self) -> Result<Value> {
        let f = &self.file;
        let arch = f.get_str("general.architecture")?.unwrap_or_default();
        let key = |k: &str| format!("{arch}.{k}");
        let mut c = Map::new();
        c.insert("architectures".into(), json!([self.family.hf_name()]));
        c.insert("model_type".into(), json!(arch));
        c.insert(
            "hidden_size".into(),
            json!(req_u64(f, &key("embedding_length"))?),
        );
        c.insert(
            "num_hidden_layers".into(),
            json!(req_u64(f, &key("block_count"))?),
        );
        c.insert(
            "intermediate_size".into(),
            json!(req_u64(f, &key("feed_forward_length"))?),
        );
        c.insert("num_attention_heads".into(), json!(self.heads));
        c.insert("num_key_value_heads".into(), json!(self.kv_heads));
        if let Some(d) = f.get_u64(&key("attention.key_length"))? {
            c.insert("head_dim".into(), json!(d));
        }
        if let Some(eps) = f.get_f32(&key("attention.layer_norm_rms_epsilon"))? {
            c.insert("rms_norm_eps".into(), json!(eps as f64));
        }
        if let Some(theta) = f.get_f32(&key("rope.freq_base"))? {
            c.insert("rope_theta".into(), json!(theta as f64));
        }
        if let Some(n) = f.get_u64(&key("context_length"))? {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        let embd = self
            .file
            .tensor("token_embd.weight")
            .ok_or_else(|| err(f, "missing tensor token_embd.weight"))?;
        let vocab = match f.get_u64(&key("vocab_size"))? {
            Some(v) => v,
            None => *embd
                .dims
                .get(1)
                .ok_or_else(|| err(f, "tensor token_embd.weight is not a matrix"))?,
        };
        c.insert("vocab_size".into(), json!(vocab));
        c.insert(
            "tie_word_embeddings".into(),
            json!(f.tensor("output.weight").is_none()),
        );
        for (k, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = f.get_u64(k)? {
                c.insert(hf.into(), json!(id));
            }
        }
        c.insert("hidden_act".into(), json!("silu"));
        Ok(Value::Object(c))
    }

    /// The model's configuration (checked as a `config.json` is; errors name the file).
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_json(&self.config_json()?.to_string()).map_err(|e| match e {
            Error::Config(msg) => err(&self.file, &format!("metadata: {msg}")),
            other => other,
        })
    }

    /// The GGUF name behind checkpoint key `key`, with its `[out, in]` (or `[n]`) shape.
    fn tensor(&self, key: &str, shape: &[i64]) -> Result<(&str, QType)> {
        let name = self
            .names
            .get(key)
            .ok_or_else(|| err(&self.file, &format!("missing tensor for {key}")))?;
        let info = self
            .file
            .tensor(name)
            .ok_or_else(|| err(&self.file, &format!("missing tensor {name}")))?;
        let stored: Vec<i64> = info.dims.iter().rev().map(|&d| d as i64).collect();
        if stored != shape {
            return Err(err(
                &self.file,
                &format!("tensor {name} has shape {stored:?}, the metadata implies {shape:?}"),
            ));
        }
        Ok((name.as_str(), info.ty))
    }

    /// For q/k projections (weight and bias) of a permuted family: HF row `r` is GGUF row `perm[r]`.
    fn row_permutation(&self, key: &str, rows: i64) -> Option<Vec<usize>> {
        if !self.family.permuted() {
            return None;
        }
        let module = key.rsplit_once('.').map_or(key, |(m, _)| m);
        let heads = if module.ends_with("self_attn.q_proj") {
            self.heads
        } else if module.ends_with("self_attn.k_proj") {
            self.kv_heads
        } else {
            return None;
        };
        let d = rows / heads;
        let half = d / 2;
        // llama.cpp writes HF row (h, part, i) of `(heads, 2, d/2)` at (h, i, part).
        Some(
            (0..rows)
                .map(|r| {
                    let (h, j) = (r / d, r % d);
                    let (part, i) = (j / half, j % half);
                    (h * d + 2 * i + part) as usize
                })
                .collect(),
        )
    }
}

fn err(file: &GgufFile, msg: &str) -> Error {
    Error::Checkpoint {
        path: file.path().to_path_buf(),
        msg: msg.to_string(),
    }
}

fn req_u64(file: &GgufFile, key: &str) -> Result<u64> {
    file.get_u64(key)?
        .ok_or_else(|| err(file, &format!("missing key {key}")))
}

impl WeightSource for GgufCheckpoint {
    fn contains(&self, key: &str) -> bool {
        self.names.contains_key(key)
    }

    fn load(&self, key: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let (name, _) = self.tensor(key, shape)?;
        let values = self.file.dequantize(name)?;
        let t = Tensor::f_from_slice(&values)?.f_reshape(shape)?;
        let t = match self.row_permutation(key, shape[0]) {
            Some(perm) => {
                let idx: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
                t.f_index_select(0, &Tensor::f_from_slice(&idx)?)?
            }
            None => t,
        };
        Ok(t.f_to_device(device)?.f_to_kind(kind)?)
    }

    fn load_weight(
        &self,
        key: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        quantize: Quantize,
    ) -> Result<Weight> {
        let (name, ty) = self.tensor(key, shape)?;
        let float = matches!(ty, QType::F32 | QType::F16 | QType::BF16);
        let keep = match quantize {
            Quantize::Stored => !float,
            Quantize::Float => false,
            Quantize::To(want) => want == ty,
        };
        if !keep || shape.len() != 2 {
            return quantize.apply(self.load(key, shape, kind, device)?);
        }
        let bytes = self.file.tensor_bytes(name)?;
        let blocks = match self.row_permutation(key, shape[0]) {
            Some(perm) => {
                let row = ty.row_bytes(shape[1] as usize)?;
                let mut out = Vec::with_capacity(bytes.len());
                for p in perm {
                    out.extend_from_slice(&bytes[p * row..(p + 1) * row]);
                }
                std::borrow::Cow::Owned(out)
            }
            None => std::borrow::Cow::Borrowed(bytes),
        };
        let q = QWeight::from_blocks(&blocks, ty, shape[0], shape[1], kind, device)
            .map_err(|e| err(&self.file, &format!("tensor {name}: {e}")))?;
        Ok(Weight::Quantized(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_checkpoint_keys() {
        assert_eq!(
            hf_key("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_key("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_key("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_key("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_key("blk.x.attn_q.weight"), None);
        assert_eq!(hf_key("blk.0.attn_q.scale"), None);
        assert_eq!(hf_key("rope_freqs.weight"), None);
    }
}
