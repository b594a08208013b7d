//! A model with its adapters merged, as a model GGUF that llama.cpp runs alone: the weights of
//! [`CausalLm::merged_state_dict`](crate::model::CausalLm::merged_state_dict) under llama.cpp's
//! names (q/k rows permuted for Llama), the `<arch>.*` hyper-parameters llama.cpp's converter
//! writes (the inverse of `model::gguf`'s `config_json`), and the tokenizer and chat template
//! ([`super::tokenizer`]).
//!
//! Matrices are stored in the requested type; norms and biases stay f32, as llama.cpp's
//! converter keeps them. A matrix whose rows are not a whole number of blocks falls back to f16
//! (the converter's fallback). With `q4_0`, the output head (or the token embedding, when the
//! head is tied to it) is stored as `q8_0`: llama.cpp's `llama-quantize` keeps that tensor at
//! higher precision (Q6_K, which loratch's quantizer does not write) because 4 bits on the
//! logits cost the most quality.
use super::{arch_spec, permute_rows, to_f32_vec, tokenizer, ArchSpec};
use crate::error::{Error, Result};
use crate::gguf::{GgufWriter, Value};
use crate::model::config::LayerType;
use crate::model::gguf::GgufArch;
use crate::model::{CausalLm, ModelConfig};
use crate::quant::{self, QType};
use std::path::Path;
use tch::Kind;

/// The tensor types a merged GGUF can be written in.
pub const TYPES: [QType; 5] = [
    QType::F32,
    QType::F16,
    QType::BF16,
    QType::Q8_0,
    QType::Q4_0,
];

/// llama.cpp's `general.file_type` (`llama_ftype`) of a file whose matrices are `ty`.
fn file_type(ty: QType) -> u32 {
    match ty {
        QType::F32 => 0,
        QType::F16 => 1,
        QType::Q4_0 => 2,
        QType::Q8_0 => 7,
        _ => 32, // BF16
    }
}

/// Writes `lm` (loaded from `source`, a directory or a GGUF, whose tokenizer it takes; adapters
/// merged in float32, the model itself unchanged) to `path` as a llama.cpp model GGUF with
/// matrices of type `ty`, atomically. Refused before anything is
/// written: a type outside [`TYPES`], an architecture llama.cpp lacks, rope scaling (Llama 3.1's
/// needs a `rope_freqs` tensor loratch does not write yet), a Gemma 3 whose attention layout
/// llama.cpp's fixed one does not match, a weight with no llama.cpp tensor, or a tokenizer that
/// cannot be written for llama.cpp.
pub fn save_merged(lm: &CausalLm, source: &Path, path: &Path, ty: QType) -> Result<()> {
    if !TYPES.contains(&ty) {
        return Err(Error::Config(format!(
            "a merged GGUF is written as one of {}, not {ty}",
            TYPES.map(QType::name).join(", ")
        )));
    }
    let config = &lm.config;
    let spec = arch_spec(config.architecture)?;
    if let Some(scaling) = &config.rope.scaling {
        return Err(Error::Config(if scaling.rope_type == "llama3" {
            "cannot export to llama.cpp: rope_scaling \"llama3\" (Llama 3.1+) needs llama.cpp's \
             rope_freqs tensor, which loratch does not write yet"
                .into()
        } else {
            format!(
                "cannot export to llama.cpp: rope_scaling {:?} is not written for llama.cpp yet",
                scaling.rope_type
            )
        }));
    }
    if spec.gguf == GgufArch::Gemma3 {
        check_gemma3(config)?;
    }
    let mut w = GgufWriter::new();
    let s = |x: &str| Value::String(x.to_string());
    w.set("general.architecture", s(spec.name))?;
    w.set("general.type", s("model"))?;
    if let Some(stem) = path.file_stem().and_then(|n| n.to_str()) {
        w.set("general.name", s(stem))?;
    }
    for (k, v) in hyper_parameters(spec, config)? {
        w.set(&k, v)?;
    }
    w.set("general.file_type", Value::U32(file_type(ty)))?;
    w.set("general.quantization_version", Value::U32(2))?;
    for (k, v) in tokenizer::metadata(source, config.vocab_size)? {
        w.set(&k, v)?;
    }
    let head = if config.tie_word_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    for (key, t) in lm.merged_state_dict()? {
        let name = spec.tensor_name(&key).ok_or_else(|| {
            Error::Config(format!(
                "cannot export to llama.cpp: weight {key} has no tensor in llama.cpp's {} \
                 architecture",
                spec.name
            ))
        })?;
        let t = match spec.permuted_heads(&key, config) {
            Some(heads) => permute_rows(&t, heads)?,
            None => t,
        };
        let t = match spec.stored_offset(&name) {
            Some(offset) => t.f_to_kind(Kind::Float)?.f_add_scalar(f64::from(offset))?,
            None => t,
        };
        let shape = t.size();
        let stored = match shape.as_slice() {
            [_] => QType::F32,
            [_, cols] => {
                let want = if ty == QType::Q4_0 && name == head {
                    QType::Q8_0
                } else {
                    ty
                };
                if cols % want.block_elems() as i64 == 0 {
                    want
                } else {
                    QType::F16
                }
            }
            _ => ty,
        };
        w.add_tensor_with(&name, &shape, stored, move || {
            quant::quantize(stored, &to_f32_vec(&t)?)
                .map_err(|e| Error::Config(format!("tensor {key}: {e}")))
        })?;
    }
    w.write(path)
}

/// The `<arch>.*` keys of `config`, as llama.cpp's converter names them.
fn hyper_parameters(spec: &ArchSpec, config: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let u32_of = |what: &str, v: i64| -> Result<Value> {
        u32::try_from(v)
            .map(Value::U32)
            .map_err(|_| Error::Config(format!("{what} = {v} does not fit a GGUF u32")))
    };
    let c = config;
    let ints = [
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("block_count", c.num_hidden_layers),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
        ("rope.dimension_count", c.head_dim),
        ("vocab_size", c.vocab_size),
    ];
    let mut out = Vec::new();
    for (k, v) in ints {
        out.push((format!("{}.{k}", spec.name), u32_of(k, v)?));
    }
    out.push((
        format!("{}.rope.freq_base", spec.name),
        Value::F32(c.rope.theta as f32),
    ));
    out.push((
        format!("{}.attention.layer_norm_rms_epsilon", spec.name),
        Value::F32(c.rms_norm_eps as f32),
    ));
    if let Some(window) = c.sliding_window.filter(|_| spec.gguf == GgufArch::Gemma3) {
        out.push((
            format!("{}.attention.sliding_window", spec.name),
            u32_of("sliding_window", window)?,
        ));
    }
    Ok(out)
}

/// llama.cpp's Gemma 3 fixes what the config states (`llama_model::load_hparams`): every sixth
/// layer is full attention and the others slide, sliding layers rotate with base 10000 unscaled,
/// and queries scale by `1 / sqrt(head_dim)` (by `1 / sqrt(hidden_size / heads)` for the 62-layer
/// 27B). A config that differs would run as another model there, so it is refused.
fn check_gemma3(c: &ModelConfig) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Config(format!(
            "cannot export to llama.cpp: its gemma3 architecture fixes {what}"
        )))
    };
    let pattern = (0..c.layer_types.len()).map(|i| {
        if i % 6 == 5 {
            LayerType::Full
        } else {
            LayerType::Sliding
        }
    });
    if c.sliding_window.is_none() || !c.layer_types.iter().copied().eq(pattern) {
        return refuse(format!(
            "the layer pattern (five sliding layers, then one full), this config has {:?} with \
             window {:?}",
            c.layer_types, c.sliding_window
        ));
    }
    let local = c.rope_sliding.as_ref().unwrap_or(&c.rope);
    if local.theta != 10000.0 || local.scaling.is_some() {
        return refuse(format!(
            "the sliding layers' rope base at 10000 unscaled, this config has {} ({:?})",
            local.theta,
            local.scaling.as_ref().map(|s| &s.rope_type)
        ));
    }
    let per_head = if c.num_hidden_layers == 62 {
        c.hidden_size / c.num_attention_heads
    } else {
        c.head_dim
    };
    let want = 1.0 / (per_head as f64).sqrt();
    let have = c.attn_scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt());
    if (have - want).abs() > 1e-6 * want {
        return refuse(format!(
            "the query scale at {want} (1/sqrt({per_head})), this config has {have} \
             (query_pre_attn_scalar)"
        ));
    }
    Ok(())
}
