//! PEFT's `adapter_config.json`, described once: [`AdapterConfig`] is what loratch writes for a
//! [`LoraSpec`] and what it reads back into one. Keys are PEFT's `LoraConfig` fields; the keys
//! PEFT writes that loratch has no use for are accepted and ignored, and an absent or null key
//! takes PEFT's default. Features loratch does not implement (DoRA, bias training,
//! `modules_to_save`, `fan_in_fan_out`) are errors, not silently ignored; so is a value of the
//! wrong type or out of range. Errors name the key path (`rank_pattern.q_proj`).
use super::spec::LoraSpec;
use super::targets::Targets;
use crate::error::{Error, Result};
use crate::io::json::{kind_name, Words};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// PEFT's `r` when the key is absent or null.
const DEFAULT_RANK: i64 = 8;
/// PEFT's `lora_alpha` when the key is absent or null.
const DEFAULT_ALPHA: f64 = 8.0;

/// `adapter_config.json`. The fields are in alphabetical order, as PEFT writes its keys, so a
/// written file reads like PEFT's own. Every field is optional on reading (null = absent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterConfig {
    /// Per-module alpha overrides `{regex: alpha}`.
    pub alpha_pattern: Option<BTreeMap<String, Number>>,
    /// The model the adapter was trained on (written for PEFT; not read).
    pub base_model_name_or_path: Option<String>,
    /// Which biases train: only `"none"` is supported.
    pub bias: Option<String>,
    /// Transposed (Conv1D-style) weights: not supported.
    pub fan_in_fan_out: Option<bool>,
    /// Written true (PEFT then loads the adapter frozen); not read.
    pub inference_mode: Option<bool>,
    /// How PEFT initialises fresh adapters (true, "gaussian", ...): written true, not read
    /// (a file's tensors replace any initialisation).
    pub init_lora_weights: Option<Value>,
    /// The name of the layer list `layers_to_transform` counts in (null for the decoders
    /// loratch loads); not read.
    pub layers_pattern: Option<Value>,
    /// Only these decoder layers: an int or a list of ints.
    #[serde(deserialize_with = "int_or_list")]
    pub layers_to_transform: Option<Vec<i64>>,
    /// Alpha (default [`DEFAULT_ALPHA`]); finite and > 0.
    pub lora_alpha: Option<Number>,
    /// Dropout on the adapter input, in [0, 1).
    pub lora_dropout: Option<f64>,
    /// Extra fully trained modules: only none (null or an empty list) is supported.
    pub modules_to_save: Option<Vec<String>>,
    /// Must be `"LORA"`.
    pub peft_type: Option<String>,
    /// Rank (default [`DEFAULT_RANK`]); > 0.
    pub r: Option<i64>,
    /// Per-module rank overrides `{regex: rank}`.
    pub rank_pattern: Option<BTreeMap<String, Number>>,
    /// Which modules are adapted; null means PEFT's per-model default.
    pub target_modules: Option<Targets>,
    /// Written `"CAUSAL_LM"`; not read.
    pub task_type: Option<String>,
    /// DoRA: not supported.
    pub use_dora: Option<bool>,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: Option<bool>,
}

/// A JSON number that is written as an integer when it is whole (alpha 16 as `16`, not
/// `16.0`), as Python's `json` writes the ints PEFT configs usually hold.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Number(pub f64);

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let x = self.0;
        if x.fract() == 0.0 && x.abs() < 1e15 {
            s.serialize_i64(x as i64)
        } else {
            s.serialize_f64(x)
        }
    }
}

/// `layers_to_transform`: PEFT takes one int or a list of ints; null is None.
fn int_or_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<i64>>, D::Error> {
    struct Form;
    impl<'de> Visitor<'de> for Form {
        type Value = Option<Vec<i64>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an int or a list of ints")
        }

        fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
            Ok(Some(vec![v]))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
            let v = i64::try_from(v)
                .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))?;
            Ok(Some(vec![v]))
        }

        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut layers = Vec::new();
            while let Some(i) = seq.next_element::<i64>()? {
                layers.push(i);
            }
            Ok(Some(layers))
        }
    }
    d.deserialize_any(Form)
}

impl AdapterConfig {
    /// The config loratch writes for `spec`, adapters trained on `base_model`.
    pub fn from_spec(spec: &LoraSpec, base_model: &Path) -> Self {
        let pattern = |p: &[(String, f64)]| -> BTreeMap<String, Number> {
            p.iter().map(|(k, v)| (k.clone(), Number(*v))).collect()
        };
        let ranks: Vec<(String, f64)> = spec
            .rank_pattern
            .iter()
            .map(|(k, r)| (k.clone(), *r as f64))
            .collect();
        Self {
            alpha_pattern: Some(pattern(&spec.alpha_pattern)),
            base_model_name_or_path: Some(base_model.to_string_lossy().into_owned()),
            bias: Some("none".into()),
            fan_in_fan_out: Some(false),
            inference_mode: Some(true),
            init_lora_weights: Some(Value::Bool(true)),
            layers_pattern: None,
            layers_to_transform: spec.layers.clone(),
            lora_alpha: Some(Number(spec.alpha)),
            lora_dropout: Some(spec.dropout),
            modules_to_save: None,
            peft_type: Some("LORA".into()),
            r: Some(spec.rank),
            rank_pattern: Some(pattern(&ranks)),
            target_modules: Some(spec.targets.clone()),
            task_type: Some("CAUSAL_LM".into()),
            use_dora: Some(false),
            use_rslora: Some(spec.use_rslora),
        }
    }

    /// Reads a config; errors are [`Error::AdapterFormat`] for `source` (the file it came from)
    /// and name the key path.
    pub fn from_json(value: &Value, source: &Path) -> Result<Self> {
        // serde would read an array positionally as the struct's fields.
        if !value.is_object() {
            return Err(bad(
                source,
                format!("not a JSON object (got {})", kind_name(value, Words::Json)),
            ));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            bad(
                source,
                format!("{}: {}", e.path(), cut(&e.inner().to_string())),
            )
        })
    }

    /// The spec this config describes, every value checked. `fallback_targets` stands for a
    /// null `target_modules` (PEFT's per-model default). Errors as [`from_json`](Self::from_json).
    pub fn to_spec(&self, fallback_targets: Vec<String>, source: &Path) -> Result<LoraSpec> {
        let bad = |m: String| bad(source, m);
        if let Some(t) = self.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(bad(format!("peft_type {t:?} is not \"LORA\"")));
        }
        for (key, on) in [
            ("use_dora", self.use_dora),
            ("fan_in_fan_out", self.fan_in_fan_out),
        ] {
            if on == Some(true) {
                return Err(bad(format!("{key} is not supported")));
            }
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(bad(format!("bias {b:?} is not supported (only \"none\")")));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad("modules_to_save is not supported".into()));
        }
        let rank = self.r.unwrap_or(DEFAULT_RANK);
        if rank <= 0 {
            return Err(bad(format!("r must be > 0, got {rank}")));
        }
        let alpha = self.lora_alpha.map_or(DEFAULT_ALPHA, |a| a.0);
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(bad(format!(
                "lora_alpha must be a finite number > 0, got {alpha}"
            )));
        }
        let dropout = self.lora_dropout.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(bad(format!(
                "lora_dropout must be in [0, 1), got {dropout}"
            )));
        }
        let rank_pattern = pattern(&self.rank_pattern, "rank_pattern", source)?
            .into_iter()
            .map(|(k, v)| {
                if v.fract() == 0.0 && v >= 1.0 && v <= i64::MAX as f64 {
                    Ok((k, v as i64))
                } else {
                    Err(bad(format!(
                        "rank_pattern[{k:?}] must be an integer > 0, got {v}"
                    )))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = pattern(&self.alpha_pattern, "alpha_pattern", source)?;
        if let Some((k, v)) = alpha_pattern
            .iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
        {
            return Err(bad(format!(
                "alpha_pattern[{k:?}] must be a finite number > 0, got {v}"
            )));
        }
        Ok(LoraSpec {
            rank,
            alpha,
            dropout,
            use_rslora: self.use_rslora.unwrap_or(false),
            targets: self
                .target_modules
                .clone()
                .unwrap_or(Targets::Names(fallback_targets)),
            layers: self.layers_to_transform.clone(),
            rank_pattern,
            alpha_pattern,
        })
    }
}

/// An [`Error::AdapterFormat`] about the config read from `source`.
fn bad(source: &Path, msg: String) -> Error {
    Error::adapter(source, format!("adapter config: {msg}"))
}

/// A `{regex: value}` pattern as pairs; every regex must compile (as `pattern_value` builds it).
fn pattern(
    p: &Option<BTreeMap<String, Number>>,
    name: &str,
    source: &Path,
) -> Result<Vec<(String, f64)>> {
    p.iter()
        .flatten()
        .map(|(key, v)| {
            regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                bad(
                    source,
                    format!("{name} key {key:?} is not a valid regex: {e}"),
                )
            })?;
            Ok((key.clone(), v.0))
        })
        .collect()
}

/// A serde message cut in the middle when long (it quotes the bad value whole), keeping its
/// start and what was expected.
fn cut(msg: &str) -> String {
    let n = msg.chars().count();
    if n <= 120 {
        return msg.to_owned();
    }
    let head: String = msg.chars().take(70).collect();
    let tail: String = msg.chars().skip(n - 40).collect();
    format!("{head}...{tail}")
}

/// Reads a PEFT adapter config (`adapter_config.json`'s JSON) into a [`LoraSpec`]: as
/// [`AdapterConfig::from_json`] then [`AdapterConfig::to_spec`].
pub fn spec_from_json(
    value: &Value,
    fallback_targets: Vec<String>,
    source: &Path,
) -> Result<LoraSpec> {
    AdapterConfig::from_json(value, source)?.to_spec(fallback_targets, source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(cfg: Value) -> Result<LoraSpec> {
        spec_from_json(
            &cfg,
            vec!["q_proj".into()],
            Path::new("/a/adapter_config.json"),
        )
    }

    /// The message of an [`Error::AdapterFormat`] for the config file.
    fn format_msg(cfg: Value) -> String {
        match spec(cfg.clone()) {
            Err(Error::AdapterFormat { path, msg }) => {
                assert_eq!(path, Path::new("/a/adapter_config.json"));
                msg
            }
            other => panic!("{cfg}: expected AdapterFormat, got {other:?}"),
        }
    }

    #[test]
    fn a_written_config_reads_back() {
        let mut s = LoraSpec::simple(4, 16.0, Targets::Names(vec!["v_proj".into()]));
        s.dropout = 0.1;
        s.use_rslora = true;
        s.layers = Some(vec![0, 1]);
        s.rank_pattern = vec![("q_proj".into(), 2)];
        s.alpha_pattern = vec![("v_proj".into(), 3.5)];
        let cfg = serde_json::to_value(AdapterConfig::from_spec(&s, Path::new("/m"))).unwrap();
        assert_eq!(spec(cfg).unwrap(), s);
        // Absent and null keys take PEFT's defaults; target_modules null the fallback.
        let d = spec(json!({"target_modules": null, "use_rslora": null, "bias": null})).unwrap();
        let want = LoraSpec::simple(8, 8.0, Targets::Names(vec!["q_proj".into()]));
        assert_eq!(d, want);
        // One int for layers_to_transform, keys loratch does not read (PEFT's newer ones too),
        // "all-linear" and a regex for target_modules.
        let one = spec(json!({
            "layers_to_transform": 3, "init_lora_weights": "gaussian", "megatron_config": null,
            "exclude_modules": ["x"], "layers_pattern": ["layers"], "target_modules": "all-linear",
        }))
        .unwrap();
        assert_eq!(
            (one.layers, one.targets),
            (Some(vec![3]), Targets::AllLinear)
        );
        let re = spec(json!({"target_modules": ".*q_proj"})).unwrap();
        assert_eq!(re.targets, Targets::Regex(".*q_proj".into()));
    }

    #[test]
    fn written_as_peft_writes_it() {
        let mut s = LoraSpec::simple(4, 16.0, Targets::AllLinear);
        s.alpha_pattern = vec![("v_proj".into(), 3.5)];
        s.rank_pattern = vec![("q_proj".into(), 2)];
        let text = serde_json::to_string(&AdapterConfig::from_spec(&s, Path::new("/m"))).unwrap();
        assert_eq!(
            text,
            r#"{"alpha_pattern":{"v_proj":3.5},"base_model_name_or_path":"/m","bias":"none","#
                .to_owned()
                + r#""fan_in_fan_out":false,"inference_mode":true,"init_lora_weights":true,"#
                + r#""layers_pattern":null,"layers_to_transform":null,"lora_alpha":16,"#
                + r#""lora_dropout":0.0,"modules_to_save":null,"peft_type":"LORA","r":4,"#
                + r#""rank_pattern":{"q_proj":2},"target_modules":"all-linear","#
                + r#""task_type":"CAUSAL_LM","use_dora":false,"use_rslora":false}"#
        );
    }

    #[test]
    fn bad_values_are_format_errors_naming_the_key() {
        let cases = [
            (json!([]), "not a JSON object (got an array)"),
            (json!({"r": "two"}), "r: invalid type: string \"two\", expected i64"),
            (json!({"r": 0}), "r must be > 0, got 0"),
            (json!({"r": 2.5}), "r: invalid type: floating point `2.5`, expected i64"),
            (
                json!({"lora_alpha": -4}),
                "lora_alpha must be a finite number > 0, got -4",
            ),
            (
                json!({"lora_alpha": "8"}),
                "lora_alpha: invalid type: string \"8\", expected f64",
            ),
            (
                json!({"lora_dropout": 1.0}),
                "lora_dropout must be in [0, 1), got 1",
            ),
            (
                json!({"lora_dropout": "x"}),
                "lora_dropout: invalid type: string \"x\", expected f64",
            ),
            (
                json!({"use_rslora": "yes"}),
                "use_rslora: invalid type: string \"yes\", expected a boolean",
            ),
            (
                json!({"use_dora": 1}),
                "use_dora: invalid type: integer `1`, expected a boolean",
            ),
            (json!({"use_dora": true}), "use_dora is not supported"),
            (
                json!({"fan_in_fan_out": true}),
                "fan_in_fan_out is not supported",
            ),
            (
                json!({"peft_type": "IA3"}),
                "peft_type \"IA3\" is not \"LORA\"",
            ),
            (
                json!({"peft_type": 3}),
                "peft_type: invalid type: integer `3`, expected a string",
            ),
            (json!({"bias": "all"}), "bias \"all\" is not supported"),
            (
                json!({"modules_to_save": ["lm_head"]}),
                "modules_to_save is not supported",
            ),
            (
                json!({"modules_to_save": "lm_head"}),
                "modules_to_save: invalid type: string \"lm_head\", expected a sequence",
            ),
            (
                json!({"target_modules": 5}),
                "target_modules: invalid type: integer `5`, expected a list of module names",
            ),
            (
                json!({"target_modules": [1]}),
                "target_modules[0]: invalid type: integer `1`, expected a string",
            ),
            (
                json!({"target_modules": "("}),
                "target_modules: regex \"(\" is invalid",
            ),
            (
                json!({"layers_to_transform": "0"}),
                "layers_to_transform: invalid type: string \"0\", expected an int or a list of ints",
            ),
            (
                json!({"layers_to_transform": [0.5]}),
                "layers_to_transform[0]: invalid type: floating point `0.5`, expected i64",
            ),
            (
                json!({"rank_pattern": []}),
                "rank_pattern: invalid type: sequence, expected a map",
            ),
            (
                json!({"rank_pattern": {"q": 0}}),
                "rank_pattern[\"q\"] must be an integer > 0, got 0",
            ),
            (
                json!({"rank_pattern": {"q": 1.5}}),
                "rank_pattern[\"q\"] must be an integer > 0, got 1.5",
            ),
            (
                json!({"rank_pattern": {"(": 2}}),
                "rank_pattern key \"(\" is not a valid regex",
            ),
            (
                json!({"alpha_pattern": {"q": "1"}}),
                "alpha_pattern.q: invalid type: string \"1\", expected f64",
            ),
            (
                json!({"alpha_pattern": {"q": -1}}),
                "alpha_pattern[\"q\"] must be a finite number > 0, got -1",
            ),
        ];
        for (cfg, want) in cases {
            let msg = format_msg(cfg.clone());
            assert!(
                msg.starts_with("adapter config: ") && msg.contains(want),
                "{cfg}: {msg:?} lacks {want:?}"
            );
        }
        // A long value is cut in the message, which still says what was expected.
        let long = "x".repeat(500);
        let msg = format_msg(json!({ "use_rslora": long }));
        assert!(
            msg.len() < 200
                && msg.starts_with("adapter config: use_rslora: invalid type: string \"xxx")
                && msg.contains("x...x")
                && msg.ends_with("\", expected a boolean"),
            "{msg}"
        );
    }
}
