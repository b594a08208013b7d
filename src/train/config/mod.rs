//! The trainer's configuration: a TOML or YAML file (`loratch train --config`) or a Python dict
//! (`loratch.train`), one schema whichever: each is read into one value tree, the aliases of
//! other tools' key names and the `key=value` overrides applied (see [`aliases`], [`tree`]),
//! then these serde structs. Unknown keys are errors, so a typo never passes silently.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::loader::Packing;
use crate::error::{Error, Result};
use crate::lora::targets::Targets;
use crate::train::schedule::ScheduleKind;

pub mod aliases;
pub mod tree;

pub use tree::Format;

/// The top-level keys of [`TrainConfig`] (a test checks each list against its struct).
pub const TOP_KEYS: [&str; 9] = [
    "model",
    "quantize",
    "data",
    "validation_data",
    "validation_split",
    "output_dir",
    "seed",
    "lora",
    "training",
];

/// The keys of [`LoraSection`].
pub const LORA_KEYS: [&str; 5] = ["rank", "alpha", "target_modules", "dropout", "use_rslora"];

/// The keys of [`TrainingSection`].
pub const TRAINING_KEYS: [&str; 25] = [
    "learning_rate",
    "weight_decay",
    "num_epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "warmup_steps",
    "warmup_ratio",
    "max_grad_norm",
    "scheduler_type",
    "min_lr",
    "device",
    "max_steps",
    "packing",
    "train_on_inputs",
    "dtype",
    "max_nonfinite_steps",
    "overwrite_output_dir",
    "gradient_checkpointing",
    "save_total_limit",
    "load_best_at_end",
    "report_to",
];

/// A configuration and the notes its aliases produced (`"lora_alpha" is loratch's [lora]
/// alpha`), for the caller to show.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub config: TrainConfig,
    pub notes: Vec<String>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model: a Hugging Face directory (config.json, safetensors, tokenizer.json), a GGUF
    /// file, or a Hub id (`owner/name`, `owner/name@revision`) found in the local Hugging Face
    /// cache (see [`crate::hf::hub_cache`]).
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
    /// The warm-up as a fraction of the run's optimizer steps (Hugging Face's `warmup_ratio`:
    /// `ceil(ratio * total_steps)`); exclusive with `warmup_steps`.
    pub warmup_ratio: f64,
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
            warmup_ratio: 0.0,
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

/// A deserialisation error with the path of the key it is about (`training.batch_size: ...`).
fn keyed_error<E: std::fmt::Display>(source: &str, e: serde_path_to_error::Error<E>) -> Error {
    let path = e.path().to_string();
    if path == "." {
        Error::Config(format!("{source}: {}", e.inner()))
    } else {
        Error::Config(format!("{source}: {path}: {}", e.inner()))
    }
}

impl TrainConfig {
    /// Reads a TOML, YAML (`.yaml`/`.yml`) or JSON (`.json`) file and applies `overrides`
    /// (`key=value` or `section.key=value`, the value in TOML syntax; a bare word is a string).
    pub fn read(path: &Path, overrides: &[String]) -> Result<Parsed> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(
            &text,
            Format::from_path(path),
            overrides,
            &path.display().to_string(),
        )
    }

    /// As [`read`](Self::read) from text in `format`; `source` names it in errors.
    pub fn parse(text: &str, format: Format, overrides: &[String], source: &str) -> Result<Parsed> {
        Self::from_tree(tree::parse(text, format, source)?, overrides, source)
    }

    /// From a value tree: aliases and `overrides` applied, then deserialised and validated.
    /// Errors name the key (`training.batch_size`).
    pub fn from_tree(
        value: serde_json::Value,
        overrides: &[String],
        source: &str,
    ) -> Result<Parsed> {
        let (value, notes) = tree::normalize(value, overrides, source)?;
        let config: Self =
            serde_path_to_error::deserialize(value).map_err(|e| keyed_error(source, e))?;
        config.validate()?;
        Ok(Parsed { config, notes })
    }

    /// A TOML file, as [`read`](Self::read) does (whatever the extension), notes dropped.
    pub fn from_toml_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, overrides, &path.display().to_string())
    }

    /// From TOML text, notes dropped; `source` names it in errors.
    pub fn from_toml_str(text: &str, overrides: &[String], source: &str) -> Result<Self> {
        Ok(Self::parse(text, Format::Toml, overrides, source)?.config)
    }

    /// From JSON text (what `loratch.train(dict)` passes), with the aliases' notes. Errors name
    /// the key (`training.batch_size`), never a line and column of text the caller did not write.
    pub fn from_json(text: &str) -> Result<Parsed> {
        let value = tree::parse(text, Format::Json, "training config")?;
        Self::from_tree(value, &[], "training config")
    }

    /// As [`from_json`](Self::from_json), notes dropped.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Ok(Self::from_json(text)?.config)
    }

    /// The configuration as JSON (saved in every checkpoint).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The warm-up of a run of `total_steps` optimizer steps (0 for schedules without one), and
    /// a warning when the configured one is as long as the run or longer: it is then clamped to
    /// a tenth of the run, so a guide's `warmup_steps = 100` on a small dataset still trains
    /// (the schedule needs the warm-up to end before the run does).
    pub fn warmup_for(&self, total_steps: u64) -> Result<(u64, Option<String>)> {
        let t = &self.training;
        if !ScheduleKind::from_name(&t.scheduler_type)?.has_warmup() {
            return Ok((0, None));
        }
        let (asked, what) = if t.warmup_ratio > 0.0 {
            let steps = (t.warmup_ratio * total_steps as f64).ceil() as u64;
            let what = format!("warmup_ratio = {} ({steps} steps)", t.warmup_ratio);
            (steps, what)
        } else {
            (t.warmup_steps, format!("warmup_steps = {}", t.warmup_steps))
        };
        if asked < total_steps {
            return Ok((asked, None));
        }
        let clamped = total_steps / 10;
        Ok((
            clamped,
            Some(format!(
                "the warm-up ({what}) is as long as the run ({total_steps} optimizer steps) or \
                 longer; warming up over {clamped} steps instead (a tenth of the run)"
            )),
        ))
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
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return bad(format!(
                "training.warmup_ratio must be in [0, 1), got {}",
                t.warmup_ratio
            ));
        }
        if t.warmup_ratio > 0.0 && t.warmup_steps > 0 {
            return bad(format!(
                "training.warmup_steps = {} and training.warmup_ratio = {} both set the warm-up; \
                 keep one",
                t.warmup_steps, t.warmup_ratio
            ));
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

#[cfg(test)]
mod tests;
