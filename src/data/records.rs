//! Reading training records from JSON-array or JSONL files, in the common dataset shapes.
//!
//! A file is a JSON array when its first non-space character is `[`, else JSONL (one JSON object
//! a line, blank lines skipped). The shape of the first record decides the file's format, and
//! every record must have it:
//!
//! | keys                                     | record                                   |
//! |------------------------------------------|------------------------------------------|
//! | `messages: [{role, content}]`            | [`Record::Chat`]                         |
//! | `conversations: [{from, value}]` (ShareGPT) | [`Record::Chat`]; `human`/`user` → user, `gpt`/`assistant` → assistant, `system` → system |
//! | `instruction`, `input`?, `output` (Alpaca) | [`Record::Chat`]: user = instruction (+ `"\n\n"` + input if non-empty), assistant = output |
//! | `instruction`, `response`                | [`Record::Chat`] as Alpaca without input |
//! | `prompt`, `completion`                   | [`Record::PromptCompletion`]             |
//! | `text`                                   | [`Record::Text`]                         |
//!
//! The keys are tried in that order; other keys are ignored. Errors name the file and the
//! 1-based line (JSONL) or the 0-based element index (arrays).
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::tokenizer::Message;

/// One training record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Plain text, trained on in full.
    Text(String),
    /// A prompt (masked unless training on inputs) and its completion (trained).
    PromptCompletion {
        /// The prompt text.
        prompt: String,
        /// The completion text.
        completion: String,
    },
    /// A conversation; the assistant turns are trained.
    Chat(Vec<Message>),
}

/// The record shape of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"text"}`.
    Text,
    /// `{"prompt", "completion"}`.
    PromptCompletion,
    /// Alpaca: `{"instruction", "input"?, "output"}`.
    Alpaca,
    /// `{"instruction", "response"}`.
    InstructionResponse,
    /// `{"messages": [{"role", "content"}]}`.
    Messages,
    /// ShareGPT: `{"conversations": [{"from", "value"}]}`.
    ShareGpt,
}

impl Format {
    /// The format a JSON object has, if any.
    pub fn detect(object: &Map<String, Value>) -> Option<Format> {
        let has = |k: &str| object.contains_key(k);
        if has("messages") {
            Some(Format::Messages)
        } else if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("instruction") && has("response") {
            Some(Format::InstructionResponse)
        } else if has("prompt") && has("completion") {
            Some(Format::PromptCompletion)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Text => "text {\"text\"}",
            Format::PromptCompletion => "prompt/completion {\"prompt\", \"completion\"}",
            Format::Alpaca => "alpaca {\"instruction\", \"input\"?, \"output\"}",
            Format::InstructionResponse => "{\"instruction\", \"response\"}",
            Format::Messages => "chat {\"messages\": [{\"role\", \"content\"}]}",
            Format::ShareGpt => "sharegpt {\"conversations\": [{\"from\", \"value\"}]}",
        }
    }
}

const SHAPES: &str = "expected one of {\"text\"}, {\"prompt\", \"completion\"}, \
                      {\"instruction\", \"input\"?, \"output\"}, {\"instruction\", \"response\"}, \
                      {\"messages\": [...]}, {\"conversations\": [...]}";

/// Reads the records of a JSON-array or JSONL file.
pub fn read_records(path: impl AsRef<Path>) -> Result<Vec<Record>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = utf8_text(bytes, &path.display().to_string())?;
    parse_records(&text, &path.display().to_string())
}

/// `bytes` as text, or an [`Error::Input`] naming the line and column of the first byte that is
/// not UTF-8 (a data file's error names where to look, not only the file).
fn utf8_text(bytes: Vec<u8>, source: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let before = &bytes[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
            + 1;
        Error::Input(format!(
            "{source}:{line}: invalid UTF-8 (byte {:#04x} at byte column {column}); data files \
             must be UTF-8 text",
            bytes[at]
        ))
    })
}

/// Parses the records of a JSON-array or JSONL text; `source` names it in errors.
pub fn parse_records(text: &str, source: &str) -> Result<Vec<Record>> {
    // (where, value): "file:line" for JSONL, "file: element i" for arrays.
    let mut values: Vec<(String, Value)> = Vec::new();
    if text.trim_start().starts_with('[') {
        let array: Vec<Value> = serde_json::from_str(text)
            .map_err(|e| Error::Input(format!("{source}:{}: invalid JSON array: {e}", e.line())))?;
        for (i, v) in array.into_iter().enumerate() {
            values.push((format!("{source}: element {i}"), v));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{source}:{}", i + 1);
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::Input(format!("{at}: invalid JSON: {e}")))?;
            values.push((at, v));
        }
    }
    let mut format = None;
    let mut records = Vec::with_capacity(values.len());
    for (at, value) in values {
        let Value::Object(object) = value else {
            return Err(Error::Input(format!(
                "{at}: a record must be a JSON object; {SHAPES}"
            )));
        };
        let Some(found) = Format::detect(&object) else {
            let keys: Vec<&str> = object.keys().map(String::as_str).collect();
            return Err(Error::Input(format!(
                "{at}: unknown record shape with keys {keys:?}; {SHAPES}"
            )));
        };
        let expected = *format.get_or_insert(found);
        if found != expected {
            return Err(Error::Input(format!(
                "{at}: record is {} but the file's first record is {}",
                found.name(),
                expected.name()
            )));
        }
        records.push(convert(&object, found, &at)?);
    }
    if records.is_empty() {
        return Err(Error::Input(format!("{source}: no records")));
    }
    Ok(records)
}

/// The string field `key` of `object`; `None` when absent or null.
fn opt_str(object: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::Input(format!(
            "{at}: field {key:?} must be a string, not {other}"
        ))),
    }
}

fn req_str(object: &Map<String, Value>, key: &str, at: &str) -> Result<String> {
    opt_str(object, key, at)?
        .ok_or_else(|| Error::Input(format!("{at}: missing string field {key:?}")))
}

/// The list of message objects under `key`.
fn turns<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Vec<&'a Map<String, Value>>> {
    let Some(Value::Array(items)) = object.get(key) else {
        return Err(Error::Input(format!("{at}: {key:?} must be an array")));
    };
    if items.is_empty() {
        return Err(Error::Input(format!("{at}: {key:?} is empty")));
    }
    items
        .iter()
        .enumerate()
        .map(|(j, item)| match item {
            Value::Object(m) => Ok(m),
            _ => Err(Error::Input(format!("{at}: {key}[{j}] is not an object"))),
        })
        .collect()
}

fn convert(object: &Map<String, Value>, format: Format, at: &str) -> Result<Record> {
    Ok(match format {
        Format::Text => Record::Text(req_str(object, "text", at)?),
        Format::PromptCompletion => Record::PromptCompletion {
            prompt: req_str(object, "prompt", at)?,
            completion: req_str(object, "completion", at)?,
        },
        Format::Alpaca | Format::InstructionResponse => {
            let mut user = req_str(object, "instruction", at)?;
            let answer_key = if format == Format::Alpaca {
                if let Some(input) = opt_str(object, "input", at)? {
                    if !input.is_empty() {
                        user.push_str("\n\n");
                        user.push_str(&input);
                    }
                }
                "output"
            } else {
                "response"
            };
            let answer = req_str(object, answer_key, at)?;
            Record::Chat(vec![Message::user(user), Message::assistant(answer)])
        }
        Format::Messages => Record::Chat(
            turns(object, "messages", at)?
                .into_iter()
                .map(|m| {
                    Ok(Message::new(
                        req_str(m, "role", at)?,
                        req_str(m, "content", at)?,
                    ))
                })
                .collect::<Result<_>>()?,
        ),
        Format::ShareGpt => Record::Chat(
            turns(object, "conversations", at)?
                .into_iter()
                .map(|m| {
                    let from = req_str(m, "from", at)?;
                    let role = match from.as_str() {
                        "human" | "user" => "user",
                        "gpt" | "assistant" => "assistant",
                        "system" => "system",
                        _ => {
                            return Err(Error::Input(format!(
                                "{at}: unknown sharegpt speaker {from:?} (expected human, user, \
                                 gpt, assistant or system)"
                            )))
                        }
                    };
                    Ok(Message::new(role, req_str(m, "value", at)?))
                })
                .collect::<Result<_>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_records(text, "d.jsonl").unwrap_err().to_string()
    }

    #[test]
    fn data_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let mut bytes = b"{\"text\": \"a\"}\n{\"text\": \"caf".to_vec();
        bytes.extend([0xe9, b'"', b'}', b'\n']);
        std::fs::write(&path, &bytes).unwrap();
        let e = read_records(&path).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        let want = format!(
            "{}:2: invalid UTF-8 (byte 0xe9 at byte column 14)",
            path.display()
        );
        assert!(e.to_string().contains(&want), "{e}");
        // Bad JSON and a wrong shape on line 3 (after a blank line).
        assert!(err("{\"text\": \"a\"}\n\n{\"text\": \n").contains("d.jsonl:3: invalid JSON"));
        assert!(
            err("{\"text\": \"a\"}\n\n{\"txt\": 1}\n").contains("d.jsonl:3: unknown record shape")
        );
        assert!(
            err("{\"text\": \"a\"}\n\n[1]\n").contains("d.jsonl:3: a record must be a JSON object")
        );
    }

    #[test]
    fn records_each_format() {
        let jsonl = "{\"text\": \"a\"}\n\n  \n{\"text\": \"b\", \"extra\": 1}\n";
        let r = parse_records(jsonl, "f").unwrap();
        assert_eq!(r, vec![Record::Text("a".into()), Record::Text("b".into())]);

        let pc = r#"[{"prompt": "p", "completion": "c"}]"#;
        assert_eq!(
            parse_records(pc, "f").unwrap(),
            vec![Record::PromptCompletion {
                prompt: "p".into(),
                completion: "c".into()
            }]
        );

        let alpaca = "{\"instruction\": \"i\", \"input\": \"x\", \"output\": \"o\"}\n\
                      {\"instruction\": \"j\", \"input\": \"\", \"output\": \"p\"}\n\
                      {\"instruction\": \"k\", \"output\": \"q\"}";
        let r = parse_records(alpaca, "f").unwrap();
        assert_eq!(
            r[0],
            Record::Chat(vec![Message::user("i\n\nx"), Message::assistant("o")])
        );
        assert_eq!(
            r[1],
            Record::Chat(vec![Message::user("j"), Message::assistant("p")])
        );
        assert_eq!(
            r[2],
            Record::Chat(vec![Message::user("k"), Message::assistant("q")])
        );

        let ir = r#"{"instruction": "i", "response": "r"}"#;
        assert_eq!(
            parse_records(ir, "f").unwrap(),
            vec![Record::Chat(vec![
                Message::user("i"),
                Message::assistant("r")
            ])]
        );

        let msgs = r#"  [{"messages": [{"role": "system", "content": "s"},
                        {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]"#;
        assert_eq!(
            parse_records(msgs, "f").unwrap(),
            vec![Record::Chat(vec![
                Message::system("s"),
                Message::user("u"),
                Message::assistant("a")
            ])]
        );

        let share = r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}, {"from": "user", "value": "u2"}, {"from": "assistant", "value": "a2"}]}"#;
        assert_eq!(
            parse_records(share, "f").unwrap(),
            vec![Record::Chat(vec![
                Message::system("s"),
                Message::user("u"),
                Message::assistant("a"),
                Message::user("u2"),
                Message::assistant("a2")
            ])]
        );
    }

    #[test]
    fn records_errors_name_file_and_line() {
        let e = err("{\"text\": \"a\"}\n\n{\"text\": \"b\"\n");
        assert!(e.contains("d.jsonl:3: invalid JSON"), "{e}");
        let e = err("{\"text\": \"a\"}\n{\"foo\": 1}\n");
        assert!(e.contains("d.jsonl:2: unknown record shape"), "{e}");
        let e = err("{\"text\": \"a\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n");
        assert!(e.contains("d.jsonl:2: record is prompt/completion"), "{e}");
        let e = err("{\"text\": 3}");
        assert!(
            e.contains("d.jsonl:1: field \"text\" must be a string"),
            "{e}"
        );
        let e = err("{\"conversations\": [{\"from\": \"bot\", \"value\": \"x\"}]}");
        assert!(e.contains("d.jsonl:1: unknown sharegpt speaker"), "{e}");
        let e = err("{\"messages\": []}");
        assert!(e.contains("d.jsonl:1: \"messages\" is empty"), "{e}");
        let e = err("[{\"text\": \"a\"}, {\"prompt\": \"p\", \"completion\": \"c\"}]");
        assert!(e.contains("d.jsonl: element 1: record is"), "{e}");
        let e = err("[{\"text\": \"a\"},\n {\"text\": ]");
        assert!(e.contains("d.jsonl:2: invalid JSON array"), "{e}");
        let e = err("\n\n");
        assert!(e.contains("no records"), "{e}");
        let e = err("[1]");
        assert!(
            e.contains("element 0: a record must be a JSON object"),
            "{e}"
        );
    }

    #[test]
    fn records_read_file_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, "{\"text\": \"hi\"}\n{\"text\": 1}\n").unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:2:", path.display())), "{e}");
        let e = read_records(dir.path().join("nope.jsonl")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
    }
}
