//! Which modules got adapters, layer by layer: the one line printed when adapters are laid on a
//! model (`LoRA on 30 layers x [q_proj k_proj v_proj o_proj] (120 modules)`), and the warning
//! when a target matched some decoder layers only (a regex written for `layers.0` alone, a
//! hybrid model whose layers differ), which would otherwise show only in the results.
use std::collections::{BTreeMap, BTreeSet};

use crate::lora::targets::layer_index;

/// The adapted modules of a model, grouped by decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// Every layer index of the model.
    layers: BTreeSet<i64>,
    /// For each short module name (`q_proj`, `mlp.down_proj`'s `down_proj`), the layers that
    /// have such a module, and those of them that got an adapter.
    modules: BTreeMap<String, (BTreeSet<i64>, BTreeSet<i64>)>,
    /// Adapted paths outside the decoder layers (`lm_head`).
    other: Vec<String>,
    /// The number of adapted modules.
    adapted: usize,
}

/// A path's last segment.
fn short(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// `0-1, 4, 6-29`: sorted indices as ranges.
fn ranges(indices: &BTreeSet<i64>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut it = indices.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap_or(end);
        }
        parts.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(", ")
}

impl Coverage {
    /// From the model's linear module paths and those that got adapters.
    pub fn new<'a>(paths: impl IntoIterator<Item = (&'a str, bool)>) -> Self {
        let mut c = Coverage {
            layers: BTreeSet::new(),
            modules: BTreeMap::new(),
            other: Vec::new(),
            adapted: 0,
        };
        for (path, adapted) in paths {
            c.adapted += usize::from(adapted);
            match layer_index(path) {
                Some(i) => {
                    c.layers.insert(i);
                    let (has, got) = c.modules.entry(short(path).to_owned()).or_default();
                    has.insert(i);
                    if adapted {
                        got.insert(i);
                    }
                }
                None if adapted => c.other.push(path.to_owned()),
                None => {}
            }
        }
        c
    }

    /// The number of adapted modules.
    pub fn adapted(&self) -> usize {
        self.adapted
    }

    /// One line: how many layers got adapters, which modules, how many in all.
    pub fn summary(&self) -> String {
        let adapted: BTreeSet<i64> = self
            .modules
            .values()
            .flat_map(|(_, got)| got)
            .copied()
            .collect();
        let names: Vec<&str> = self
            .modules
            .iter()
            .filter(|(_, (_, got))| !got.is_empty())
            .map(|(n, _)| n.as_str())
            .collect();
        let layers = if adapted.len() == self.layers.len() {
            format!("{} layers", adapted.len())
        } else {
            format!("{} of {} layers", adapted.len(), self.layers.len())
        };
        let mut line = format!("LoRA on {layers} x [{}]", names.join(" "));
        for p in &self.other {
            line += &format!(" + {p}");
        }
        line + &format!(" ({} modules)", self.adapted)
    }

    /// The targets that matched only some of the layers that have them: a short module name
    /// and the layers without an adapter on it.
    pub fn partial(&self) -> Vec<(String, BTreeSet<i64>)> {
        self.modules
            .iter()
            .filter(|(_, (_, got))| !got.is_empty())
            .filter_map(|(name, (has, got))| {
                let missing: BTreeSet<i64> = has.difference(got).copied().collect();
                (!missing.is_empty()).then(|| (name.clone(), missing))
            })
            .collect()
    }

    /// The warning for [`Coverage::partial`], if any target matched only some layers.
    pub fn warning(&self) -> Option<String> {
        let parts: Vec<String> = self
            .partial()
            .into_iter()
            .map(|(name, missing)| {
                let n = self.modules[&name].0.len();
                format!(
                    "{name} in {} of {n} layers (not in layers {})",
                    n - missing.len(),
                    ranges(&missing)
                )
            })
            .collect();
        (!parts.is_empty()).then(|| {
            format!(
                "target_modules matched only some layers: {}; pass a list of module names (or \
                 \"all-linear\") to adapt every layer",
                parts.join("; ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(n: i64) -> Vec<String> {
        let mut v = Vec::new();
        for i in 0..n {
            for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                v.push(format!("model.layers.{i}.{m}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    #[test]
    fn full_match_summarises_without_warning() {
        let p = paths(30);
        let c = Coverage::new(p.iter().map(|s| (s.as_str(), s.contains("_attn"))));
        assert_eq!(
            c.summary(),
            "LoRA on 30 layers x [q_proj v_proj] (60 modules)"
        );
        assert!(c.partial().is_empty());
        assert_eq!(c.warning(), None);
    }

    #[test]
    fn partial_match_names_the_layers_without() {
        let p = paths(30);
        let c = Coverage::new(p.iter().map(|s| {
            let low = s.starts_with("model.layers.0.") || s.starts_with("model.layers.1.");
            (
                s.as_str(),
                (low && s.ends_with("q_proj")) || s.ends_with("v_proj") || s == "lm_head",
            )
        }));
        assert_eq!(
            c.summary(),
            "LoRA on 30 layers x [q_proj v_proj] + lm_head (33 modules)"
        );
        let w = c.warning().unwrap();
        assert!(
            w.contains("q_proj in 2 of 30 layers (not in layers 2-29)"),
            "{w}"
        );
        assert!(!w.contains("v_proj"), "{w}");
        let only_low = Coverage::new(
            p.iter()
                .map(|s| (s.as_str(), s.starts_with("model.layers.3."))),
        );
        assert!(only_low.summary().starts_with("LoRA on 1 of 30 layers"));
        assert_eq!(
            ranges(&[0, 1, 4, 6, 7, 8].into_iter().collect()),
            "0-1, 4, 6-8"
        );
    }
}
