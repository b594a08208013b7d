//! Adapter files in Hugging Face PEFT's format, so adapters move between loratch, PEFT,
//! transformers and serving stacks: a directory with `adapter_config.json` +
//! `adapter_model.safetensors`, or one `.safetensors` file carrying the config in its metadata.
//! Tensor keys are PEFT's (`base_model.model.<module>.lora_{A,B}.weight`), float32 on disk.
//! Unlike PEFT, loading is strict: a missing, unexpected or mis-shaped tensor is an error.
use super::loaded::{LoadedModel, LoraSpec};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::safetensors::{serialize, MappedSafetensors};
use crate::lora::targets::Targets;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";

/// How a path is written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A PEFT directory.
    Directory,
    /// One safetensors file, the adapter config in its metadata under `adapter_config`.
    Safetensors,
    /// A legacy `torch.save` file (`.pt`, `.pth`, `.bin`).
    Torch,
}

impl Layout {
    /// By extension: `.safetensors`, `.pt`/`.pth`/`.bin`, anything else a directory.
    pub fn of(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("safetensors") => Self::Safetensors,
            Some("pt" | "pth" | "bin") => Self::Torch,
            _ => Self::Directory,
        }
    }
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// PEFT's `adapter_config.json` for `spec`.
pub fn adapter_config(spec: &LoraSpec, base_model: &Path) -> Value {
    let rank_pattern: serde_json::Map<String, Value> = spec
        .rank_pattern
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let alpha_pattern: serde_json::Map<String, Value> = spec
        .alpha_pattern
        .iter()
        .map(|(k, v)| (k.clone(), number(*v)))
        .collect();
    json!({
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model.to_string_lossy(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": spec.layers,
        "lora_alpha": number(spec.alpha),
        "lora_dropout": spec.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": rank_pattern,
        "target_modules": spec.targets.to_json(),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// Reads a PEFT adapter config into a [`LoraSpec`]. Features loratch does not implement (DoRA,
/// bias training, modules_to_save, fan_in_fan_out) are errors, not silently ignored; so is a
/// value of the wrong type or out of range. `fallback_targets` is used when `target_modules` is
/// null (PEFT's per-model default). Errors are [`Error::AdapterFormat`] for `source` (the file
/// the config was read from) and name the key.
pub fn spec_from_config(
    cfg: &Value,
    fallback_targets: Vec<String>,
    source: &Path,
) -> Result<LoraSpec> {
    let bad = |m: String| Error::adapter(source, format!("adapter config: {m}"));
    let obj = cfg
        .as_object()
        .ok_or_else(|| bad(format!("not a JSON object (got {})", json_type(cfg))))?;
    // An absent or null key takes PEFT's default; any other value must have the key's type.
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let string = |k: &str| -> Result<Option<&str>> {
        get(k)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad(format!("{k} must be a string, got {}", short(v))))
            })
            .transpose()
    };
    let flag = |k: &str| -> Result<bool> {
        get(k).map_or(Ok(false), |v| {
            v.as_bool()
                .ok_or_else(|| bad(format!("{k} must be true or false, got {}", short(v))))
        })
    };
    let number = |k: &str, default: f64| -> Result<f64> {
        get(k).map_or(Ok(default), |v| {
            v.as_f64()
                .ok_or_else(|| bad(format!("{k} must be a number, got {}", short(v))))
        })
    };
    if let Some(t) = string("peft_type")? {
        if t != "LORA" {
            return Err(bad(format!("peft_type {t:?} is not \"LORA\"")));
        }
    }
    if flag("use_dora")? {
        return Err(bad("use_dora is not supported".into()));
    }
    if flag("fan_in_fan_out")? {
        return Err(bad("fan_in_fan_out is not supported".into()));
    }
    if let Some(b) = string("bias")? {
        if b != "none" {
            return Err(bad(format!("bias {b:?} is not supported (only \"none\")")));
        }
    }
    match get("modules_to_save") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(Value::Array(_)) => return Err(bad("modules_to_save is not supported".into())),
        Some(v) => {
            return Err(bad(format!(
                "modules_to_save must be a list or null, got {}",
                short(v)
            )))
        }
    }
    let rank = match get("r") {
        None => 8,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| bad(format!("r must be an integer, got {}", short(v))))?,
    };
    if rank <= 0 {
        return Err(bad(format!("r must be > 0, got {rank}")));
    }
    let alpha = number("lora_alpha", 8.0)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(bad(format!(
            "lora_alpha must be a finite number > 0, got {alpha}"
        )));
    }
    let dropout = number("lora_dropout", 0.0)?;
    if !(0.0..1.0).contains(&dropout) {
        return Err(bad(format!(
            "lora_dropout must be in [0, 1), got {dropout}"
        )));
    }
    let use_rslora = flag("use_rslora")?;
    let targets = match get("target_modules") {
        None => Targets::Names(fallback_targets),
        // Targets' own messages name target_modules.
        Some(v) => Targets::from_json(v).map_err(|e| match e {
            Error::Config(m) => bad(m),
            other => other,
        })?,
    };
    let layers = match get("layers_to_transform") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        bad(format!(
                            "layers_to_transform entry {} is not an integer",
                            short(x)
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => Some(vec![v.as_i64().ok_or_else(|| {
            bad(format!(
                "layers_to_transform must be an int or a list of ints, got {}",
                short(v)
            ))
        })?]),
    };
    // {regex: value}; every regex must compile (as `pattern_value` builds it).
    let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
        let m = match get(k) {
            None => return Ok(vec![]),
            Some(Value::Object(m)) => m,
            Some(v) => return Err(bad(format!("{k} must be an object, got {}", short(v)))),
        };
        m.iter()
            .map(|(key, v)| {
                regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                    .map_err(|e| bad(format!("{k} key {key:?} is not a valid regex: {e}")))?;
                let x = v
                    .as_f64()
                    .ok_or_else(|| bad(format!("{k}[{key:?}] is not a number")))?;
                Ok((key.clone(), x))
            })
            .collect()
    };
    let rank_pattern = pattern("rank_pattern")?
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
    let alpha_pattern = pattern("alpha_pattern")?;
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
        use_rslora,
        targets,
        layers,
        rank_pattern,
        alpha_pattern,
    })
}

/// The JSON type of `v`, for messages.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `v` as JSON, cut to 80 characters (a config value in a message).
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Saves the model's adapters to `path` (layout by extension), atomically per file.
pub fn save(model: &LoadedModel, path: &Path) -> Result<()> {
    let spec = model
        .lora
        .as_ref()
        .ok_or_else(|| Error::State("LoRA is not initialised: nothing to save".into()))?;
    let tensors = model
        .named_parameters()?
        .into_iter()
        .map(|(k, t)| {
            Ok((
                k,
                t.f_detach()?
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Float)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = adapter_config(spec, &model.path);
    match Layout::of(path) {
        Layout::Directory => {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            write_atomic(&path.join(WEIGHTS_FILE), &serialize(&tensors, &meta)?)?;
            let text =
                serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
            write_atomic(&path.join(CONFIG_FILE), text.as_bytes())
        }
        Layout::Safetensors => {
            let meta = HashMap::from([
                ("format".to_string(), "pt".to_string()),
                ("adapter_config".to_string(), config.to_string()),
            ]);
            write_atomic(path, &serialize(&tensors, &meta)?)
        }
        // The legacy `torch.save` layout holds tensors only (no config), as PEFT's adapter_model.bin.
        Layout::Torch => crate::io::torch_pickle::write_state_dict(path, &tensors),
    }
}

/// An adapter read from disk: its config (absent in a bare `.pt` file) with the file it came
/// from, and tensors (CPU).
struct AdapterFile {
    config: Option<(Value, PathBuf)>,
    tensors: BTreeMap<String, Tensor>,
}

fn read_torch(p: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (k, t) in crate::io::torch_pickle::read_state_dict(p)? {
        if out.insert(k.clone(), t).is_some() {
            return Err(Error::adapter(p, format!("duplicate tensor {k}")));
        }
    }
    Ok(out)
}

fn read(path: &Path) -> Result<AdapterFile> {
    let read_st = |p: &Path| -> Result<(HashMap<String, String>, BTreeMap<String, Tensor>)> {
        let f = MappedSafetensors::open(p)?;
        let tensors = f
            .names()?
            .into_iter()
            .map(|n| Ok((n.clone(), f.tensor(&n)?)))
            .collect::<Result<_>>()?;
        Ok((f.metadata()?, tensors))
    };
    let parse = |text: &str, p: &Path| -> Result<Value> {
        serde_json::from_str(text)
            .map_err(|e| Error::adapter(p, format!("malformed adapter config: {e}")))
    };
    match Layout::of(path) {
        Layout::Directory => {
            let cfg_path = path.join(CONFIG_FILE);
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let config = parse(&text, &cfg_path)?;
            let st = path.join(WEIGHTS_FILE);
            let tensors = if !st.exists() && path.join(LEGACY_WEIGHTS_FILE).exists() {
                read_torch(&path.join(LEGACY_WEIGHTS_FILE))?
            } else {
                read_st(&st)?.1
            };
            Ok(AdapterFile {
                config: Some((config, cfg_path)),
                tensors,
            })
        }
        Layout::Safetensors => {
            let (meta, tensors) = read_st(path)?;
            let text = meta.get("adapter_config").ok_or_else(|| {
                Error::adapter(path, "no \"adapter_config\" in the safetensors metadata")
            })?;
            Ok(AdapterFile {
                config: Some((parse(text, path)?, path.to_path_buf())),
                tensors,
            })
        }
        Layout::Torch => {
            // adapter_model.bin inside a PEFT directory: the config sits beside it.
            let beside = path
                .parent()
                .map(|d| d.join(CONFIG_FILE))
                .filter(|c| c.is_file());
            let config = match beside {
                Some(c) => Some((
                    parse(
                        &std::fs::read_to_string(&c).map_err(|e| Error::io(&c, e))?,
                        &c,
                    )?,
                    c,
                )),
                None => None,
            };
            Ok(AdapterFile {
                config,
                tensors: read_torch(path)?,
            })
        }
    }
}

/// Loads adapters from `path` into the model. When LoRA is not initialised it is initialised
/// from the file's config; otherwise the file must have the same layout (modules, ranks,
/// alphas). Every check runs before any tensor is written, so a failed load changes nothing.
pub fn load(model: &mut LoadedModel, path: &Path) -> Result<()> {
    if model.merged {
        return Err(Error::State(
            "the adapters are merged; unmerge before loading others".into(),
        ));
    }
    let file = read(path)?;
    let bad = |m: String| Error::adapter(path, m);
    // target_modules null (PEFT's per-model default): take the modules present in the file.
    let in_file: BTreeSet<String> = file
        .tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix("base_model.model.")?
                .strip_suffix(".lora_A.weight")
                .map(str::to_owned)
        })
        .collect();
    let spec = match (&file.config, &model.lora) {
        (Some((cfg, source)), _) => {
            spec_from_config(cfg, in_file.iter().cloned().collect(), source)?
        }
        // A bare .pt file carries no config: it must fit the LoRA already on the model.
        (None, Some(current)) => current.clone(),
        (None, None) => {
            return Err(bad(
                "a .pt/.pth/.bin adapter has no config (rank, alpha); initialise LoRA with \
                 torch_hf_lora_init first, or load a PEFT directory / .safetensors file"
                    .into(),
            ))
        }
    };
    let paths: Vec<String> = model.lm.linears().into_iter().map(|(p, _)| p).collect();
    let chosen = spec.select(&paths).map_err(|e| bad(e.to_string()))?;
    let mut expected = BTreeMap::new();
    for p in &chosen {
        let cfg = spec.config_for(p)?;
        let linears = model.lm.linears();
        let lin = linears
            .iter()
            .find(|(q, _)| q == p)
            .map(|(_, l)| l)
            .ok_or_else(|| bad(format!("no module {p}")))?;
        expected.insert(
            format!("base_model.model.{p}.lora_A.weight"),
            vec![cfg.rank, lin.in_features()],
        );
        expected.insert(
            format!("base_model.model.{p}.lora_B.weight"),
            vec![lin.out_features(), cfg.rank],
        );
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !file.tensors.contains_key(*k))
        .collect();
    let unexpected: Vec<&String> = file
        .tensors
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(bad(format!(
            "tensors do not match the adapter config for this model: missing {missing:?}, unexpected {unexpected:?}"
        )));
    }
    for (k, shape) in &expected {
        let t = &file.tensors[k];
        if t.size() != *shape {
            return Err(bad(format!(
                "{k} has shape {:?}, expected {shape:?} (rank/alpha or model mismatch)",
                t.size()
            )));
        }
        if !t.f_is_floating_point()? || !crate::lora::adapter::all_finite(t)? {
            return Err(bad(format!("{k} is not a finite floating-point tensor")));
        }
    }
    match &model.lora {
        Some(current) => {
            let current_chosen = current.select(&paths)?;
            let same = current_chosen == chosen
                && chosen.iter().all(|p| {
                    matches!((current.config_for(p), spec.config_for(p)),
                        (Ok(a), Ok(b)) if a.rank == b.rank && a.alpha == b.alpha && a.use_rslora == b.use_rslora)
                });
            if !same {
                return Err(bad(
                    "the adapter's layout (modules, rank, alpha, use_rslora) disagrees with the LoRA initialised \
                     on this model; re-initialise with torch_hf_lora_init or load into a fresh model"
                        .into(),
                ));
            }
        }
        None => {
            let kind = Kind::Float;
            model.init_lora(spec.clone(), kind)?;
        }
    }
    tch::no_grad(|| -> Result<()> {
        for (p, lin) in model.lm.linears_mut() {
            if let Some(ad) = lin.lora.as_mut() {
                ad.a.f_copy_(&file.tensors[&format!("base_model.model.{p}.lora_A.weight")])?;
                ad.b.f_copy_(&file.tensors[&format!("base_model.model.{p}.lora_B.weight")])?;
                ad.config.dropout = spec.dropout;
            }
        }
        Ok(())
    })?;
    if let Some(current) = model.lora.as_mut() {
        current.dropout = spec.dropout;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cfg: Value) -> Result<LoraSpec> {
        spec_from_config(
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
        let cfg = adapter_config(&s, Path::new("/m"));
        assert_eq!(spec(cfg).unwrap(), s);
        // Absent and null keys take PEFT's defaults; target_modules null the fallback.
        let d = spec(json!({"target_modules": null, "use_rslora": null, "bias": null})).unwrap();
        let want = LoraSpec::simple(8, 8.0, Targets::Names(vec!["q_proj".into()]));
        assert_eq!(d, want);
    }

    #[test]
    fn bad_values_are_format_errors_naming_the_key() {
        let cases = [
            (json!([]), "not a JSON object (got an array)"),
            (json!({"r": "two"}), "r must be an integer, got \"two\""),
            (json!({"r": 0}), "r must be > 0, got 0"),
            (json!({"r": 2.5}), "r must be an integer"),
            (
                json!({"lora_alpha": -4}),
                "lora_alpha must be a finite number > 0",
            ),
            (json!({"lora_alpha": "8"}), "lora_alpha must be a number"),
            (
                json!({"lora_dropout": 1.0}),
                "lora_dropout must be in [0, 1)",
            ),
            (
                json!({"lora_dropout": "x"}),
                "lora_dropout must be a number",
            ),
            (
                json!({"use_rslora": "yes"}),
                "use_rslora must be true or false, got \"yes\"",
            ),
            (json!({"use_dora": 1}), "use_dora must be true or false"),
            (json!({"use_dora": true}), "use_dora is not supported"),
            (
                json!({"fan_in_fan_out": true}),
                "fan_in_fan_out is not supported",
            ),
            (
                json!({"peft_type": "IA3"}),
                "peft_type \"IA3\" is not \"LORA\"",
            ),
            (json!({"peft_type": 3}), "peft_type must be a string"),
            (json!({"bias": "all"}), "bias \"all\" is not supported"),
            (
                json!({"modules_to_save": ["lm_head"]}),
                "modules_to_save is not supported",
            ),
            (
                json!({"modules_to_save": "lm_head"}),
                "modules_to_save must be a list or null",
            ),
            (
                json!({"target_modules": 5}),
                "target_modules must be a list or a string",
            ),
            (
                json!({"target_modules": [1]}),
                "target_modules entry 1 is not a string",
            ),
            (
                json!({"target_modules": "("}),
                "target_modules regex \"(\" is invalid",
            ),
            (
                json!({"layers_to_transform": "0"}),
                "layers_to_transform must be an int",
            ),
            (
                json!({"layers_to_transform": [0.5]}),
                "layers_to_transform entry 0.5",
            ),
            (
                json!({"rank_pattern": []}),
                "rank_pattern must be an object",
            ),
            (
                json!({"rank_pattern": {"q": 0}}),
                "rank_pattern[\"q\"] must be an integer > 0",
            ),
            (
                json!({"rank_pattern": {"q": 1.5}}),
                "rank_pattern[\"q\"] must be an integer > 0",
            ),
            (
                json!({"rank_pattern": {"(": 2}}),
                "rank_pattern key \"(\" is not a valid regex",
            ),
            (
                json!({"alpha_pattern": {"q": "1"}}),
                "alpha_pattern[\"q\"] is not a number",
            ),
            (
                json!({"alpha_pattern": {"q": -1}}),
                "alpha_pattern[\"q\"] must be a finite number > 0",
            ),
        ];
        for (cfg, want) in cases {
            let msg = format_msg(cfg.clone());
            assert!(msg.contains(want), "{cfg}: {msg:?} lacks {want:?}");
        }
        // A long value is cut in the message.
        let long = "x".repeat(500);
        let msg = format_msg(json!({ "use_rslora": long }));
        assert!(msg.len() < 200 && msg.ends_with("..."), "{msg}");
    }
}
