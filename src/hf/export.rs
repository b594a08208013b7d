//! Writing a loaded model, adapters folded in, as a plain Hugging Face directory that
//! transformers loads: `config.json`, `model.safetensors` and the tokenizer files copied over
//! (for a GGUF model: written from the file's metadata). Quantized weights are written decoded,
//! in the model's float dtype.
use super::loaded::LoadedModel;
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::safetensors::serialize;
use crate::model::GgufCheckpoint;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::path::Path;

/// Files copied from the source model directory when present.
const COPIED: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
];

/// Writes the model with its adapters merged (computed in fp32, the model left unchanged) to
/// `out`, which must not exist or be an empty directory.
pub fn save_merged(model: &LoadedModel, out: &Path) -> Result<()> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory exists and is not empty",
            ),
        ));
    }
    let tensors = model.lm.merged_state_dict()?;
    let bytes = serialize(
        &tensors,
        &HashMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    if model.path.is_file() {
        // A GGUF: config.json and the tokenizer files from its metadata.
        let mut config = GgufCheckpoint::open(&model.path)?.config_json()?;
        config["torch_dtype"] = crate::device::dtype_name(model.lm.kind()).into();
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::Config(format!("config.json: {e}")))?;
        write_atomic(&out.join("config.json"), text.as_bytes())?;
        Tokenizer::for_model(&model.path)?.save_pretrained(out)?;
        return Ok(());
    }
    for name in COPIED {
        let src = model.path.join(name);
        if src.is_file() {
            let data = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&out.join(name), &data)?;
        }
    }
    Ok(())
}
