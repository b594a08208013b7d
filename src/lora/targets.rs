//! Which modules get adapters, with PEFT's rules: a list of names matches a module path equal to
//! a name or ending in `.name`; a single string is a regex that must match the whole path;
//! `"all-linear"` is every linear layer but the output head. `rank_pattern` / `alpha_pattern`
//! keys match a path's suffix after a dot.
use crate::error::{Error, Result};
use regex::Regex;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// `target_modules`.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Short names or full paths, matched exactly or as a `.`-suffix.
    Names(Vec<String>),
    /// Every linear layer except `lm_head`.
    AllLinear,
    /// A regex that must match the whole module path.
    Regex(String),
}

impl Targets {
    /// From PEFT's JSON form: a list of names, "all-linear", or a regex string. Errors name
    /// `target_modules` (and the entry, `target_modules[1]`).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let at = match e.path().to_string() {
                root if root == "." => String::new(),
                index => index,
            };
            Error::Config(format!("target_modules{at}: {}", e.inner()))
        })
    }

    /// A single string: `"all-linear"` or a regex, which must compile.
    fn from_str(s: &str) -> Result<Self> {
        if s == "all-linear" {
            return Ok(Self::AllLinear);
        }
        Regex::new(&format!("^(?:{s})$"))
            .map_err(|e| Error::Config(format!("regex {s:?} is invalid: {e}")))?;
        Ok(Self::Regex(s.to_owned()))
    }

    /// The paths among `paths` (module paths of the model, `lm_head` included) that this selects.
    /// A name or regex that selects nothing is an error listing the valid short names.
    pub fn select(&self, paths: &[String]) -> Result<Vec<String>> {
        let valid = || {
            let mut short: Vec<&str> = paths
                .iter()
                .filter(|p| *p != "lm_head")
                .map(|p| p.rsplit('.').next().unwrap_or(p))
                .collect();
            short.sort();
            short.dedup();
            short.join(", ")
        };
        match self {
            Self::AllLinear => Ok(paths.iter().filter(|p| *p != "lm_head").cloned().collect()),
            Self::Regex(r) => {
                let re = Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                    Error::Config(format!("target_modules regex {r:?} is invalid: {e}"))
                })?;
                let hit: Vec<String> = paths.iter().filter(|p| re.is_match(p)).cloned().collect();
                if hit.is_empty() {
                    return Err(Error::Config(format!(
                        "target_modules regex {r:?} matches no module; valid module names: {}",
                        valid()
                    )));
                }
                Ok(hit)
            }
            Self::Names(names) => {
                if names.is_empty() {
                    return Err(Error::Config(format!(
                        "target_modules is empty; valid module names: {}",
                        valid()
                    )));
                }
                for n in names {
                    if !paths.iter().any(|p| suffix_match(p, n)) {
                        return Err(Error::Config(format!(
                            "unknown target module {n:?}; valid module names: {}",
                            valid()
                        )));
                    }
                }
                Ok(paths
                    .iter()
                    .filter(|p| names.iter().any(|n| suffix_match(p, n)))
                    .cloned()
                    .collect())
            }
        }
    }
}

/// PEFT's JSON form: a list of names, `"all-linear"`, or a regex string.
impl Serialize for Targets {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Names(n) => n.serialize(s),
            Self::AllLinear => s.serialize_str("all-linear"),
            Self::Regex(r) => s.serialize_str(r),
        }
    }
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Form;
        impl<'de> Visitor<'de> for Form {
            type Value = Targets;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of module names, \"all-linear\" or a regex string")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Targets, E> {
                Targets::from_str(s).map_err(|e| match e {
                    Error::Config(m) => E::custom(m),
                    other => E::custom(other),
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Targets, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(Targets::Names(names))
            }
        }
        d.deserialize_any(Form)
    }
}

/// `path == name` or `path` ends with `.name`.
fn suffix_match(path: &str, name: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

/// The value of the first pattern whose regex matches `path` as PEFT does
/// (`re.match(rf"(.*\.)?({key})$", path)`), if any.
pub fn pattern_value<T: Copy>(patterns: &[(String, T)], path: &str) -> Result<Option<T>> {
    for (key, value) in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map_err(|e| Error::Config(format!("pattern {key:?} is not a valid regex: {e}")))?;
        if re.is_match(path) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// The decoder layer index in a path `model.layers.{i}.…`.
pub fn layer_index(path: &str) -> Option<i64> {
    let rest = path.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<String> {
        let mut v = Vec::new();
        for i in 0..2 {
            for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                v.push(format!("model.layers.{i}.{m}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    #[test]
    fn names_regex_and_all_linear() {
        let p = paths();
        assert_eq!(
            Targets::Names(vec!["q_proj".into()])
                .select(&p)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            Targets::Names(vec!["model.layers.1.mlp.down_proj".into()])
                .select(&p)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(Targets::AllLinear.select(&p).unwrap().len(), 6);
        let re = Targets::Regex(r".*\.0\.self_attn\.(q|v)_proj".into());
        assert_eq!(
            re.select(&p).unwrap(),
            vec![
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj"
            ]
        );
    }

    #[test]
    fn json_form_round_trips_and_errors_name_the_entry() {
        use serde_json::json;
        for t in [
            Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
            Targets::AllLinear,
            Targets::Regex(r".*\.q_proj".into()),
        ] {
            let v = serde_json::to_value(&t).unwrap();
            assert_eq!(Targets::from_json(&v).unwrap(), t);
        }
        assert_eq!(
            serde_json::to_value(Targets::AllLinear).unwrap(),
            json!("all-linear")
        );
        for (v, want) in [
            (
                json!(5),
                "target_modules: invalid type: integer `5`, expected a list of module names",
            ),
            (
                json!(["q", 1]),
                "target_modules[1]: invalid type: integer `1`, expected a string",
            ),
            (json!("("), "target_modules: regex \"(\" is invalid"),
        ] {
            let err = Targets::from_json(&v).unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains(want)),
                "{v}: {err:?} lacks {want:?}"
            );
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = Targets::Names(vec!["qproj".into()])
            .select(&paths())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("qproj") && err.contains("down_proj, q_proj, v_proj"),
            "{err}"
        );
    }

    #[test]
    fn patterns_match_suffixes() {
        let pats = vec![
            ("down_proj".to_string(), 4),
            (r"layers\.0\.self_attn\.q_proj".to_string(), 8),
        ];
        assert_eq!(
            pattern_value(&pats, "model.layers.1.mlp.down_proj").unwrap(),
            Some(4)
        );
        assert_eq!(
            pattern_value(&pats, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(8)
        );
        assert_eq!(
            pattern_value(&pats, "model.layers.1.self_attn.q_proj").unwrap(),
            None
        );
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
    }
}
