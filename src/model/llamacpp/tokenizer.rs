//! The `tokenizer.*` metadata of a model GGUF, so llama.cpp tokenizes and renders chats as the
//! model was trained. A model loaded from a GGUF passes its own keys on unchanged. A model loaded
//! from a Hugging Face directory has them built from `tokenizer.json`, as llama.cpp's
//! `convert_hf_to_gguf.py` does for byte-level BPE ("gpt2"): the vocabulary by id (ids without a
//! token filled with `[PAD<id>]`), token types (control for special added tokens, user-defined
//! for other added and filler tokens, normal otherwise), merges as `"a b"`, the special-token
//! ids, whether a BOS/EOS is added, and the chat template. Other vocabularies (SentencePiece,
//! WordPiece, ...) and pre-tokenizers without a llama.cpp equivalent are refused.
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};
use crate::tokenizer::source::is_gguf;
use crate::tokenizer::Tokenizer;
use serde_json::Value as Json;
use std::path::Path;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The `tokenizer.*` keys for a model file of `vocab` tokens, from the model at `path`.
pub fn metadata(path: &Path, vocab: i64) -> Result<Vec<(String, Value)>> {
    if is_gguf(path) {
        from_gguf(path, vocab)
    } else {
        from_hf_dir(path, vocab)
    }
}

fn refuse(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!(
        "{}: cannot write the tokenizer for llama.cpp: {msg}",
        path.display()
    ))
}

/// Every `tokenizer.*` key of the GGUF at `path`, in file order.
fn from_gguf(path: &Path, vocab: i64) -> Result<Vec<(String, Value)>> {
    let file = GgufFile::open(path)?;
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")?
        .unwrap_or_default();
    if tokens.len() as i64 != vocab {
        return Err(refuse(
            path,
            format!("{} tokens, the model has {vocab} embeddings", tokens.len()),
        ));
    }
    Ok(file
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// llama.cpp's pre-tokenizer name for a `tokenizer.json` `pre_tokenizer` that splits as it does.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let byte_level = |p: &Json| {
        p["type"] == "ByteLevel"
            && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true)
            && !p
                .get("add_prefix_space")
                .and_then(Json::as_bool)
                .unwrap_or(false)
    };
    if byte_level(pre) {
        return Some("gpt-2");
    }
    // SmolLM's: digits one by one, then GPT-2's split (llama.cpp's "smollm").
    match pre["pretokenizers"].as_array().map(Vec::as_slice) {
        Some([d, b])
            if pre["type"] == "Sequence"
                && d["type"] == "Digits"
                && d["individual_digits"] == true
                && byte_level(b) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}

/// The keys built from a Hugging Face directory's `tokenizer.json` and tokenizer config.
// Long: the converter's steps in its order; each is a few lines and reads top to bottom.
fn from_hf_dir(dir: &Path, vocab: i64) -> Result<Vec<(String, Value)>> {
    let tj = dir.join("tokenizer.json");
    if !tj.is_file() {
        return Err(refuse(
            dir,
            "no tokenizer.json (llama.cpp needs the tokenizer in the file)",
        ));
    }
    let text = std::fs::read_to_string(&tj).map_err(|e| Error::io(&tj, e))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| refuse(&tj, e))?;
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true || !json["normalizer"].is_null() {
        return Err(refuse(
            &tj,
            format!(
                "only byte-level BPE (GPT-2 style, llama.cpp's \"gpt2\") is supported; this one \
                 is {} with normalizer {} (export from the model's GGUF instead)",
                model["type"], json["normalizer"]
            ),
        ));
    }
    let pre = pre_name(&json["pre_tokenizer"]).ok_or_else(|| {
        refuse(
            &tj,
            format!(
                "the pre_tokenizer {} has no llama.cpp equivalent loratch knows (\"gpt-2\", \
                 \"smollm\")",
                json["pre_tokenizer"]
            ),
        )
    })?;
    let n = usize::try_from(vocab).map_err(|_| refuse(dir, "negative vocab_size"))?;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![NORMAL; n];
    let mut put = |id: Option<u64>, token: &str, ty: i32| -> Result<()> {
        let id = id.and_then(|i| usize::try_from(i).ok()).filter(|&i| i < n);
        let id = id.ok_or_else(|| {
            refuse(
                &tj,
                format!("token {token:?} has an id outside the model's {n} embeddings"),
            )
        })?;
        tokens[id] = Some(token.to_string());
        types[id] = ty;
        Ok(())
    };
    let map = model["vocab"]
        .as_object()
        .ok_or_else(|| refuse(&tj, "model.vocab is not an object"))?;
    for (token, id) in map {
        put(id.as_u64(), token, NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let content = added["content"].as_str().unwrap_or_default();
        let ty = if added["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(added["id"].as_u64(), content, ty)?;
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = USER_DEFINED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges = merges(&model["merges"]).ok_or_else(|| refuse(&tj, "malformed model.merges"))?;
    let tok = Tokenizer::from_dir(dir)?;
    let (add_bos, add_eos) = added_ends(&tok)?;
    let s = |x: &str| Value::String(x.to_string());
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s(pre)),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    for (key, id) in [
        ("bos_token_id", tok.bos_token_id()),
        ("eos_token_id", tok.eos_token_id()),
        (
            "unknown_token_id",
            tok.unk_token().and_then(|t| tok.token_to_id(t)),
        ),
        ("padding_token_id", tok.pad_token_id()),
    ] {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    out.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(t) = tok.chat_template() {
        out.push(("tokenizer.chat_template".into(), s(t.source())));
    }
    Ok(out)
}

/// `model.merges` as `"a b"` strings (tokenizer.json holds them as such or as `[a, b]` pairs).
fn merges(m: &Json) -> Option<Vec<Value>> {
    m.as_array()?
        .iter()
        .map(|x| match x {
            Json::String(s) => Some(Value::String(s.clone())),
            Json::Array(p) => match p.as_slice() {
                [Json::String(a), Json::String(b)] => Some(Value::String(format!("{a} {b}"))),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether the tokenizer adds a BOS before and an EOS after a text when asked for special
/// tokens (what its post-processor does, observed rather than parsed).
fn added_ends(tok: &Tokenizer) -> Result<(bool, bool)> {
    let plain = tok.encode("a", false)?;
    let with = tok.encode("a", true)?;
    let bos = tok.bos_token_id();
    let eos = tok.eos_token_id();
    let add_bos = with.len() > plain.len() && bos.is_some() && with.first().copied() == bos;
    let add_eos = with.len() > plain.len() && eos.is_some() && with.last().copied() == eos;
    Ok((add_bos, add_eos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_map_to_llama_cpp_names() {
        let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_name(&bl), Some("gpt-2"));
        let smol = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl]});
        assert_eq!(pre_name(&smol), Some("smollm"));
        for other in [
            json!({"type": "ByteLevel", "add_prefix_space": true}),
            json!({"type": "Metaspace", "replacement": "▁"}),
            json!({"type": "Sequence", "pretokenizers": [{"type": "Split"}, bl]}),
            Json::Null,
        ] {
            assert_eq!(pre_name(&other), None, "{other}");
        }
    }

    #[test]
    fn merges_in_either_form() {
        let m = merges(&json!(["a b", ["c", "d"]])).unwrap();
        assert_eq!(
            m,
            vec![Value::String("a b".into()), Value::String("c d".into())]
        );
        assert!(merges(&json!([["a"]])).is_none());
    }
}
