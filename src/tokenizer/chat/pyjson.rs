//! The chat templates' `tojson` filter: Python's `json.dumps`, as transformers defines it.
//!
//! minijinja's own `tojson` is jinja's HTML-safe one (`<`, `>`, `&`, `'` escaped, compact `,`
//! and `:` separators, no `ensure_ascii` or `separators`), and serde_json writes floats as `1e-5`
//! where Python writes `1e-05`; templates that put tool schemas or messages into the prompt as
//! JSON would render differently from transformers. So `json.dumps` is written here.
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};

use super::pyrepr::py_float_repr;
use super::{filter_err, MAX_DEPTH};

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// which is Python's `json.dumps` with those arguments.
pub(super) fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii = match ensure_ascii {
        Some(v) => v.is_true(),
        None => kwargs
            .get::<Option<Value>>("ensure_ascii")?
            .is_some_and(|v| v.is_true()),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_str(), v.as_i64()) {
            (Some(s), _) => Some(s.to_owned()),
            (None, Some(n)) => Some(" ".repeat(usize::try_from(n).unwrap_or(0).min(1024))),
            _ => return Err(filter_err(format!("tojson: bad indent {v}"))),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_owned(), b.to_owned()),
                    _ => return Err(filter_err("tojson: separators must be two strings")),
                },
                _ => return Err(filter_err("tojson: separators must be two strings")),
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = kwargs
        .get::<Option<Value>>("sort_keys")?
        .is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let dumper = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` over minijinja values.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn dump(
        &self,
        v: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        if level > MAX_DEPTH {
            return Err(filter_err("tojson: value nested too deeply"));
        }
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(v)?),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.dump(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    entries.push((py_key(&key)?, item));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(key, out);
                    out.push_str(&self.key_sep);
                    self.dump(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            kind => {
                return Err(filter_err(format!(
                    "tojson: object of kind {kind} is not JSON serializable"
                )))
            }
        }
        Ok(())
    }

    /// Python's `json` string escaping (`ensure_ascii` escapes everything outside ' '..'~').
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A map key as Python's json writes it (keys must be str, int, float, bool or None).
fn py_key(key: &Value) -> std::result::Result<String, minijinja::Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::Number => py_number(key),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        kind => Err(filter_err(format!(
            "tojson: keys must be str, int, float, bool or None, not {kind}"
        ))),
    }
}

fn py_number(v: &Value) -> std::result::Result<String, minijinja::Error> {
    if v.is_integer() {
        return Ok(v.to_string());
    }
    let x = f64::try_from(v.clone())?;
    Ok(json_float(x))
}

/// How `json.dumps` writes a float: its `repr`, and `NaN` / `Infinity` / `-Infinity` (not JSON,
/// but Python's default `allow_nan=True`).
fn json_float(x: f64) -> String {
    match py_float_repr(x).as_str() {
        "nan" => "NaN".into(),
        "inf" => "Infinity".into(),
        "-inf" => "-Infinity".into(),
        repr => repr.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_render as render;
    use super::*;
    use crate::tokenizer::chat::Message;

    #[test]
    fn tojson_is_python_json_dumps() {
        let m = [Message::user("hé \"q\"\n\u{1}")];
        let data = serde_json::json!({"b": [1, 2.5, true, null], "a": {}, "c": [], "s": "å<>"});
        let vars = [("x", data)];
        // json.dumps(messages[0], ensure_ascii=False)
        assert_eq!(
            render("{{ messages[0] | tojson }}", &m, &[]),
            r#"{"role": "user", "content": "hé \"q\"\n\u0001"}"#
        );
        assert_eq!(
            render(
                "{{ messages[0].content | tojson(ensure_ascii=true) }}",
                &m,
                &[]
            ),
            r#""h\u00e9 \"q\"\n\u0001""#
        );
        // serde_json maps are sorted: b, a, c, s -> a, b, c, s.
        assert_eq!(
            render("{{ x | tojson }}", &m, &vars),
            r#"{"a": {}, "b": [1, 2.5, true, null], "c": [], "s": "å<>"}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2) }}", &m, &vars),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"c\": [],\n  \"s\": \"å<>\"\n}"
        );
        assert_eq!(
            render("{{ x.b | tojson(separators=(',', ':')) }}", &m, &vars),
            "[1,2.5,true,null]"
        );
        assert_eq!(
            render("{{ '🤗' | tojson(true) }}", &m, &[]),
            r#""\ud83e\udd17""#
        );
    }

    #[test]
    fn floats_are_written_as_json_dumps_writes_them() {
        for (x, s) in [
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (0.1, "0.1"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(json_float(x), s, "{x}");
        }
    }
}
