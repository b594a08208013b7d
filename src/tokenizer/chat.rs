//! Jinja chat templates rendered with `minijinja` exactly as transformers renders them with jinja2.
//!
//! transformers' environment (`_compile_jinja_template`) is reproduced: `trim_blocks` and
//! `lstrip_blocks` on, no auto-escaping, the trailing newline of the template dropped, Python
//! string/dict methods (`.strip()`, `.items()`, ... via `minijinja-contrib`'s pycompat), a `tojson`
//! filter that is Python's `json.dumps` (not jinja's HTML-safe one), `raise_exception(msg)`,
//! `strftime_now(fmt)`, and the template variables `messages`, `tools` (none), `documents` (none),
//! `add_generation_prompt` plus the named special tokens (`bos_token`, `eos_token`, ...).
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The values templates see (`minijinja::Value`).
pub use minijinja::Value as TemplateValue;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

fn template_err(e: &minijinja::Error) -> Error {
    let mut msg = format!("chat template: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(msg, ": {cause}");
        source = cause.source();
    }
    Error::Tokenizer(msg)
}

/// transformers' `{% generation %}...{% endgeneration %}` (its AssistantTracker extension) only
/// marks assistant text for masks; when rendering text it is a plain block. minijinja does not
/// know the tag, so it becomes an always-true `if` with the same whitespace control.
fn rewrite_generation_tags(source: &str) -> String {
    static RE: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r"\{%([-+]?)\s*(generation|endgeneration)\s*([-+]?)%\}").ok()
    });
    match re {
        Some(re) if source.contains("generation") => re
            .replace_all(source, |c: &regex::Captures<'_>| {
                let tag = if &c[2] == "generation" {
                    "if true"
                } else {
                    "endif"
                };
                format!("{{%{} {tag} {}%}}", &c[1], &c[3])
            })
            .into_owned(),
        _ => source.to_owned(),
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is an [`Error::Tokenizer`].
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(py_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| template_err(&e))?;
        Ok(ChatTemplate { source, env })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (any serializable maps; [`Message`] for the common case) with
    /// `add_generation_prompt` and the extra variables `vars` (the special tokens, ...; later
    /// entries win). See [`ChatTemplate::render_values`].
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        vars: &[(&str, serde_json::Value)],
    ) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(Value::from_serialize).collect();
        let vars: Vec<(&str, Value)> = vars
            .iter()
            .map(|(k, v)| (*k, Value::from_serialize(v)))
            .collect();
        self.render_values(&messages, add_generation_prompt, &vars)
    }

    /// [`ChatTemplate::render`] over template values. Maps built with
    /// `TemplateValue::from_iter(pairs)` keep their key order (as Python dicts do, which matters
    /// for `tojson` and `.items()`), unlike `serde_json` maps, which are sorted.
    ///
    /// Messages are normalised as transformers does: top-level keys whose value is null are
    /// dropped, and a `reasoning_content` / `thinking` / `reasoning` value is copied to `thinking`
    /// and `reasoning_content`. An empty conversation, or a message that is not a map, is an
    /// [`Error::Input`]; template errors (including `raise_exception`) are [`Error::Tokenizer`].
    pub fn render_values(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        vars: &[(&str, Value)],
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Input(
                "cannot apply a chat template to an empty conversation; provide at least one \
                 message"
                    .into(),
            ));
        }
        let messages = messages
            .iter()
            .map(normalize_message)
            .collect::<Result<Vec<_>>>()?;
        let mut ctx: Vec<(Value, Value)> = vars
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect();
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(&e))?;
        template.render(ctx).map_err(|e| template_err(&e))
    }
}

const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// transformers' `_normalize_chat_messages` + `_alias_reasoning_fields` for one message.
fn normalize_message(value: &Value) -> Result<Value> {
    if value.kind() != ValueKind::Map {
        return Err(Error::Input(format!(
            "chat messages must be maps (with \"role\" and \"content\"), got {value}"
        )));
    }
    let iter = value.try_iter().map_err(|e| template_err(&e))?;
    let mut entries: Vec<(Value, Value)> = Vec::new();
    for key in iter {
        let item = value.get_item(&key).map_err(|e| template_err(&e))?;
        if !item.is_none() && !item.is_undefined() {
            entries.push((key, item));
        }
    }
    let reasoning = REASONING_FIELDS.iter().find_map(|field| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(field))
            .map(|(_, v)| v.clone())
    });
    let Some(reasoning) = reasoning else {
        return Ok(entries.into_iter().collect());
    };
    // {"thinking": r, **message, "reasoning_content": r} (dict order: first insertion wins).
    let mut out: Vec<(Value, Value)> = vec![("thinking".into(), reasoning.clone())];
    for (k, v) in entries
        .into_iter()
        .chain([("reasoning_content".into(), reasoning)])
    {
        match out.iter_mut().find(|(ok, _)| *ok == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    Ok(out.into_iter().collect())
}

/// Writes `{{ value }}` as jinja2 does: Python's `str(value)` (lists and dicts with `repr`
/// items, `None`, `True`, floats as Python prints them).
fn py_formatter(
    out: &mut Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    let mut s = String::new();
    py_str(value, false, 0, &mut s)?;
    out.write_str(&s)
        .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "writing the output failed"))
}

/// Python's `str(value)`, or `repr(value)` when `repr` is set.
fn py_str(
    value: &Value,
    repr: bool,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if level > MAX_DEPTH {
        return Err(filter_err("value nested too deeply to print"));
    }
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::String if repr => py_repr_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Number if !value.is_integer() => {
            let x = f64::try_from(value.clone())?;
            out.push_str(&match py_float_repr(x).as_str() {
                "NaN" => "nan".to_owned(),
                "Infinity" => "inf".to_owned(),
                "-Infinity" => "-inf".to_owned(),
                other => other.to_owned(),
            });
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(&item, true, level + 1, out)?;
            }
            out.push(']');
        }
        ValueKind::Map
            if value
                .as_object()
                .is_none_or(|o| o.repr() == minijinja::value::ObjectRepr::Map) =>
        {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(&key, true, level + 1, out)?;
                out.push_str(": ");
                py_str(&value.get_item(&key)?, true, level + 1, out)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`; non-printable
/// characters escaped (control, separator and format characters; unassigned code points are not
/// detected).
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let n = c as u32;
                let _ = if n < 0x100 {
                    write!(out, "\\x{n:02x}")
                } else if n < 0x10000 {
                    write!(out, "\\u{n:04x}")
                } else {
                    write!(out, "\\U{n:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character, without the unassigned code points.
fn py_printable(c: char) -> bool {
    let n = c as u32;
    !matches!(n,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad
        | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2 | 0x1680 | 0x180e
        | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f | 0x3000
        | 0xd800..=0xf8ff | 0xfeff | 0xfff9..=0xfffb | 0x110bd | 0x110cd
        | 0x13430..=0x1343f | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a | 0xe0001 | 0xe0020..=0xe007f
        | 0xf0000..=0x10ffff)
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn filter_err(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// which is Python's `json.dumps` with those arguments.
fn tojson(
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

const MAX_DEPTH: usize = 500;

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
    Ok(py_float_repr(x))
}

/// Python's `float.__repr__` (as `json.dumps` writes floats): the shortest round-tripping digits,
/// positional for exponents -4..=15, else `d.ddde+XX`.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{x:e}"); // e.g. "-1.2345e-5", "0e0"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = (exp + 1) as usize;
            if digits.len() <= int_len {
                format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                let (a, b) = digits.split_at(int_len);
                format!("{sign}{a}.{b}")
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (first, rest) = digits.split_at(1.min(n as usize));
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// transformers' `strftime_now(format)`: the current time formatted with C `strftime` codes.
/// Python uses local time; this uses UTC (no time zone database here).
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// (year, month 1..=12, day 1..=31) of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, usize, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as usize, day)
}

fn strftime_utc(format: &str, secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (tod / 3600, tod % 3600 / 60, tod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let day_of_year = {
        let mut d = day;
        for m in 1..month {
            d += match m {
                2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
        }
        d
    };
    let month_name = MONTHS[month.saturating_sub(1) % 12];
    let weekday_name = WEEKDAYS[weekday % 7];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('B') => write!(out, "{month_name}"),
            Some('b') | Some('h') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday_name}"),
            Some('a') => write!(out, "{}", &weekday_name[..3]),
            Some('u') => write!(out, "{}", weekday + 1),
            Some('w') => write!(out, "{}", (weekday + 1) % 7),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{test_tokenizer, Tokenizer};

    fn smol() -> &'static Tokenizer {
        test_tokenizer()
    }

    const DEFAULT_SYSTEM: &str =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
                                  trained by Hugging Face<|im_end|>\n";

    /// Expected strings from transformers 5.24.0 (`tests/python/tokenizer_reference.py`):
    ///
    /// ```python
    /// from transformers import AutoTokenizer
    /// tok = AutoTokenizer.from_pretrained(model_dir)   # python -m loratch.default_model
    /// tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    /// ```
    #[test]
    fn smollm2_chat_template_matches_transformers() {
        let tok = smol();
        let render = |messages: &[Message], gen: bool| match tok.apply_chat_template(messages, gen)
        {
            Ok(s) => s,
            Err(e) => panic!("{messages:?}: {e}"),
        };
        // No system message: the template inserts SmolLM2's default one.
        let q = [Message::user("What is the capital of France?")];
        let body = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
        assert_eq!(render(&q, false), format!("{DEFAULT_SYSTEM}{body}"));
        assert_eq!(
            render(&q, true),
            format!("{DEFAULT_SYSTEM}{body}<|im_start|>assistant\n")
        );
        assert_eq!(
            render(&q, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // With a system message (non-ASCII).
        let sys = [
            Message::system("You are a terse assistant. Svara på svenska."),
            Message::user("Vad heter huvudstaden i Sverige? åäö"),
        ];
        let expected =
            "<|im_start|>system\nYou are a terse assistant. Svara på svenska.<|im_end|>\n\
                        <|im_start|>user\nVad heter huvudstaden i Sverige? åäö<|im_end|>\n";
        assert_eq!(render(&sys, false), expected);
        assert_eq!(
            render(&sys, true),
            format!("{expected}<|im_start|>assistant\n")
        );
        // Multi-turn; content whitespace is kept.
        let turns = [
            Message::user("Hi!"),
            Message::assistant("Hello! How can I help?"),
            Message::user("  Tell me a joke.\n"),
        ];
        let expected = format!(
            "{DEFAULT_SYSTEM}<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello! How \
             can I help?<|im_end|>\n<|im_start|>user\n  Tell me a joke.\n<|im_end|>\n"
        );
        assert_eq!(render(&turns, false), expected);
        assert_eq!(
            render(&turns, true),
            format!("{expected}<|im_start|>assistant\n")
        );
        // An empty system message replaces the default one.
        let empty_sys = [Message::system(""), Message::user("🤗")];
        assert_eq!(
            render(&empty_sys, true),
            "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n🤗<|im_end|>\n<|im_start|>assistant\n"
        );
        // The rendered prompt tokenizes to the special-token ids.
        let ids = match tok.encode(&render(&q, true), false) {
            Ok(ids) => ids,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(ids.first(), Some(&1));
        // tok.encode("<|im_start|>assistant\n") == [1, 520, 9531, 198]
        assert_eq!(&ids[ids.len().saturating_sub(4)..], &[1, 520, 9531, 198]);
        // Empty conversations are refused, as in transformers.
        assert!(matches!(
            tok.apply_chat_template(&[], true),
            Err(Error::Input(_))
        ));
    }

    fn render(template: &str, messages: &[Message], vars: &[(&str, serde_json::Value)]) -> String {
        let t = match ChatTemplate::new(template) {
            Ok(t) => t,
            Err(e) => panic!("{template:?}: {e}"),
        };
        match t.render(messages, true, vars) {
            Ok(s) => s,
            Err(e) => panic!("{template:?}: {e}"),
        }
    }

    #[test]
    fn jinja_environment_matches_transformers() {
        let m = [Message::user("  hi there  ")];
        // trim_blocks / lstrip_blocks, trailing newline dropped, python methods, tokens.
        let t = "{{ bos_token }}\n  {% for m in messages %}\n[{{ m.content.strip() }}|{{ m['role'].upper() }}]\n  {% endfor %}\n{% if add_generation_prompt %}GEN{% endif %}\n";
        let vars = [("bos_token", serde_json::json!("<s>"))];
        assert_eq!(render(t, &m, &vars), "<s>\n[hi there|USER]\nGEN");
        // {% generation %} blocks render their body.
        let t =
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}";
        assert_eq!(render(t, &m, &[]), "  hi there  ");
        // No HTML escaping.
        assert_eq!(render("{{ '<a&b>' }}", &m, &[]), "<a&b>");
        // tools / documents are defined and none; Python-style printing of values.
        assert_eq!(
            render("{{ tools is none }}{{ documents is defined }}", &m, &[]),
            "TrueTrue"
        );
        assert_eq!(
            render(
                "{{ none }}|{{ [1, 'a', none, true, 1.5] }}|{{ {'k': 'v'} }}|{{ 2.0 }}",
                &m,
                &[]
            ),
            "None|[1, 'a', None, True, 1.5]|{'k': 'v'}|2.0"
        );
        // str() of lists / dicts uses repr() of their items.
        assert_eq!(
            render(
                "{{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'a\\\\b\\n\\x00\\xa0\\u200bé🤗', 1e-5, 0.1] }}",
                &m,
                &[]
            ),
            r#"["it's", 'say "hi"', 'both \' "', 'a\\b\n\x00\xa0\u200bé🤗', 1e-05, 0.1]"#
        );
        assert_eq!(
            render("{{ messages }}", &m, &[]),
            "[{'role': 'user', 'content': '  hi there  '}]"
        );
        assert_eq!(
            render("{{ 1e-5 }}|{{ x }}", &m, &[("x", serde_json::json!(3))]),
            "1e-05|3"
        );
        // namespace() and loop controls.
        let t = "{% set ns = namespace(n=0) %}{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}";
        assert_eq!(render(t, &m, &[]), "3");
    }

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
        for (x, s) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (-2.5e300, "-2.5e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(py_float_repr(x), s, "{x}");
        }
    }

    #[test]
    fn errors_are_typed_not_panics() {
        let m = [Message::user("x")];
        for bad in ["{% for %}", "{{ ", "{% endif %}", "{% generation %}"] {
            assert!(
                matches!(ChatTemplate::new(bad), Err(Error::Tokenizer(_))),
                "{bad:?}"
            );
        }
        let t = match ChatTemplate::new("{{ raise_exception('Only user and assistant roles!') }}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        match t.render(&m, false, &[]) {
            Err(Error::Tokenizer(msg)) => {
                assert!(msg.contains("Only user and assistant roles!"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "{{ messages[0].content.nosuchmethod() }}",
            "{{ messages | tojson(bogus=1) }}",
            "{{ 1 + 'a' }}",
            "{{ undefined_thing.attr }}",
        ] {
            let t = match ChatTemplate::new(bad) {
                Ok(t) => t,
                Err(e) => panic!("{bad:?}: {e}"),
            };
            assert!(
                matches!(t.render(&m, false, &[]), Err(Error::Tokenizer(_))),
                "{bad:?}"
            );
        }
        // Messages must be maps.
        let t = match ChatTemplate::new("{{ messages }}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(t.render(&["a"], false, &[]), Err(Error::Input(_))));
    }

    #[test]
    fn messages_are_normalised_like_transformers() {
        let t = match ChatTemplate::new("{{ messages[0] | tojson }}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        #[derive(Serialize)]
        struct M {
            role: &'static str,
            content: Option<&'static str>,
            reasoning: Option<&'static str>,
        }
        let msg = [M {
            role: "assistant",
            content: None,
            reasoning: Some("think"),
        }];
        // {"thinking": r, **{"role": ..., "reasoning": r}, "reasoning_content": r}
        assert_eq!(
            t.render(&msg, false, &[]).ok().as_deref(),
            Some(
                r#"{"thinking": "think", "role": "assistant", "reasoning": "think", "reasoning_content": "think"}"#
            )
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Arbitrary template text and messages give Ok or a typed error, never a panic.
        #[test]
        fn arbitrary_templates_never_panic(
            source in "([{}%#()\\[\\]|.,'\"~+*/=!<> -]|if|for|in|endif|endfor|set|messages|m|content|tojson|strip|loop|raise_exception|namespace|\\PC)*",
            content in "\\PC*",
            gen: bool,
        ) {
            if let Ok(t) = ChatTemplate::new(source) {
                let r = t.render(&[Message::user(content)], gen, &[]);
                proptest::prop_assert!(matches!(r, Ok(_) | Err(Error::Tokenizer(_))));
            }
        }

        #[test]
        fn strftime_never_panics(format in "(%.|\\PC)*", secs in 0u64..u64::MAX) {
            let _ = strftime_utc(&format, secs);
        }

        #[test]
        fn float_repr_roundtrips(x: f64) {
            let s = py_float_repr(x);
            if x.is_finite() {
                let back: Result<f64, _> = s.replace("e+", "e").parse();
                proptest::prop_assert_eq!(back.ok(), Some(x));
            }
        }
    }

    #[test]
    fn strftime_formats_utc() {
        // datetime.fromtimestamp(1722085509, UTC).strftime(...): 2024-07-27 13:05:09, a Saturday.
        let secs = 1_722_085_509;
        assert_eq!(
            strftime_utc("%d %b %Y|%B %A %a|%H:%M:%S %I%p|%j %y %m %% %F %T %Q", secs),
            "27 Jul 2024|July Saturday Sat|13:05:09 01PM|209 24 07 % 2024-07-27 13:05:09 %Q"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%F %j", 951_782_400), "2000-02-29 060");
        assert!(!strftime_now("%Y".into()).is_empty());
    }
}
