//! How adapters are laid on a model: which modules, with which rank and alpha (PEFT's
//! `LoraConfig` fields that loratch honours). `adapter_config.json` is this spec on disk
//! (see [`peft_config`](super::peft_config)).
use super::targets::{layer_index, pattern_value, Targets};
use super::LoraConfig;
use crate::error::{Error, Result};

/// How adapters are laid on a model (PEFT's `LoraConfig` fields that loratch honours).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: Targets,
    /// `layers_to_transform`: only these decoder layers (None = all).
    pub layers: Option<Vec<i64>>,
    /// Per-module rank overrides `{regex: rank}` (first match wins).
    pub rank_pattern: Vec<(String, i64)>,
    /// Per-module alpha overrides `{regex: alpha}`.
    pub alpha_pattern: Vec<(String, f64)>,
}

impl LoraSpec {
    /// A spec with one rank and alpha for every target.
    pub fn simple(rank: i64, alpha: f64, targets: Targets) -> Self {
        Self {
            rank,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            targets,
            layers: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
        }
    }

    /// The adapter config of module `path` (patterns applied), validated.
    pub fn config_for(&self, path: &str) -> Result<LoraConfig> {
        let rank = pattern_value(&self.rank_pattern, path)?.unwrap_or(self.rank);
        let alpha = pattern_value(&self.alpha_pattern, path)?.unwrap_or(self.alpha);
        LoraConfig::new(rank, alpha, self.dropout, self.use_rslora)
    }

    /// The module paths this spec adapts, in model order.
    pub fn select(&self, paths: &[String]) -> Result<Vec<String>> {
        let mut chosen = self.targets.select(paths)?;
        if let Some(layers) = &self.layers {
            chosen.retain(|p| layer_index(p).is_some_and(|i| layers.contains(&i)));
            if chosen.is_empty() {
                return Err(Error::Config(format!("layers {layers:?} select no module")));
            }
        }
        Ok(chosen)
    }
}
