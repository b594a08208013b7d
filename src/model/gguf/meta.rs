//! A GGUF file's `config.json`: the `<arch>.*` hyper-parameters under their Hugging Face names and
//! transformers' defaults for what llama.cpp does not store, as transformers builds the config
//! with `AutoConfig.from_pretrained(dir, gguf_file=name)` (`integrations/ggml.py`'s
//! `GGUF_CONFIG_MAPPING` and the configuration classes' defaults, transformers 5.24).
//!
//! Where llama.cpp stores a value transformers ignores (Gemma 2's soft-capping, Phi-3's sliding
//! window), the file's value is used: it is the model's, and equals transformers' default in every
//! released checkpoint. Metadata that would change the model in a way transformers ignores
//! (rope scaling of the new families, Phi-3's partial rotary) is refused by [`unsupported`].
use super::arch::GgufArch;
use super::{err, req_u64};
use crate::error::Result;
use crate::gguf::GgufFile;
use serde_json::{json, Map, Value};

/// Reads the file's hyper-parameters as a `config.json` object.
pub(super) fn config_json(
    f: &GgufFile,
    arch: GgufArch,
    heads: i64,
    kv_heads: i64,
) -> Result<Value> {
    let key = |k: &str| format!("{}.{k}", arch.name());
    let mut c = Map::new();
    c.insert("architectures".into(), json!([arch.hf_name()]));
    c.insert("model_type".into(), json!(arch.model_type()));
    for (k, hf) in [
        ("embedding_length", "hidden_size"),
        ("block_count", "num_hidden_layers"),
        ("feed_forward_length", "intermediate_size"),
    ] {
        c.insert(hf.into(), json!(req_u64(f, &key(k))?));
    }
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv_heads));
    if let Some(d) = f.get_u64(&key("attention.key_length"))? {
        c.insert("head_dim".into(), json!(d));
    }
    if let Some(eps) = f.get_f32(&key("attention.layer_norm_rms_epsilon"))? {
        c.insert("rms_norm_eps".into(), json!(eps as f64));
    }
    let theta = f.get_f32(&key("rope.freq_base"))?.map(f64::from);
    if let Some(n) = f.get_u64(&key("context_length"))? {
        c.insert("max_position_embeddings".into(), json!(n));
    }
    let embd = f
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
    match arch {
        GgufArch::Llama | GgufArch::Qwen2 | GgufArch::Qwen3 => {
            if let Some(theta) = theta {
                c.insert("rope_theta".into(), json!(theta));
            }
            c.insert("hidden_act".into(), json!("silu"));
        }
        GgufArch::Gemma2 | GgufArch::Gemma3 => gemma(f, arch, theta, &mut c)?,
        GgufArch::Phi3 => {
            c.entry("rms_norm_eps").or_insert(json!(1e-5));
            c.entry("max_position_embeddings").or_insert(json!(4096));
            c.insert("hidden_act".into(), json!("silu"));
            c.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": theta.unwrap_or(10000.0),
                       "partial_rotary_factor": 1.0}),
            );
            let original = f.get_u64(&key("rope.scaling.original_context_length"))?;
            c.insert(
                "original_max_position_embeddings".into(),
                json!(original.unwrap_or(4096)),
            );
            let window = f.get_u64(&key("attention.sliding_window"))?;
            c.insert("sliding_window".into(), json!(window));
        }
    }
    Ok(Value::Object(c))
}

/// Gemma 2 and 3: `(1 + w)` norms, GELU-tanh, `query_pre_attn_scalar`, sliding and full layers
/// (Gemma 2 alternating, Gemma 3 five sliding then one full, each with its own rope base), and
/// Gemma 2's soft-capping; transformers' defaults where the file is silent.
fn gemma(
    f: &GgufFile,
    arch: GgufArch,
    theta: Option<f64>,
    c: &mut Map<String, Value>,
) -> Result<()> {
    let key = |k: &str| format!("{}.{k}", arch.name());
    let gemma3 = arch == GgufArch::Gemma3;
    c.entry("head_dim").or_insert(json!(256));
    c.entry("rms_norm_eps").or_insert(json!(1e-6));
    c.entry("max_position_embeddings")
        .or_insert(json!(if gemma3 { 131072 } else { 8192 }));
    c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    // llama.cpp does not store it; transformers' default, which every released model but
    // Gemma 3 27B (168) has.
    c.insert("query_pre_attn_scalar".into(), json!(256));
    let window = f.get_u64(&key("attention.sliding_window"))?;
    c.insert("sliding_window".into(), json!(window.unwrap_or(4096)));
    let layers = c["num_hidden_layers"].as_u64().unwrap_or(0);
    // transformers' (and llama.cpp's) layer pattern: every `pattern`-th layer is full.
    let pattern = if gemma3 { 6 } else { 2 };
    let types: Vec<&str> = (0..layers)
        .map(|i| {
            if (i + 1) % pattern == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    c.insert("layer_types".into(), json!(types));
    if gemma3 {
        c.insert(
            "rope_parameters".into(),
            json!({
                "full_attention": {"rope_type": "default", "rope_theta": theta.unwrap_or(1_000_000.0)},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }),
        );
        c.insert("attn_logit_softcapping".into(), Value::Null);
        c.insert("final_logit_softcapping".into(), Value::Null);
        c.insert("use_bidirectional_attention".into(), json!(false));
    } else {
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": theta.unwrap_or(10000.0)}),
        );
        for (k, default) in [
            ("attn_logit_softcapping", 50.0),
            ("final_logit_softcapping", 30.0),
        ] {
            let cap = f.get_f32(&key(k))?.map_or(default, f64::from);
            c.insert(k.into(), json!(cap));
        }
    }
    Ok(())
}

/// The first thing in the file that makes the model differ from what loratch (and transformers'
/// reading of the file) would build, if any, as a message naming the key or tensor.
pub(super) fn unsupported(f: &GgufFile, arch: GgufArch) -> Result<Option<String>> {
    for (tensor, what) in [
        (
            "rope_freqs.weight",
            "rope frequency factors, Llama 3.1+ scaling",
        ),
        ("rope_factors_long.weight", "Phi-3 long-rope factors"),
        ("rope_factors_short.weight", "Phi-3 long-rope factors"),
    ] {
        if f.tensor(tensor).is_some() {
            return Ok(Some(format!(
                "tensor {tensor} ({what}) is not supported yet"
            )));
        }
    }
    if matches!(arch, GgufArch::Llama | GgufArch::Qwen2 | GgufArch::Qwen3) {
        return Ok(None);
    }
    let key = |k: &str| format!("{}.{k}", arch.name());
    if let Some(ty) = f.get_str(&key("rope.scaling.type"))? {
        if ty != "none" {
            return Ok(Some(format!(
                "{}: rope scaling {ty:?} is not supported for {}",
                key("rope.scaling.type"),
                arch.name()
            )));
        }
    }
    if let Some(factor) = f.get_f32(&key("rope.scaling.factor"))? {
        if factor != 1.0 {
            return Ok(Some(format!(
                "{}: rope scaling factor {factor} is not supported for {}",
                key("rope.scaling.factor"),
                arch.name()
            )));
        }
    }
    if arch == GgufArch::Phi3 {
        let hidden = req_u64(f, &key("embedding_length"))?;
        let heads = req_u64(f, &key("attention.head_count"))?.max(1);
        if let Some(n) = f.get_u64(&key("rope.dimension_count"))? {
            if n != hidden / heads {
                return Ok(Some(format!(
                    "{}: partial rotary embeddings ({n} of {} dimensions) are not supported",
                    key("rope.dimension_count"),
                    hidden / heads
                )));
            }
        }
    }
    Ok(None)
}
