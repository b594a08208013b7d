//! The trainer's configuration: a TOML file (`loratch train --config`) or a Python dict
//! (`loratch.train`), the same structure either way. Unknown keys are errors, so a typo never
//! passes silently; `--set section.key=value` overrides apply before validation.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::loader::Packing;
use crate::error::{Error, Result};
use crate::io::json::{kind_name, Words};
use crate::lora::targets::Targets;
use crate::train::schedule::ScheduleKind;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model: a Hugging Face directory (config.json, safetensors, tokenizer.json) or a GGUF
    /// file.
    pub model: PathBuf,
    /// How the frozen base is held: absent = as stored, "none" = float, "q8_0" / "q4_0" / "nf4" =
    /// quantized on load (see [`crate::model::Quantize`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    /// The training data: a JSON array or JSONL file of records.
    pub data: PathBuf,
    /// Held-out data; without it `validation_split` of `data` is held out.
    #[serde(default)]
    pub validation_data: Option<PathBuf>,
    /// The fraction of `data` held out when `validation_data` is not given (0 = none).
    #[serde(default = "default_validation_split")]
    pub validation_split: f64,
    /// Where checkpoints, the final adapter, `metrics.jsonl` and the plot go.
    pub output_dir: PathBuf,
    /// Seeds adapter initialisation, shuffling, the split and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub training: TrainingSection,
}

/// `[lora]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub rank: i64,
    pub alpha: f64,
    /// A list of module names, `"all-linear"`, or a regex (PEFT's rules).
    pub target_modules: serde_json::Value,
    pub dropout: f64,
    pub use_rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            target_modules: serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"]),
            dropout: 0.05,
            use_rslora: false,
        }
    }
}

/// `[training]`: the spec's keys (same defaults) plus `max_steps`, `packing`,
/// `train_on_inputs`, `dtype`, `max_nonfinite_steps`, `overwrite_output_dir` and
/// `gradient_checkpointing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub num_epochs: u64,
    /// Rows per micro-batch with `packing = true` ("rows": a row holds several examples);
    /// examples per micro-batch with `packing = false` or `"examples"`.
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_seq_length: usize,
    /// Log every this many optimizer steps.
    pub logging_steps: u64,
    /// Checkpoint every this many optimizer steps (0 = only at the end).
    pub save_steps: u64,
    /// Evaluate every this many optimizer steps (0 = only at the start and the end).
    pub eval_steps: u64,
    pub warmup_steps: u64,
    /// Clip the gradient norm to this (0 = no clipping; the norm is still logged).
    pub max_grad_norm: f64,
    pub scheduler_type: String,
    pub min_lr: f64,
    pub device: String,
    /// Stop after this many optimizer steps (overrides `num_epochs`).
    pub max_steps: Option<u64>,
    /// Several examples per row (block-diagonal attention, per-example positions): `true` or
    /// `"rows"` (batch_size full rows), `"examples"` (batch_size examples, padding-free), `false`.
    pub packing: Packing,
    /// Train on prompt tokens too (default: only on completions / assistant turns).
    pub train_on_inputs: bool,
    /// The model's dtype: float32, bfloat16 or float16 (adapters and optimizer state stay fp32).
    pub dtype: String,
    /// Abort after this many optimizer steps in a row with a non-finite loss or gradient.
    pub max_nonfinite_steps: u32,
    /// A fresh run (no resume) into an `output_dir` that holds checkpoints of an earlier run
    /// deletes them (and its final adapter) when true; when false (the default) it is an error,
    /// so a later resume can never pick up the other run's checkpoints.
    pub overwrite_output_dir: bool,
    /// Activation checkpointing: each decoder layer keeps only its input for the backward and
    /// runs again there (about one more forward of compute for most of the activations' memory;
    /// losses and gradients unchanged).
    pub gradient_checkpointing: bool,

    // Outputs where tools look (checked by `TrainConfig::validate_outputs`).
    /// Keep at most this many checkpoints, deleting the oldest (never the best one, nor the one
    /// the run resumed from); none = keep all (Hugging Face's `save_total_limit`).
    pub save_total_limit: Option<u64>,
    /// Make the final adapter the best checkpoint's (lowest validation loss) instead of the last
    /// step's (Hugging Face's `load_best_model_at_end`).
    pub load_best_at_end: bool,
    /// Where metrics go besides `metrics.jsonl`: `["tensorboard"]` writes event files into
    /// `output_dir/runs/`; `[]` or `["none"]` nothing more.
    pub report_to: Vec<String>,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            weight_decay: 0.01,
            num_epochs: 3,
            batch_size: 1,
            gradient_accumulation_steps: 4,
            max_seq_length: 256,
            logging_steps: 10,
            save_steps: 100,
            eval_steps: 50,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            scheduler_type: "linear_warmup_cosine".into(),
            min_lr: 1e-6,
            device: "cpu".into(),
            max_steps: None,
            packing: Packing::Rows,
            train_on_inputs: false,
            dtype: "float32".into(),
            max_nonfinite_steps: 3,
            overwrite_output_dir: false,
            gradient_checkpointing: false,
            save_total_limit: None,
            load_best_at_end: false,
            report_to: Vec::new(),
        }
    }
}

fn default_validation_split() -> f64 {
    0.1
}

fn default_seed() -> u64 {
    42
}

fn config_error(source: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{source}: {e}"))
}

/// A deserialisation error with the path of the key it is about (`training.batch_size: ...`).
fn keyed_error<E: std::fmt::Display>(source: &str, e: serde_path_to_error::Error<E>) -> Error {
    let path = e.path().to_string();
    if path == "." {
        config_error(source, e.inner())
    } else {
        Error::Config(format!("{source}: {path}: {}", e.inner()))
    }
}

impl TrainConfig {
    /// Reads a TOML file and applies `overrides` (`section.key=value`, the value in TOML syntax;
    /// a bare word is taken as a string).
    pub fn from_toml_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, overrides, &path.display().to_string())
    }

    /// As [`from_toml_file`](Self::from_toml_file) from TOML text; `source` names it in errors.
    pub fn from_toml_str(text: &str, overrides: &[String], source: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| config_error(source, e))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let config: Self = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| keyed_error(source, e))?;
        config.validate()?;
        Ok(config)
    }

    /// From JSON text (what `loratch.train(dict)` passes). Errors name the key
    /// (`training.batch_size`), never a line and column of text the caller did not write.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| config_error("training config", e))?;
        if !value.is_object() {
            return Err(Error::Config(format!(
                "training config: expected a table of keys, got {}",
                kind_name(&value, Words::Toml)
            )));
        }
        let config: Self = serde_path_to_error::deserialize(value)
            .map_err(|e| keyed_error("training config", e))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as JSON (saved in every checkpoint).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The adapters' targets.
    pub fn targets(&self) -> Result<Targets> {
        Targets::from_json(&self.lora.target_modules)
    }

    /// Checks every value that the sections' types do not.
    pub fn validate(&self) -> Result<()> {
        let t = &self.training;
        let bad = |msg: String| Err(Error::Config(msg));
        if self.lora.rank <= 0 {
            return bad(format!("lora.rank must be > 0, got {}", self.lora.rank));
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return bad(format!("lora.alpha must be > 0, got {}", self.lora.alpha));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad(format!(
                "lora.dropout must be in [0, 1), got {}",
                self.lora.dropout
            ));
        }
        self.targets()?;
        if !(0.0..1.0).contains(&self.validation_split) {
            return bad(format!(
                "validation_split must be in [0, 1), got {}",
                self.validation_split
            ));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad(format!(
                "training.learning_rate must be > 0, got {}",
                t.learning_rate
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(format!(
                "training.weight_decay must be >= 0, got {}",
                t.weight_decay
            ));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return bad(format!(
                "training.max_grad_norm must be >= 0, got {}",
                t.max_grad_norm
            ));
        }
        for (name, v) in [
            ("batch_size", t.batch_size),
            ("gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("max_seq_length", t.max_seq_length),
        ] {
            if v == 0 {
                return bad(format!("training.{name} must be > 0"));
            }
        }
        if t.logging_steps == 0 {
            return bad("training.logging_steps must be > 0".into());
        }
        if t.max_nonfinite_steps == 0 {
            return bad("training.max_nonfinite_steps must be > 0".into());
        }
        if t.max_steps == Some(0) || (t.max_steps.is_none() && t.num_epochs == 0) {
            return bad("nothing to train: training.num_epochs or training.max_steps is 0".into());
        }
        ScheduleKind::from_name(&t.scheduler_type)?;
        crate::device::parse_device(&t.device)?;
        crate::device::parse_dtype(&t.dtype)?;
        crate::model::Quantize::parse(self.quantize.as_deref())?;
        Ok(())
    }
}

impl TrainConfig {
    /// Checks the output keys (`save_total_limit`, `load_best_at_end`, `report_to`).
    pub fn validate_outputs(&self) -> Result<()> {
        let t = &self.training;
        if t.save_total_limit == Some(0) {
            return Err(Error::Config(
                "training.save_total_limit must be >= 1 (leave it out to keep every checkpoint)"
                    .into(),
            ));
        }
        if t.load_best_at_end && self.validation_data.is_none() && self.validation_split == 0.0 {
            return Err(Error::Config(
                "training.load_best_at_end needs a validation loss: set validation_data or \
                 validation_split > 0"
                    .into(),
            ));
        }
        crate::train::tensorboard::wants_tensorboard(&t.report_to)?;
        Ok(())
    }
}

/// Sets `section.key` (or a top-level `key`) in `table` from `assignment` = `path=value`.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| {
        Error::Config(format!("--set {assignment:?}: expected section.key=value"))
    })?;
    let path = path.trim();
    let raw = raw.trim();
    // TOML syntax (numbers, booleans, quoted strings, arrays); otherwise a bare string.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) || keys.len() > 2 {
        return Err(Error::Config(format!(
            "--set {assignment:?}: the key must be `key` or `section.key`"
        )));
    }
    let mut target = table;
    for section in &keys[..keys.len() - 1] {
        let entry = target
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        target = entry.as_table_mut().ok_or_else(|| {
            Error::Config(format!("--set {assignment:?}: {section} is not a section"))
        })?;
    }
    target.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "model = \"m\"\ndata = \"d.jsonl\"\noutput_dir = \"out\"\n";

    #[test]
    fn defaults_follow_the_spec() {
        let c = TrainConfig::from_toml_str(BASE, &[], "t").unwrap();
        assert_eq!(c.training.learning_rate, 2e-4);
        assert_eq!(c.training.gradient_accumulation_steps, 4);
        assert_eq!(c.training.scheduler_type, "linear_warmup_cosine");
        assert_eq!(c.lora.rank, 16);
        assert_eq!(c.seed, 42);
    }

    #[test]
    fn unknown_keys_are_errors() {
        for text in [
            format!("{BASE}learning_rat = 1.0\n"),
            format!("{BASE}[training]\nlearning_rat = 1.0\n"),
            format!("{BASE}[lora]\nrnak = 4\n"),
            format!("{BASE}[optimizer]\nlr = 4\n"),
        ] {
            let e = TrainConfig::from_toml_str(&text, &[], "t").unwrap_err();
            assert!(e.to_string().contains("unknown"), "{e}");
        }
        let e = TrainConfig::from_json_str(
            r#"{"model": "m", "data": "d", "output_dir": "o", "training": {"lr": 1}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `lr`"), "{e}");
    }

    #[test]
    fn overrides_apply_before_validation() {
        let c = TrainConfig::from_toml_str(
            BASE,
            &[
                "training.learning_rate=1e-3".into(),
                "training.packing=false".into(),
                "lora.target_modules=[\"q_proj\"]".into(),
                "training.scheduler_type=cosine".into(),
                "seed=7".into(),
            ],
            "t",
        )
        .unwrap();
        assert_eq!(c.training.learning_rate, 1e-3);
        assert_eq!(c.training.packing, Packing::Off);
        assert_eq!(c.lora.target_modules, serde_json::json!(["q_proj"]));
        assert_eq!(c.training.scheduler_type, "cosine");
        assert_eq!(c.seed, 7);
        for bad in ["training.nope=1", "training.batch_size=0", "=3", "novalue"] {
            assert!(
                TrainConfig::from_toml_str(BASE, &[bad.into()], "t").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_values_are_errors() {
        for (key, value) in [
            ("lora.rank", "0"),
            ("lora.dropout", "1.0"),
            ("training.learning_rate", "-1.0"),
            ("training.scheduler_type", "\"warp\""),
            ("training.device", "\"tpu\""),
            ("training.dtype", "\"int8\""),
            ("validation_split", "1.5"),
            ("training.max_steps", "0"),
        ] {
            let e = TrainConfig::from_toml_str(BASE, &[format!("{key}={value}")], "t");
            assert!(e.is_err(), "{key}={value} was accepted");
        }
    }
}
