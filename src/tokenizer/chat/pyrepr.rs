//! Python's `str()` and `repr()` of template values, which jinja2 uses to print `{{ value }}`.
//!
//! minijinja already prints `None`, `True`/`False`, integers and plain strings as Python does; it
//! differs for floats (`0.00001` for `1e-05`) and for lists and dicts, whose items Python prints
//! with `repr` (`['a', None]`, not `["a", none]`). Those are written here.
use std::fmt::Write as _;

use minijinja::value::{Value, ValueKind};
use minijinja::{ErrorKind, Output, State};

use super::{filter_err, MAX_DEPTH};

/// Writes `{{ value }}` as jinja2 does: Python's `str(value)` (lists and dicts with `repr`
/// items, `None`, `True`, floats as Python prints them).
pub(super) fn py_formatter(
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
            out.push_str(&py_float_repr(f64::try_from(value.clone())?));
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

/// Python's `float.__repr__`: the shortest round-tripping digits, positional for exponents
/// -4..=15, else `d.ddde+XX`; `nan`, `inf`, `-inf`. (minijinja prints `0.00001` and `1e16`
/// where Python prints `1e-05` and `1e+16`.)
pub(super) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
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

#[cfg(test)]
mod tests {
    use super::super::test_render as render;
    use super::*;
    use crate::tokenizer::chat::Message;

    #[test]
    fn values_print_as_python_str() {
        let m = [Message::user("  hi there  ")];
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
    }

    #[test]
    fn float_repr_is_pythons() {
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
            (f64::NAN, "nan"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(py_float_repr(x), s, "{x}");
        }
    }

    proptest::proptest! {
        #[test]
        fn float_repr_roundtrips(x: f64) {
            let s = py_float_repr(x);
            if x.is_finite() {
                let back: Result<f64, _> = s.replace("e+", "e").parse();
                proptest::prop_assert_eq!(back.ok(), Some(x));
            }
        }
    }
}
