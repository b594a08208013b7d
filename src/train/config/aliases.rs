//! The key names users paste from PEFT, TRL / Hugging Face `TrainingArguments`, axolotl,
//! torchtune and mlx-lm configs, accepted where those tools put them (the top level, or
//! loratch's section) and mapped onto loratch's keys, each with a one-line note naming
//! loratch's key. Only names whose meaning is loratch's are mapped; names whose meaning differs
//! are refused with the difference explained (`val_set_size` as a count, `bf16`, ...).
use serde_json::Value;

use crate::error::{Error, Result};

/// How an alias's value becomes loratch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    /// The same value.
    Same,
    /// A whole number of epochs (`3.0` is 3; `2.5` is refused: loratch trains whole epochs).
    Epochs,
    /// axolotl's `val_set_size`: a fraction below 1 is `validation_split`; 1 or more is a count
    /// of examples, which loratch has no key for.
    ValSetSize,
    /// Hugging Face scheduler names (`cosine` warms up, then decays) to loratch's.
    Scheduler,
    /// axolotl's `lora_target_linear: true` is `target_modules = "all-linear"`.
    TargetLinear,
}

/// One accepted foreign key name.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    /// The name users write.
    pub name: &'static str,
    /// loratch's section of the key (`None`: the top level). The alias is accepted at the top
    /// level and in this section.
    pub section: Option<&'static str>,
    /// loratch's key.
    pub key: &'static str,
    /// The tools that use the name (for the README table).
    pub from: &'static str,
    pub convert: Convert,
}

const fn alias(
    name: &'static str,
    section: Option<&'static str>,
    key: &'static str,
    from: &'static str,
    convert: Convert,
) -> Alias {
    Alias {
        name,
        section,
        key,
        from,
        convert,
    }
}

const LORA: Option<&str> = Some("lora");
const TRAINING: Option<&str> = Some("training");

/// Every alias. Besides these, any `[training]` key written at the top level (as Hugging Face's
/// flat `TrainingArguments` do) is taken as that `[training]` key.
pub const ALIASES: &[Alias] = &[
    alias("r", LORA, "rank", "PEFT", Convert::Same),
    alias("lora_r", LORA, "rank", "axolotl", Convert::Same),
    alias("lora_rank", LORA, "rank", "torchtune", Convert::Same),
    alias(
        "lora_alpha",
        LORA,
        "alpha",
        "PEFT, axolotl, torchtune",
        Convert::Same,
    ),
    alias(
        "lora_dropout",
        LORA,
        "dropout",
        "PEFT, axolotl, torchtune",
        Convert::Same,
    ),
    alias(
        "target_modules",
        LORA,
        "target_modules",
        "PEFT",
        Convert::Same,
    ),
    alias(
        "lora_target_modules",
        LORA,
        "target_modules",
        "axolotl",
        Convert::Same,
    ),
    alias(
        "lora_target_linear",
        LORA,
        "target_modules",
        "axolotl",
        Convert::TargetLinear,
    ),
    alias("use_rslora", LORA, "use_rslora", "PEFT", Convert::Same),
    alias("base_model", None, "model", "axolotl", Convert::Same),
    alias("model_name_or_path", None, "model", "TRL", Convert::Same),
    alias(
        "val_set_size",
        None,
        "validation_split",
        "axolotl",
        Convert::ValSetSize,
    ),
    alias(
        "num_train_epochs",
        TRAINING,
        "num_epochs",
        "TRL",
        Convert::Epochs,
    ),
    alias(
        "num_epochs",
        TRAINING,
        "num_epochs",
        "axolotl",
        Convert::Epochs,
    ),
    alias(
        "lr_scheduler_type",
        TRAINING,
        "scheduler_type",
        "TRL",
        Convert::Scheduler,
    ),
    alias(
        "lr_scheduler",
        TRAINING,
        "scheduler_type",
        "axolotl",
        Convert::Scheduler,
    ),
    alias(
        "per_device_train_batch_size",
        TRAINING,
        "batch_size",
        "TRL",
        Convert::Same,
    ),
    alias(
        "micro_batch_size",
        TRAINING,
        "batch_size",
        "axolotl",
        Convert::Same,
    ),
    alias(
        "max_length",
        TRAINING,
        "max_seq_length",
        "TRL",
        Convert::Same,
    ),
    alias(
        "sequence_len",
        TRAINING,
        "max_seq_length",
        "axolotl",
        Convert::Same,
    ),
    alias(
        "max_seq_len",
        TRAINING,
        "max_seq_length",
        "torchtune",
        Convert::Same,
    ),
    alias(
        "load_best_model_at_end",
        TRAINING,
        "load_best_at_end",
        "TRL",
        Convert::Same,
    ),
];

/// Names refused because their meaning is not loratch's, with the difference.
pub const REFUSED: &[(&str, &str)] = &[
    (
        "bf16",
        "Hugging Face's bf16 is mixed precision (float32 weights, bfloat16 compute); loratch's \
         [training] dtype = \"bfloat16\" holds the frozen base in bfloat16 (adapters stay float32)",
    ),
    (
        "fp16",
        "Hugging Face's fp16 is mixed precision (float32 weights, float16 compute); loratch's \
         [training] dtype = \"float16\" holds the frozen base in float16 (adapters stay float32)",
    ),
    (
        "lora_parameters",
        "mlx-lm's LoRA block: write a [lora] section instead; its rank and dropout are loratch's, \
         and its scale multiplies the update directly, so [lora] alpha = scale * rank",
    ),
    (
        "per_device_eval_batch_size",
        "loratch evaluates with [training] batch_size; there is no separate evaluation batch size",
    ),
];

/// Where a key lands and the note saying so.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub section: Option<&'static str>,
    pub key: &'static str,
    pub value: Value,
    /// `None` for loratch's own keys.
    pub note: Option<String>,
}

/// `[lora] alpha`, `[training] num_epochs`, `model`.
pub fn display_key(section: Option<&str>, key: &str) -> String {
    match section {
        Some(s) => format!("[{s}] {key}"),
        None => key.to_string(),
    }
}

/// Where the key `key` written in `section` (None: the top level) goes, its value converted.
/// `Ok(None)`: neither loratch's key there nor an alias (an unknown key, refused later).
/// `own_keys(section)` lists loratch's keys of a section (None: the top level).
pub fn map_key(
    section: Option<&str>,
    key: &str,
    value: Value,
    own_keys: &dyn Fn(Option<&str>) -> Vec<&'static str>,
) -> Result<Option<Mapped>> {
    if let Some(own) = own_keys(section).into_iter().find(|k| *k == key) {
        let section = section.and_then(|s| ["lora", "training"].into_iter().find(|x| *x == s));
        return Ok(Some(Mapped {
            section,
            key: own,
            value,
            note: None,
        }));
    }
    if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == key) {
        return Err(Error::Config(format!("{key:?} is not loratch's: {why}")));
    }
    let found = ALIASES
        .iter()
        .find(|a| a.name == key && (section.is_none() || section == a.section));
    if let Some(a) = found {
        let (value, detail) = convert(a, value)?;
        let mut note = format!(
            "{:?} is loratch's {}",
            a.name,
            display_key(a.section, a.key)
        );
        if let Some(d) = detail {
            note.push_str(&format!(" ({d})"));
        }
        return Ok(Some(Mapped {
            section: a.section,
            key: a.key,
            value,
            note: Some(note),
        }));
    }
    // Hugging Face's TrainingArguments are flat: a [training] key at the top level.
    if section.is_none() {
        if let Some(own) = own_keys(TRAINING).into_iter().find(|k| *k == key) {
            return Ok(Some(Mapped {
                section: TRAINING,
                key: own,
                value,
                note: Some(format!(
                    "{key:?} at the top level is loratch's {}",
                    display_key(TRAINING, own)
                )),
            }));
        }
    }
    Ok(None)
}

/// Hugging Face's scheduler names and loratch's equivalents (both decay to [training] min_lr
/// here, to 0 there).
const HF_SCHEDULERS: &[(&str, &str)] = &[
    ("linear", "linear_warmup_linear"),
    ("cosine", "linear_warmup_cosine"),
    ("cosine_with_min_lr", "linear_warmup_cosine"),
    ("constant", "constant"),
];

/// The value of alias `a` as loratch's, and what was translated, if anything.
fn convert(a: &Alias, value: Value) -> Result<(Value, Option<String>)> {
    let bad = |msg: String| Err(Error::Config(format!("{:?}: {msg}", a.name)));
    match a.convert {
        Convert::Same => Ok((value, None)),
        Convert::Epochs => match value.as_f64() {
            Some(x) if x.fract() == 0.0 && x >= 0.0 && !value.is_u64() => {
                Ok((Value::from(x as u64), None))
            }
            Some(x) if x.fract() != 0.0 => bad(format!(
                "{x} epochs: loratch trains whole epochs ([training] num_epochs); for part of \
                 an epoch set [training] max_steps"
            )),
            _ => Ok((value, None)),
        },
        Convert::ValSetSize => match value.as_f64() {
            Some(x) if x >= 1.0 => bad(format!(
                "{x} is a count of held-out examples in axolotl; loratch's validation_split is \
                 a fraction of data in [0, 1) (e.g. validation_split = 0.05), or give \
                 validation_data"
            )),
            _ => Ok((value, None)),
        },
        Convert::Scheduler => {
            let Some(name) = value.as_str() else {
                return Ok((value, None));
            };
            if let Some((hf, ours)) = HF_SCHEDULERS.iter().find(|(hf, _)| *hf == name) {
                let detail = format!("{hf:?} is loratch's {ours:?}, decaying to min_lr");
                return Ok((Value::from(*ours), Some(detail)));
            }
            if crate::train::schedule::ScheduleKind::from_name(name).is_ok() {
                return Ok((value, None));
            }
            let known: Vec<String> = HF_SCHEDULERS
                .iter()
                .map(|(h, _)| format!("{h:?}"))
                .collect();
            bad(format!(
                "{name:?} has no loratch equivalent; Hugging Face names loratch maps: {} (or \
                 loratch's own [training] scheduler_type names)",
                known.join(", ")
            ))
        }
        Convert::TargetLinear => match value {
            Value::Bool(true) => Ok((
                Value::from("all-linear"),
                Some("true is \"all-linear\"".into()),
            )),
            other => bad(format!(
                "only `true` (every linear layer) is loratch's target_modules = \"all-linear\"; \
                 got {other}: list the modules in [lora] target_modules instead"
            )),
        },
    }
}

/// The README's aliases table (a test checks that the README holds exactly this).
pub fn markdown_table() -> String {
    let mut out = String::from("| You write | From | loratch's key |\n| --- | --- | --- |\n");
    for a in ALIASES {
        let detail = match a.convert {
            Convert::Same => "",
            Convert::Epochs => " (whole epochs)",
            Convert::ValSetSize => " (a fraction; a count is refused)",
            Convert::Scheduler => {
                " (`cosine` is `linear_warmup_cosine`, `linear` is `linear_warmup_linear`)"
            }
            Convert::TargetLinear => " = `\"all-linear\"` (when true)",
        };
        let target = display_key(a.section, a.key);
        out.push_str(&format!(
            "| `{}` | {} | `{target}`{detail} |\n",
            a.name, a.from
        ));
    }
    out.push_str(
        "| any `[training]` key at the top level (`learning_rate`, `warmup_steps`, \
         `gradient_accumulation_steps`, `max_seq_length`, `batch_size`, ...) | TRL, axolotl, \
         mlx-lm (flat configs) | that `[training]` key |\n",
    );
    for (name, why) in REFUSED {
        let why = why.replace('|', "\\|");
        out.push_str(&format!("| `{name}` | | refused: {why} |\n"));
    }
    out
}
