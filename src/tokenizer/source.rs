//! Where a model's tokenizer comes from (a Hugging Face directory, a `tokenizer.json`, or a GGUF
//! file's `tokenizer.*` metadata) and how one is written back as Hugging Face files.
use super::{GgufTokenizerData, Tokenizer};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::io::atomic::write_atomic;
use std::path::Path;

/// Whether `path` is a GGUF file (by its magic, whatever its name).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

impl GgufTokenizerData {
    /// The tokenizer keys of an open GGUF file; a key of the wrong type is an error naming it.
    pub fn read(file: &GgufFile) -> Result<Self> {
        let strings = |key: &str| -> Result<Option<Vec<String>>> {
            Ok(file
                .get_str_array(key)?
                .map(|v| v.into_iter().map(str::to_string).collect()))
        };
        let id = |key: &str| -> Result<Option<u32>> {
            file.get_u64(key)?
                .map(|v| {
                    u32::try_from(v).map_err(|_| Error::Checkpoint {
                        path: file.path().to_path_buf(),
                        msg: format!("{key} = {v} is not a token id"),
                    })
                })
                .transpose()
        };
        let model = file
            .get_str("tokenizer.ggml.model")?
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no tokenizer in the file (key tokenizer.ggml.model missing)",
                    file.path().display()
                ))
            })?
            .to_string();
        Ok(Self {
            architecture: file.get_str("general.architecture")?.map(str::to_string),
            model,
            pre: file.get_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens: strings("tokenizer.ggml.tokens")?.unwrap_or_default(),
            scores: file.get_f32_array("tokenizer.ggml.scores")?,
            token_type: file.get_i32_array("tokenizer.ggml.token_type")?,
            merges: strings("tokenizer.ggml.merges")?,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos_token: file.get_bool("tokenizer.ggml.add_bos_token")?,
            add_eos_token: file.get_bool("tokenizer.ggml.add_eos_token")?,
            chat_template: file.get_str("tokenizer.chat_template")?.map(str::to_string),
        })
    }
}

impl Tokenizer {
    /// The tokenizer of a model path: a GGUF file's metadata, a Hugging Face directory
    /// ([`Tokenizer::from_dir`]), a `tokenizer.json` ([`Tokenizer::from_file`]), or a Hub id in
    /// the local cache ([`crate::hf::hub_cache::resolve`]).
    pub fn for_model(path: impl AsRef<Path>) -> Result<Self> {
        // A Hub id (`owner/name[@rev]`) that is not a path: its snapshot in the local cache.
        let resolved = crate::hf::hub_cache::resolve(path.as_ref())?;
        let path = resolved.as_path();
        if path.is_dir() {
            Self::from_dir(path)
        } else if is_gguf(path) {
            let file = GgufFile::open(path)?;
            Self::from_gguf(&GgufTokenizerData::read(&file)?).map_err(|e| match e {
                Error::Tokenizer(msg) => Error::Tokenizer(format!("{}: {msg}", path.display())),
                other => other,
            })
        } else {
            Self::from_file(path)
        }
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) into
    /// `dir`, as transformers' `save_pretrained` lays them out, so `AutoTokenizer` and
    /// [`Tokenizer::from_dir`] read this tokenizer back.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("serializing tokenizer.json: {e}")))?;
        write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut config = serde_json::Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        config.insert(
            "clean_up_tokenization_spaces".into(),
            self.clean_up_tokenization_spaces.into(),
        );
        for (name, token) in &self.special {
            config.insert((*name).into(), token.clone().into());
        }
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), t.source().into());
        }
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(config))
            .map_err(|e| Error::Tokenizer(format!("tokenizer_config.json: {e}")))?;
        write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }
}
