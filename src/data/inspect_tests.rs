//! Each warning of the data inspector raised by crafted data, templates or tokenizers on the
//! SmolLM2 tokenizer, and none on the FAQ demo's data; counts checked against direct encodings.
use super::*;
use crate::data::records::read_records;
use crate::tokenizer::{test_model_dir, test_tokenizer, ChatTemplate, Message};

fn chat(q: &str, a: &str) -> Record {
    Record::Chat(vec![Message::user(q), Message::assistant(a)])
}

fn kinds(c: &Checked) -> Vec<&'static str> {
    c.warnings.iter().map(DataWarning::kind).collect()
}

fn with_template(src: &str) -> Tokenizer {
    let mut tok = test_tokenizer().clone();
    tok.set_chat_template(Some(ChatTemplate::new(src).unwrap()));
    tok
}

#[test]
fn good_chat_data_has_no_warning_and_counts_match_encodings() {
    let tok = test_tokenizer();
    let records = vec![chat("What is 2+2?", "It is 4."), chat("Hi", "Hello there.")];
    let c = tokenize_checked(&records, tok, 512, false, "t").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Independent count: the rendering encoded directly; targets = each answer + <|im_end|>.
    let mut tokens = 0;
    let mut targets = 0;
    for r in &records {
        let Record::Chat(m) = r else { unreachable!() };
        let text = tok.apply_chat_template(m, false).unwrap();
        tokens += tok.encode(&text, false).unwrap().len();
        targets += tok.encode(&m[1].content, false).unwrap().len() + 1;
    }
    assert_eq!(c.counts.tokens, tokens);
    assert_eq!(c.counts.target_tokens, targets);
    assert_eq!(c.counts.eos_targets, 2);
    assert_eq!(
        (c.counts.records, c.counts.examples, c.counts.truncated),
        (2, 2, 0)
    );
    assert_eq!(c.record_numbers, vec![1, 2]);
}

#[test]
fn template_without_eos_warns_that_eos_is_never_trained() {
    let tok = with_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant: {% endif %}",
    );
    let c = tokenize_checked(&[chat("q", "an answer")], &tok, 64, false, "t").unwrap();
    assert_eq!(kinds(&c), vec!["eos_never_trained"]);
    assert_eq!(c.counts.eos_targets, 0);
    assert!(c.warnings[0].to_string().contains("<|im_end|>"));
}

#[test]
fn template_dropping_assistant_turns_warns() {
    // Renders the user's messages only: the answer is nowhere, nothing is trained.
    let tok = with_template(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}\
         {% endfor %}",
    );
    let records = vec![chat("q1", "answer one"), chat("q2", "answer two")];
    let c = tokenize_checked(&records, &tok, 64, false, "t").unwrap();
    assert!(kinds(&c).contains(&"no_assistant_part"), "{:?}", c.warnings);
    assert_eq!(c.counts.assistant_missing, 2);
    assert_eq!(c.counts.examples, 0);
    assert_eq!(
        c.warnings[0],
        DataWarning::NoAssistantPart {
            records: 2,
            first: 1
        }
    );
}

#[test]
fn truncation_leaving_no_target_warns() {
    let tok = test_tokenizer();
    let long = "one two three four five six seven eight nine ten ".repeat(4);
    let records = vec![chat("short", "fine"), chat(&long, "cut off")];
    // SmolLM2's template opens with a ~20-token system prompt: the short record fits in 48.
    let c = tokenize_checked(&records, tok, 48, false, "t").unwrap();
    assert_eq!(kinds(&c), vec!["no_target_after_truncation"]);
    assert_eq!(c.counts.truncated, 1);
    assert_eq!(c.counts.no_target_after_truncation, 1);
    assert_eq!(c.examples.n_skipped, 1);
    assert_eq!(
        c.warnings[0],
        DataWarning::NoTargetAfterTruncation {
            records: 1,
            first: 2,
            max_seq_length: 48
        }
    );
    // Untouched when long enough.
    let c = tokenize_checked(&records, tok, 512, false, "t").unwrap();
    assert!(c.warnings.is_empty());
}

#[test]
fn doubled_bos_warns() {
    // SmolLM2's tokenizer with a post-processor that adds BOS (<|im_start|>), as Llama's does,
    // on text that was already rendered with the chat template (which opens with it).
    let dir = tempfile::tempdir().unwrap();
    let src = test_model_dir();
    for f in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(src.join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
    });
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let rendered = tok
        .apply_chat_template(&[Message::user("q"), Message::assistant("a")], false)
        .unwrap();
    let records = vec![Record::Text("plain text".into()), Record::Text(rendered)];
    let c = tokenize_checked(&records, &tok, 64, false, "t").unwrap();
    assert_eq!(kinds(&c), vec!["doubled_bos"]);
    assert_eq!(c.counts.doubled_bos, 1);
    assert!(matches!(
        c.warnings[0],
        DataWarning::DoubledBos { first: 2, .. }
    ));
    // The same text through SmolLM2's own tokenizer (no BOS added): no warning.
    let c = tokenize_checked(&records, test_tokenizer(), 64, false, "t").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn layout_counts_rows_and_padding() {
    let ex = |n: usize| Example {
        input_ids: vec![1; n],
        labels: vec![1; n],
    };
    let config = |packing| LoaderConfig {
        batch_size: 2,
        max_seq_length: 10,
        packing,
        shuffle: false,
        seed: 0,
        pad_id: 0,
    };
    // Off: batches [6, 4] (width 6) and [10]: 20 tokens in 12 + 10 slots.
    let l = layout(vec![ex(6), ex(4), ex(10)], config(Packing::Off)).unwrap();
    assert_eq!((l.batches, l.rows), (2, 3));
    assert!((l.padding_fraction - (1.0 - 20.0 / 22.0)).abs() < 1e-12);
    // Rows: first fit gives [6, 4] and [10]: one batch of two full rows.
    let l = layout(vec![ex(6), ex(4), ex(10)], config(Packing::Rows)).unwrap();
    assert_eq!((l.batches, l.rows), (1, 2));
    assert_eq!(l.padding_fraction, 0.0);
}

#[test]
fn samples_mark_the_trained_text() {
    let tok = test_tokenizer();
    let c = tokenize_checked(&[chat("Hi", "Hello there.")], tok, 64, false, "t").unwrap();
    let s = Sample::new(tok, &c.examples.examples[0], 1, false).unwrap();
    let (open, close) = MARKS;
    let text = s.marked(false);
    assert!(
        text.ends_with(&format!("{open}Hello there.<|im_end|>{close}\n")),
        "{text:?}"
    );
    assert_eq!(text.matches(open).count(), 1);
    assert!(s
        .marked(true)
        .contains("\x1b[32mHello there.<|im_end|>\x1b[0m"));
}

/// The FAQ demo's data (`$LORATCH_FAQ_JSONL`) with the demo's settings: no warning.
#[test]
fn faq_demo_data_has_no_warning() {
    let Some(path) = std::env::var_os("LORATCH_FAQ_JSONL") else {
        panic!("LORATCH_FAQ_JSONL is not set (see the Makefile's test-rust target)");
    };
    let tok = test_tokenizer();
    let records = read_records(&path).unwrap();
    let c = tokenize_checked(&records, tok, 256, false, "faq").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.counts.examples + c.examples.n_skipped, 503);
    assert_eq!(c.counts.eos_targets, c.counts.examples);
}
