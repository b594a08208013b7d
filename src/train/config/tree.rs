//! A configuration's text (TOML, YAML or JSON) as one value tree, with the aliases and the
//! `key=value` overrides applied and unknown keys refused (with a "did you mean"), ready for
//! the serde structs: one schema whatever the format.
use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::aliases::{display_key, map_key, ALIASES};
use super::{LORA_KEYS, TOP_KEYS, TRAINING_KEYS};
use crate::error::{Error, Result};
use crate::io::json::{kind_name, Words};

/// A configuration file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
    Json,
}

impl Format {
    /// By extension: `.yaml`/`.yml` YAML, `.json` JSON, anything else TOML.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                Format::Yaml
            }
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Toml,
        }
    }
}

/// loratch's own keys of `section` (None: the top level; empty for a section loratch lacks).
pub fn own_keys(section: Option<&str>) -> Vec<&'static str> {
    match section {
        None => TOP_KEYS.to_vec(),
        Some("lora") => LORA_KEYS.to_vec(),
        Some("training") => TRAINING_KEYS.to_vec(),
        Some(_) => Vec::new(),
    }
}

/// Parses `text` into a value tree; `source` names it in errors.
pub fn parse(text: &str, format: Format, source: &str) -> Result<Value> {
    let err = |e: &dyn std::fmt::Display| Error::Config(format!("{source}: {e}"));
    match format {
        Format::Toml => {
            let table: toml::Table = toml::from_str(text).map_err(|e| err(&e))?;
            serde_json::to_value(table).map_err(|e| err(&e))
        }
        Format::Yaml => serde_norway::from_str(text).map_err(|e| err(&e)),
        Format::Json => serde_json::from_str(text).map_err(|e| err(&e)),
    }
}

/// The tree being built: loratch's keys only, and for each the key the user wrote.
struct Builder<'a> {
    out: Map<String, Value>,
    written: HashMap<(Option<&'static str>, &'static str), String>,
    notes: Vec<String>,
    source: &'a str,
}

impl Builder<'_> {
    /// Puts the user's `key` (in `section`) where loratch reads it. `replace`: an override,
    /// which wins over the file; otherwise two names for one key are an error.
    fn place(
        &mut self,
        section: Option<&str>,
        key: &str,
        value: Value,
        replace: bool,
    ) -> Result<()> {
        let source = self.source;
        let written = match section {
            Some(s) => format!("{s}.{key}"),
            None => key.to_string(),
        };
        let mapped = map_key(section, key, value, &own_keys)
            .map_err(|e| Error::Config(format!("{source}: {}", strip(e))))?
            .ok_or_else(|| unknown_key(source, section, key))?;
        if let Some(note) = mapped.note {
            self.notes.push(note);
        }
        let slot = (mapped.section, mapped.key);
        if !replace {
            if let Some(first) = self.written.get(&slot) {
                return Err(Error::Config(format!(
                    "{source}: {first:?} and {written:?} both set loratch's {}; keep one",
                    display_key(mapped.section, mapped.key)
                )));
            }
        }
        self.written.insert(slot, written);
        let target = match mapped.section {
            None => &mut self.out,
            Some(s) => {
                let entry = self
                    .out
                    .entry(s.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                entry.as_object_mut().ok_or_else(|| {
                    Error::Config(format!("{source}: {s} must be a table of keys"))
                })?
            }
        };
        target.insert(mapped.key.to_string(), mapped.value);
        Ok(())
    }
}

/// The message of a config error, without its "config error: " prefix.
fn strip(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

/// Applies the aliases to `tree`, then the `overrides` (`key=value` or `section.key=value`,
/// the value in TOML syntax, a bare word taken as a string). Returns loratch's tree and the
/// aliases' notes.
pub fn normalize(tree: Value, overrides: &[String], source: &str) -> Result<(Value, Vec<String>)> {
    let Value::Object(root) = tree else {
        return Err(Error::Config(format!(
            "{source}: expected a table of keys, got {}",
            kind_name(&tree, Words::Toml)
        )));
    };
    let mut b = Builder {
        out: Map::new(),
        written: HashMap::new(),
        notes: Vec::new(),
        source,
    };
    for (key, value) in root {
        match (key.as_str(), value) {
            (section @ ("lora" | "training"), Value::Object(keys)) => {
                b.out
                    .entry(section.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                for (k, v) in keys {
                    b.place(Some(section), &k, v, false)?;
                }
            }
            // An empty YAML section (`training:` with every key commented out).
            ("lora" | "training", Value::Null) => {}
            (_, value) => b.place(None, &key, value, false)?,
        }
    }
    for o in overrides {
        let (path, value) = parse_override(o)?;
        let (section, key) = match path.split_once('.') {
            Some((s, k)) => (Some(s), k),
            None => (None, path.as_str()),
        };
        b.place(section, key, value, true)
            .map_err(|e| Error::Config(format!("override {o:?}: {}", strip(e))))?;
    }
    Ok((Value::Object(b.out), b.notes))
}

/// `path=value` into the path and the value (TOML syntax; otherwise a bare string).
fn parse_override(assignment: &str) -> Result<(String, Value)> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| {
        Error::Config(format!(
            "override {assignment:?}: expected key=value or section.key=value"
        ))
    })?;
    let (path, raw) = (path.trim(), raw.trim());
    if path.split('.').any(str::is_empty) || path.split('.').count() > 2 {
        return Err(Error::Config(format!(
            "override {assignment:?}: the key must be `key` or `section.key`"
        )));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or_else(|| Value::String(raw.to_string()));
    Ok((path.to_string(), value))
}

/// An unknown key's error: the closest known name, or the key's right section, or the list.
fn unknown_key(source: &str, section: Option<&str>, key: &str) -> Error {
    let at = match section {
        Some(s) => format!("{s}: "),
        None => String::new(),
    };
    let elsewhere = [None, Some("lora"), Some("training")]
        .into_iter()
        .filter(|s| *s != section)
        .find(|s| own_keys(*s).contains(&key));
    let hint = if let Some(s) = elsewhere {
        let place = s.map_or("top-level".to_string(), |s| format!("[{s}]"));
        format!("; it is a {place} key")
    } else {
        let mut names = own_keys(section);
        names.extend(
            ALIASES
                .iter()
                .filter(|a| section.is_none() || section == a.section)
                .map(|a| a.name),
        );
        if section.is_none() {
            names.extend(own_keys(Some("training")));
        }
        let best = names
            .iter()
            .map(|n| (strsim::normalized_damerau_levenshtein(key, n), *n))
            .filter(|(score, _)| *score >= 0.7)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((_, name)) => format!("; did you mean `{name}`?"),
            None => format!("; expected one of: {}", own_keys(section).join(", ")),
        }
    };
    Error::Config(format!("{source}: {at}unknown field `{key}`{hint}"))
}
