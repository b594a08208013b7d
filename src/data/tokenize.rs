//! Turning [`Record`]s into token ids and labels, with the positions not trained on masked.
//!
//! * [`Record::Text`]: `encode(text, add_special_tokens=true)` + EOS, all trained.
//! * [`Record::PromptCompletion`]: `encode(prompt, true)` (masked unless `train_on_inputs`) +
//!   `encode(completion, false)` + EOS (trained). The two parts are tokenized separately.
//! * [`Record::Chat`]: the full conversation is rendered with the chat template
//!   (`add_generation_prompt=false`) and encoded without special tokens. Each assistant message
//!   `i` is trained from the end of `render(messages[..i], add_generation_prompt=true)` to the end
//!   of `render(messages[..=i], false)`, both of which must be text prefixes of the full
//!   rendering. Whatever follows the last EOS (end-of-turn) token inside that span (the template's
//!   `"\n"` after `<|im_end|>`) is not trained, so the trained tokens of a turn are its content
//!   plus the end-of-turn token. The spans become token positions by encoding the text up to each
//!   boundary: when that is a token-prefix of the full encoding its length is the boundary;
//!   otherwise (a token straddles the boundary) every boundary is placed with the character
//!   offsets of the full encoding instead: a token is trained when it overlaps a span, so a
//!   token straddling the start (e.g. `" hello"` after a prompt ending in `": "`) is trained.
//!   Without a chat template the conversation is rendered as `"{role}: {content}\n"` a message
//!   (after the BOS token when the tokenizer opens encodings with one, as Gemma's does),
//!   with the EOS token after each assistant content, and the generation prompt is
//!   `"assistant: "` (this format takes the offset path: the trained tokens of a turn are
//!   `" {content}{eos}"`). With `train_on_inputs` every token is trained.
//!
//! Sequences are truncated on the right to `max_seq_length`. Position 0 is never a target of the
//! shifted loss (logits[t] predicts labels[t+1]), so its label is always -100, and an example with
//! no other trained position left is skipped (`None`).
use crate::data::records::Record;
use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};

/// The label of positions that are not trained on.
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids`: the id where trained, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl Example {
    /// The sequence length.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// The number of trained positions.
    pub fn n_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

fn ids(v: Vec<u32>) -> Vec<i64> {
    v.into_iter().map(i64::from).collect()
}

fn eos(tokenizer: &Tokenizer) -> Result<i64> {
    tokenizer
        .eos_token_id()
        .map(i64::from)
        .ok_or_else(|| Error::Config("the tokenizer has no EOS token id".into()))
}

/// Tokenizes one record; `None` when nothing trainable remains after truncation.
pub fn tokenize(
    record: &Record,
    tokenizer: &Tokenizer,
    max_seq_length: usize,
    train_on_inputs: bool,
) -> Result<Option<Example>> {
    check_max_seq_length(max_seq_length)?;
    Ok(truncate(
        encode_record(record, tokenizer, train_on_inputs)?,
        max_seq_length,
    ))
}

/// `max_seq_length` leaves room for a target (position 0 never is one).
pub(crate) fn check_max_seq_length(max_seq_length: usize) -> Result<()> {
    if max_seq_length < 2 {
        return Err(Error::Config(format!(
            "max_seq_length must be at least 2, got {max_seq_length}"
        )));
    }
    Ok(())
}

/// One record's ids and labels before truncation (the first label not yet masked): the part of
/// [`tokenize`] the data inspector also needs whole, to count truncations.
pub(crate) fn encode_record(
    record: &Record,
    tokenizer: &Tokenizer,
    train_on_inputs: bool,
) -> Result<Example> {
    let (input_ids, labels) = match record {
        Record::Text(text) => {
            let mut input_ids = ids(tokenizer.encode(text, true)?);
            input_ids.push(eos(tokenizer)?);
            (input_ids.clone(), input_ids)
        }
        Record::PromptCompletion { prompt, completion } => {
            let mut input_ids = ids(tokenizer.encode(prompt, true)?);
            let n_prompt = input_ids.len();
            input_ids.extend(ids(tokenizer.encode(completion, false)?));
            input_ids.push(eos(tokenizer)?);
            let mut labels = input_ids.clone();
            if !train_on_inputs {
                labels[..n_prompt].fill(IGNORE_INDEX);
            }
            (input_ids, labels)
        }
        Record::Chat(messages) => {
            let (input_ids, labels) = tokenize_chat(messages, tokenizer)?;
            if train_on_inputs {
                (input_ids.clone(), input_ids)
            } else {
                (input_ids, labels)
            }
        }
    };
    Ok(Example { input_ids, labels })
}

/// Cuts `example` to `max_seq_length` tokens on the right and masks position 0; `None` when no
/// target is left.
pub(crate) fn truncate(mut example: Example, max_seq_length: usize) -> Option<Example> {
    example.input_ids.truncate(max_seq_length);
    example.labels.truncate(max_seq_length);
    if let Some(first) = example.labels.first_mut() {
        *first = IGNORE_INDEX;
    }
    if example.labels.iter().all(|&l| l == IGNORE_INDEX) {
        return None;
    }
    Some(example)
}

/// Renders `messages` with the chat template, or the plain `"role: content\n"` format.
pub(crate) fn render(
    tokenizer: &Tokenizer,
    messages: &[Message],
    generation_prompt: bool,
) -> Result<String> {
    if tokenizer.chat_template().is_some() {
        return tokenizer.apply_chat_template(messages, generation_prompt);
    }
    let eos = tokenizer.eos_token().unwrap_or("");
    let mut text = String::new();
    // The plain text is encoded without special tokens, so a tokenizer that opens every encoding
    // with BOS (Gemma, Llama 2) gets it written out, as chat templates do.
    if let (Some(bos), Some(bos_id)) = (tokenizer.bos_token(), tokenizer.bos_token_id()) {
        if tokenizer.encode("", true)? == [bos_id] {
            text.push_str(bos);
        }
    }
    for m in messages {
        text.push_str(&m.role);
        text.push_str(": ");
        text.push_str(&m.content);
        if m.role == "assistant" {
            text.push_str(eos);
        }
        text.push('\n');
    }
    if generation_prompt {
        text.push_str("assistant: ");
    }
    Ok(text)
}

/// The trained byte spans of the assistant turns in `full` (see the module docs).
fn assistant_spans(
    tokenizer: &Tokenizer,
    messages: &[Message],
    full: &str,
) -> Result<Vec<(usize, usize)>> {
    let eos = tokenizer.eos_token().filter(|t| !t.is_empty());
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(tokenizer, &messages[..i], true)?;
        let through = render(tokenizer, &messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            return Err(Error::Input(format!(
                "the chat template does not render message {i} as an extension of the \
                 messages before it; cannot locate the assistant turn"
            )));
        }
        let (start, mut end) = (before.len(), through.len());
        if let Some(eos) = eos {
            if let Some(pos) = full[start..end].rfind(eos) {
                end = start + pos + eos.len();
            }
        }
        if end > start {
            spans.push((start, end));
        }
    }
    Ok(spans)
}

/// Token ids and labels (assistant turns trained) of a conversation.
fn tokenize_chat(messages: &[Message], tokenizer: &Tokenizer) -> Result<(Vec<i64>, Vec<i64>)> {
    let full = render(tokenizer, messages, false)?;
    let encoding = tokenizer
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
    let full_ids = encoding.get_ids();
    let spans = assistant_spans(tokenizer, messages, &full)?;

    // Token boundaries from token-prefix encodings, if all of them are prefixes.
    let mut by_prefix = Vec::with_capacity(spans.len());
    for &(start, end) in &spans {
        let a = tokenizer.encode(&full[..start], false)?;
        let b = tokenizer.encode(&full[..end], false)?;
        if !full_ids.starts_with(&a) || !full_ids.starts_with(&b) {
            by_prefix.clear();
            break;
        }
        by_prefix.push((a.len(), b.len()));
    }
    let input_ids: Vec<i64> = full_ids.iter().map(|&t| i64::from(t)).collect();
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    if by_prefix.len() == spans.len() {
        for (a, b) in by_prefix {
            labels[a..b].copy_from_slice(&input_ids[a..b]);
        }
    } else {
        for (t, &(s, e)) in encoding.get_offsets().iter().enumerate() {
            if spans.iter().any(|&(start, end)| s < end && e > start) {
                labels[t] = input_ids[t];
            }
        }
    }
    Ok((input_ids, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_tokenizer;

    fn trained(e: &Example) -> Vec<u32> {
        e.labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect()
    }

    fn masked_positions(e: &Example) -> Vec<usize> {
        (0..e.len())
            .filter(|&i| e.labels[i] == IGNORE_INDEX)
            .collect()
    }

    #[test]
    fn tokenize_text_all_trained_plus_eos() {
        let tok = test_tokenizer();
        let e = tokenize(&Record::Text("Hello world".into()), tok, 64, false)
            .unwrap()
            .unwrap();
        let mut want: Vec<i64> = ids(tok.encode("Hello world", true).unwrap());
        want.push(tok.eos_token_id().unwrap() as i64);
        assert_eq!(e.input_ids, want);
        assert_eq!(masked_positions(&e), vec![0]);
        assert_eq!(&e.labels[1..], &want[1..]);
    }

    #[test]
    fn tokenize_prompt_completion_masks_prompt() {
        let tok = test_tokenizer();
        let r = Record::PromptCompletion {
            prompt: "The capital of France is".into(),
            completion: " Paris.".into(),
        };
        let n_prompt = tok.encode("The capital of France is", true).unwrap().len();
        let e = tokenize(&r, tok, 64, false).unwrap().unwrap();
        assert_eq!(masked_positions(&e), (0..n_prompt).collect::<Vec<_>>());
        assert_eq!(
            tok.decode(&trained(&e), false).unwrap(),
            " Paris.<|im_end|>"
        );
        let e = tokenize(&r, tok, 64, true).unwrap().unwrap();
        assert_eq!(masked_positions(&e), vec![0]);
    }

    #[test]
    fn tokenize_chat_trains_exactly_assistant_turns() {
        let tok = test_tokenizer();
        let msgs = vec![
            Message::user("What is 2+2?"),
            Message::assistant("It is 4."),
            Message::user("And 3+3?"),
            Message::assistant("Six, of course."),
        ];
        let e = tokenize(&Record::Chat(msgs.clone()), tok, 512, false)
            .unwrap()
            .unwrap();
        let full = tok.apply_chat_template(&msgs, false).unwrap();
        assert_eq!(e.input_ids, ids(tok.encode(&full, false).unwrap()));
        // Each trained run decodes to one assistant content + the end-of-turn token.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for i in 0..e.len() {
            if e.labels[i] != IGNORE_INDEX {
                if i == 0 || e.labels[i - 1] == IGNORE_INDEX {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(e.labels[i] as u32);
            }
        }
        let texts: Vec<String> = runs.iter().map(|r| tok.decode(r, false).unwrap()).collect();
        assert_eq!(
            texts,
            vec!["It is 4.<|im_end|>", "Six, of course.<|im_end|>"]
        );
        // train_on_inputs: everything but position 0.
        let e = tokenize(&Record::Chat(msgs), tok, 512, true)
            .unwrap()
            .unwrap();
        assert_eq!(masked_positions(&e), vec![0]);
    }

    #[test]
    fn tokenize_chat_without_template_uses_plain_format() {
        let mut tok = test_tokenizer().clone();
        tok.set_chat_template(None);
        let msgs = vec![Message::user("hi"), Message::assistant("hello there")];
        let e = tokenize(&Record::Chat(msgs), &tok, 64, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            tok.decode(
                &e.input_ids.iter().map(|&t| t as u32).collect::<Vec<_>>(),
                false
            )
            .unwrap(),
            "user: hi\nassistant: hello there<|im_end|>\n"
        );
        assert_eq!(
            tok.decode(&trained(&e), false).unwrap(),
            " hello there<|im_end|>"
        );
    }

    /// Gemma's tokenizer opens every encoding with `<bos>` (and its GGUF has no chat template):
    /// the plain format starts with it too, and only the assistant's content and EOS train.
    #[test]
    fn plain_format_keeps_a_tokenizers_bos() {
        let Some(path) = crate::testing::gemma3_gguf() else {
            return;
        };
        let tok = Tokenizer::for_model(&path).unwrap();
        assert!(tok.chat_template().is_none());
        let bos = tok.bos_token_id().unwrap() as i64;
        let msgs = vec![Message::user("hi"), Message::assistant("hello there")];
        let e = tokenize(&Record::Chat(msgs), &tok, 64, false)
            .unwrap()
            .unwrap();
        assert_eq!(e.input_ids[0], bos);
        assert_eq!(e.input_ids.iter().filter(|&&t| t == bos).count(), 1);
        assert_eq!(
            tok.decode(&trained(&e), false).unwrap(),
            " hello there<eos>"
        );
    }

    #[test]
    fn tokenize_chat_offsets_fallback_agrees() {
        // A template whose assistant span starts mid-token ("x" glued to the content) forces the
        // offset fallback; the trained tokens must still start inside the assistant content.
        let mut tok = test_tokenizer().clone();
        let src = "{% for m in messages %}{{ m['role'] }}:x{{ m['content'] }};{% endfor %}\
                   {% if add_generation_prompt %}assistant:x{% endif %}";
        tok.set_chat_template(Some(crate::tokenizer::ChatTemplate::new(src).unwrap()));
        let msgs = vec![Message::user("q"), Message::assistant("yz answer")];
        let e = tokenize(&Record::Chat(msgs), &tok, 64, false)
            .unwrap()
            .unwrap();
        let text = tok.decode(&trained(&e), false).unwrap();
        assert!(
            text.ends_with("yz answer;") && !text.contains("user"),
            "{text:?}"
        );
        assert!(text.len() <= "assistant:xyz answer;".len(), "{text:?}");
    }

    #[test]
    fn tokenize_truncation_and_skip() {
        let tok = test_tokenizer();
        let long = "one two three four five six seven eight nine ten";
        let e = tokenize(&Record::Text(long.into()), tok, 5, false)
            .unwrap()
            .unwrap();
        assert_eq!(e.len(), 5);
        assert_eq!(e.labels.len(), 5);
        // Prompt alone fills max_seq_length: nothing trainable, skipped.
        let r = Record::PromptCompletion {
            prompt: long.into(),
            completion: " eleven".into(),
        };
        assert_eq!(tokenize(&r, tok, 5, false).unwrap(), None);
        // A chat whose assistant turn is cut off entirely.
        let r = Record::Chat(vec![Message::user(long), Message::assistant("ok")]);
        assert_eq!(tokenize(&r, tok, 8, false).unwrap(), None);
        let r = Record::Chat(vec![Message::user("no answer")]);
        assert_eq!(tokenize(&r, tok, 64, false).unwrap(), None);
        assert!(tokenize(&Record::Text("x".into()), tok, 1, false).is_err());
    }
}
