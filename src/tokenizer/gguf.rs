//! Tokenizers built from a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`),
//! equal to the one transformers builds from the same file with
//! `AutoTokenizer.from_pretrained(dir, gguf_file=name)` (its
//! `integrations/gguf/gguf_tokenizer_mapping.py`, transformers 5.24).
//!
//! A GGUF has no `tokenizer.json`: llama.cpp's converter stores the vocabulary, merges, scores,
//! token types and special-token ids as metadata. Two vocabularies are supported, named by
//! `tokenizer.ggml.model`:
//! - `"gpt2"`: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM), built as transformers'
//!   `GPT2Tokenizer`, with the split regex `tokenizer.ggml.pre` names where transformers knows it;
//! - `"llama"`: SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3), built as
//!   `LlamaTokenizer`, or `GemmaTokenizer` / transformers' Phi-3 variant by `general.architecture`.
//!
//! The order of the steps below follows transformers' step for step, because the ids of added
//! tokens depend on it: the builder class's own default special tokens, then the tokens the file
//! marks control (special) and user-defined (not special), then the named special tokens.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::{ChatTemplate, Tokenizer, SPECIAL_TOKEN_NAMES};
use crate::error::{Error, Result};

/// The tokenizer part of a GGUF file's metadata (keys `tokenizer.ggml.*`,
/// `tokenizer.chat_template`, and `general.architecture`, which picks the SentencePiece variant).
#[derive(Debug, Clone, Default)]
#[cfg_attr(test, derive(serde::Serialize, serde::Deserialize), serde(default))]
pub struct GgufTokenizerData {
    /// `general.architecture` (`"llama"`, `"gemma3"`, `"phi3"`, ...): Gemma and Phi-3 files build
    /// their SentencePiece tokenizer differently; `None` counts as a plain Llama-style one.
    pub architecture: Option<String>,
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece BPE); any
    /// other is refused.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name (selects the split regex of byte-level BPE).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: one per token; merges are derived from them when a file has none.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: one per token: 1 normal, 2 unknown, 3 control, 4
    /// user-defined, 5 unused, 6 byte.
    pub token_type: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: BPE merges, each two tokens separated by one space.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (transformers' default: true for `"llama"`, else false).
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token` (default false).
    pub add_eos_token: Option<bool>,
    /// `tokenizer.chat_template`: a Jinja chat template.
    pub chat_template: Option<String>,
}

/// llama.cpp's token types that matter here (`tokenizer.ggml.token_type`).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// Which transformers builder a file gets (`select_tokenizer_builder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `GPT2Tokenizer`: byte-level BPE.
    ByteLevel,
    /// `LlamaTokenizer`: SentencePiece BPE, a `Metaspace` pre-tokenizer.
    Llama,
    /// `GemmaTokenizer`: SentencePiece BPE, spaces replaced by a normalizer, no prefix space.
    Gemma,
    /// `LlamaTokenizer` whose prefix space comes from a normalizer (transformers' `phi3_tokenizer`).
    Phi3,
}

impl Kind {
    fn of(data: &GgufTokenizerData) -> Result<Kind> {
        match (data.model.as_str(), data.architecture.as_deref()) {
            ("gpt2", _) => Ok(Kind::ByteLevel),
            ("llama", Some("gemma" | "gemma2" | "gemma3")) => Ok(Kind::Gemma),
            ("llama", Some("phi3")) => Ok(Kind::Phi3),
            ("llama", _) => Ok(Kind::Llama),
            (other, _) => Err(Error::Tokenizer(format!(
                "tokenizer.ggml.model: {other:?} is not supported (supported: \"gpt2\", \"llama\")"
            ))),
        }
    }

    /// The default special tokens of the builder class, which its constructor adds as special
    /// tokens (new ones if the vocabulary lacks them, as in transformers), in
    /// [`SPECIAL_TOKEN_NAMES`] order.
    fn class_defaults(self) -> &'static [&'static str] {
        match self {
            Kind::ByteLevel => &["<|endoftext|>"],
            Kind::Llama | Kind::Phi3 => &["<s>", "</s>", "<unk>"],
            Kind::Gemma => &["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"],
        }
    }
}

/// transformers' split regexes by `tokenizer.ggml.pre` (`GGUF_PRE_TOKENIZER_SPLITS`).
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable bytes stand for themselves,
/// the others for U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in (0u8..=255).zip(table.iter_mut()) {
        *slot = if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(byte)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    table
}

/// Python's `str.isspace`: Unicode white space plus the separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn key_err(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{key}: {msg}"))
}

/// Checks the per-token arrays have one entry per token and the special ids are in range.
fn validate(data: &GgufTokenizerData) -> Result<()> {
    let n = data.tokens.len();
    if n == 0 {
        return Err(key_err("tokenizer.ggml.tokens", "the vocabulary is empty"));
    }
    if let Some(s) = &data.scores {
        if s.len() != n {
            return Err(key_err(
                "tokenizer.ggml.scores",
                format!("{} scores for {n} tokens", s.len()),
            ));
        }
    }
    if let Some(t) = &data.token_type {
        if t.len() != n {
            return Err(key_err(
                "tokenizer.ggml.token_type",
                format!("{} token types for {n} tokens", t.len()),
            ));
        }
    }
    for (key, id) in special_ids(data) {
        if let Some(id) = id {
            if id as usize >= n {
                return Err(key_err(
                    key,
                    format!("token id {id} is out of range (the vocabulary has {n} tokens)"),
                ));
            }
        }
    }
    Ok(())
}

/// The named special tokens' ids, by key, in [`SPECIAL_TOKEN_NAMES`] order.
fn special_ids(data: &GgufTokenizerData) -> [(&'static str, Option<u32>); 4] {
    [
        ("tokenizer.ggml.bos_token_id", data.bos_token_id),
        ("tokenizer.ggml.eos_token_id", data.eos_token_id),
        ("tokenizer.ggml.unknown_token_id", data.unknown_token_id),
        ("tokenizer.ggml.padding_token_id", data.padding_token_id),
    ]
}

/// transformers' `generate_merges`: every split of every token into two tokens of the
/// vocabulary, ordered by the score of the whole (higher first), then by the pieces' lengths.
/// `vocab` maps a token to its (last) id; `scored` lists (token, score) in first-seen order
/// with the last score seen (a Python dict built from pairs).
fn generate_merges(vocab: &HashMap<&str, usize>, scored: &[(&str, f64)]) -> Vec<(String, String)> {
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &(token, score) in scored {
        let start = merges.len();
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left, right, score));
            }
        }
        merges[start..].sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Descending and stable, as Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect()
}

/// Pairs in first-seen order with the last value, as `dict(pairs)` in Python.
fn py_dict<'a>(pairs: impl Iterator<Item = (&'a str, f64)>) -> Vec<(&'a str, f64)> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut out: Vec<(&str, f64)> = Vec::new();
    for (k, v) in pairs {
        match index.get(k) {
            Some(&i) => out[i].1 = v,
            None => {
                index.insert(k, out.len());
                out.push((k, v));
            }
        }
    }
    out
}

/// The merges of the file, or, without them, the ones its vocabulary implies (transformers'
/// `get_merges`); `tokens` is the vocabulary as the builder spells it.
fn merges(
    data: &GgufTokenizerData,
    tokens: &[String],
    kind: Kind,
) -> Result<Vec<(String, String)>> {
    if let Some(merges) = &data.merges {
        return merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
                [l, r] => Ok((l.to_owned(), r.to_owned())),
                _ => Err(key_err(
                    "tokenizer.ggml.merges",
                    format!("entry {i} ({m:?}) is not two tokens separated by one space"),
                )),
            })
            .collect();
    }
    let vocab: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Gemma's scores do not follow its merge order; the order of the tokens in the file does.
    let scored = if kind == Kind::Gemma {
        py_dict(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), -(i as f64))),
        )
    } else {
        let scores = data.scores.as_ref().ok_or_else(|| {
            key_err(
                "tokenizer.ggml.merges",
                "missing, and there are no tokenizer.ggml.scores to derive them from",
            )
        })?;
        py_dict(
            tokens
                .iter()
                .map(String::as_str)
                .zip(scores.iter().map(|&s| f64::from(s))),
        )
    };
    Ok(generate_merges(&vocab, &scored))
}

/// The vocabulary as the builder class spells it.
fn spelled_tokens(data: &GgufTokenizerData, kind: Kind) -> Vec<String> {
    match kind {
        // Byte-level vocabularies spell every byte with a printable character; a token that uses
        // another character is written out in that alphabet (transformers' `byte_level_tokenizer`).
        Kind::ByteLevel => {
            let table = byte_chars();
            let alphabet: HashSet<char> = table.iter().copied().collect();
            let respell = |t: &String| {
                if t.chars().all(|c| alphabet.contains(&c)) {
                    t.clone()
                } else {
                    t.bytes().map(|b| table[usize::from(b)]).collect()
                }
            };
            data.tokens.iter().map(respell).collect()
        }
        // Gemma stores a token of spaces as real spaces; its model looks them up as "▁"s.
        Kind::Gemma => data
            .tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.chars().all(py_isspace) {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect(),
        Kind::Llama | Kind::Phi3 => data.tokens.clone(),
    }
}

/// The builder class's BPE model (a later duplicate of a token takes its id, as in a Python dict).
fn bpe_model(data: &GgufTokenizerData, kind: Kind) -> Result<BPE> {
    let spelled = spelled_tokens(data, kind);
    // A byte-level file without merges derives them from the tokens as the file spells them.
    let merge_source = if kind == Kind::ByteLevel {
        &data.tokens
    } else {
        &spelled
    };
    let merges = merges(data, merge_source, kind)?;
    let vocab: Vocab = spelled
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let builder = BPE::builder().vocab_and_merges(vocab, merges);
    let builder = match kind {
        Kind::ByteLevel => builder
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false),
        Kind::Llama | Kind::Phi3 => builder.fuse_unk(true).byte_fallback(true),
        Kind::Gemma => builder
            .fuse_unk(true)
            .unk_token("<unk>".into())
            .byte_fallback(true),
    };
    builder
        .build()
        .map_err(|e| key_err("tokenizer.ggml.merges", e))
}

/// The builder class's tokenizer: the BPE model with its normalizer, pre-tokenizer and decoder.
fn base_tokenizer(data: &GgufTokenizerData, kind: Kind) -> Result<tokenizers::Tokenizer> {
    let mut tok = tokenizers::Tokenizer::new(bpe_model(data, kind)?);
    let internal = |e: tokenizers::Error| Error::Tokenizer(format!("GGUF tokenizer: {e}"));
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(internal);
    let sp_decoder = |strip: bool| -> Result<DecoderWrapper> {
        let mut parts: Vec<DecoderWrapper> = vec![
            replace("\u{2581}", " ")?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if strip {
            parts.push(Strip::new(' ', 1, 0).into());
        }
        Ok(DecoderSequence::new(parts).into())
    };
    match kind {
        Kind::ByteLevel => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_decoder(Some(ByteLevel::default()));
        }
        Kind::Llama => {
            let metaspace = Metaspace::new('\u{2581}', PrependScheme::First, false);
            tok.with_pre_tokenizer(Some(metaspace));
            tok.with_decoder(Some(sp_decoder(true)?));
        }
        Kind::Gemma => {
            let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
                .map_err(internal)?;
            tok.with_normalizer(Some(replace(" ", "\u{2581}")?));
            tok.with_pre_tokenizer(Some(split));
            tok.with_decoder(Some(sp_decoder(false)?));
        }
        Kind::Phi3 => {
            let normalizer: Vec<NormalizerWrapper> = vec![
                Prepend::new("\u{2581}".into()).into(),
                replace(" ", "\u{2581}")?.into(),
            ];
            tok.with_normalizer(Some(NormalizerSequence::new(normalizer)));
            tok.with_decoder(Some(sp_decoder(true)?));
        }
    }
    Ok(tok)
}

/// transformers' `add_gguf_special_tokens`: the tokens the file marks control are added whole
/// and special, the user-defined ones in the vocabulary whole and not special. A byte-level
/// "control" token outside the byte alphabet is a llama.cpp mislabel that transformers skips.
fn add_file_tokens(inner: &mut tokenizers::Tokenizer, data: &GgufTokenizerData, kind: Kind) {
    let types = data.token_type.as_deref().unwrap_or_default();
    let alphabet: HashSet<char> = byte_chars().into_iter().collect();
    let control: Vec<AddedToken> = data
        .tokens
        .iter()
        .zip(types)
        .filter(|(t, &ty)| {
            ty == CONTROL && (kind != Kind::ByteLevel || t.chars().all(|c| alphabet.contains(&c)))
        })
        .map(|(t, _)| AddedToken::from(t.as_str(), true))
        .collect();
    if !control.is_empty() {
        inner.add_special_tokens(&control);
    }
    let user: Vec<AddedToken> = data
        .tokens
        .iter()
        .zip(types)
        .filter(|(t, &ty)| ty == USER_DEFINED && inner.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(t.as_str(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        inner.add_tokens(&user);
    }
}

/// The named special tokens, as (name, token) in [`SPECIAL_TOKEN_NAMES`] order: the file's ids,
/// plus the mask token of transformers' `GemmaTokenizer` (the class AutoTokenizer picks for Gemma
/// models), which a GGUF cannot override.
fn named_special(data: &GgufTokenizerData, kind: Kind) -> Vec<(&'static str, String)> {
    let token = |id: Option<u32>| id.and_then(|i| data.tokens.get(i as usize)).cloned();
    let [bos, eos, unk, pad] = special_ids(data).map(|(_, id)| token(id));
    let mask = (kind == Kind::Gemma).then(|| "<mask>".to_owned());
    SPECIAL_TOKEN_NAMES
        .into_iter()
        .zip([bos, eos, unk, None, pad, None, mask])
        .filter_map(|(name, token)| token.map(|t| (name, t)))
        .collect()
}

/// Adds each of `tokens` that is not an added token yet (transformers' test against
/// `added_tokens_encoder`), as a special token, in one call.
fn add_missing_special(tok: &mut tokenizers::Tokenizer, tokens: &[&str]) {
    let mut have: HashSet<String> = tok
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let new: Vec<AddedToken> = tokens
        .iter()
        .filter(|t| have.insert((**t).to_owned()))
        .map(|t| AddedToken::from(*t, true))
        .collect();
    if !new.is_empty() {
        tok.add_tokens(&new);
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file's metadata describes, equal to transformers'
    /// `AutoTokenizer.from_pretrained(dir, gguf_file=name)`: ids, decoded text, special tokens
    /// and chat template. Bad metadata is an [`Error::Tokenizer`] naming the key.
    pub fn from_gguf(data: &GgufTokenizerData) -> Result<Tokenizer> {
        let kind = Kind::of(data)?;
        validate(data)?;
        // The builder class's defaults, the file's control and user-defined tokens, the split
        // regex, then the named special tokens: transformers' order, on which the ids of tokens
        // missing from the vocabulary depend.
        let mut inner = base_tokenizer(data, kind)?;
        add_missing_special(&mut inner, kind.class_defaults());
        add_file_tokens(&mut inner, data, kind);
        if let Some(regex) = data.pre.as_deref().and_then(split_regex) {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| key_err("tokenizer.ggml.pre", e))?;
            let parts: Vec<PreTokenizerWrapper> =
                vec![split.into(), ByteLevel::new(false, true, false).into()];
            inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(parts)));
        }
        let special = named_special(data, kind);
        let named: Vec<&str> = special.iter().map(|(_, t)| t.as_str()).collect();
        add_missing_special(&mut inner, &named);

        let chat_template = match &data.chat_template {
            None => None,
            Some(source) => Some(ChatTemplate::new(source.clone()).map_err(|e| match e {
                Error::Tokenizer(msg) => key_err("tokenizer.chat_template", msg),
                other => other,
            })?),
        };
        let mut tok = Tokenizer {
            inner,
            special,
            chat_template,
            clean_up_tokenization_spaces: false,
        };
        // transformers adds a BOS to a SentencePiece vocabulary that does not say otherwise.
        let add_bos = data.add_bos_token.unwrap_or(data.model == "llama");
        tok.set_bos_eos_post_processor(add_bos, data.add_eos_token.unwrap_or(false))?;
        Ok(tok)
    }
}

#[cfg(test)]
mod tests;
