//! Adapter files in Hugging Face PEFT's format, so adapters move between loratch, PEFT,
//! transformers and serving stacks: a directory with `adapter_config.json` +
//! `adapter_model.safetensors`, or one `.safetensors` file carrying the config in its metadata.
//! Tensor keys are PEFT's ([`peft_keys`]), float32 on disk; the config is [`AdapterConfig`].
//! Unlike PEFT, loading is strict: a missing, unexpected or mis-shaped tensor is an error.
use super::loaded::LoadedModel;
use crate::advice::Caller;
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::safetensors::{serialize, MappedSafetensors};
use crate::lora::peft_config::{spec_from_json, AdapterConfig};
use crate::lora::peft_keys::{self, Factor};
use crate::lora::LoraSpec;
use serde_json::Value;
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
    /// A llama.cpp LoRA adapter (`.gguf`; written only, see [`crate::model::llamacpp::adapter`]).
    Gguf,
}

impl Layout {
    /// By extension: `.safetensors`, `.pt`/`.pth`/`.bin`, `.gguf`, anything else a directory.
    pub fn of(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("safetensors") => Self::Safetensors,
            Some("pt" | "pth" | "bin") => Self::Torch,
            Some("gguf") => Self::Gguf,
            _ => Self::Directory,
        }
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
    let config = AdapterConfig::from_spec(spec, &model.path);
    let json = |text: serde_json::Result<String>| text.map_err(|e| Error::Config(e.to_string()));
    match Layout::of(path) {
        Layout::Directory => {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            write_atomic(&path.join(WEIGHTS_FILE), &serialize(&tensors, &meta)?)?;
            let text = json(serde_json::to_string_pretty(&config))?;
            write_atomic(&path.join(CONFIG_FILE), text.as_bytes())
        }
        Layout::Safetensors => {
            let meta = HashMap::from([
                ("format".to_string(), "pt".to_string()),
                (
                    "adapter_config".to_string(),
                    json(serde_json::to_string(&config))?,
                ),
            ]);
            write_atomic(path, &serialize(&tensors, &meta)?)
        }
        // The tensors as PEFT's adapter_model.bin, plus the config in a record of its own that
        // torch.load ignores, so the file alone loads into a fresh model.
        Layout::Torch => crate::io::torch_pickle::write_state_dict_with(
            path,
            &tensors,
            &[(
                CONFIG_FILE,
                json(serde_json::to_string_pretty(&config))?.into_bytes(),
            )],
        ),
        Layout::Gguf => crate::model::llamacpp::save_adapter(&model.lm, &model.path, path),
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
        Layout::Gguf => Err(Error::adapter(
            path,
            "a llama.cpp adapter GGUF is an export format: loratch writes it but loads adapters \
             from PEFT directories, .safetensors and .pt files",
        )),
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
            // Written by loratch: the config inside the file.
            if let Some(text) =
                crate::io::torch_pickle::read_extra_record(path, CONFIG_FILE, 1 << 20)?
            {
                let text = String::from_utf8(text)
                    .map_err(|_| Error::adapter(path, format!("{CONFIG_FILE} is not UTF-8")))?;
                return Ok(AdapterFile {
                    config: Some((parse(&text, path)?, path.to_path_buf())),
                    tensors: read_torch(path)?,
                });
            }
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
    load_for(model, path, Caller::Python)
}

/// As [`load`], with advice in `caller`'s words (the CLI has no `torch_hf_lora_init`).
pub fn load_for(model: &mut LoadedModel, path: &Path, caller: Caller) -> Result<()> {
    if model.merged {
        return Err(Error::State(
            "the adapters are merged; unmerge before loading others".into(),
        ));
    }
    let file = read(path)?;
    let bad = |m: String| Error::adapter(path, m);
    let spec = file_spec(&file, model.lora.as_ref(), path, caller)?;
    // Module path -> (in_features, out_features), built once.
    let linears = model.lm.linears();
    let paths: Vec<String> = linears.iter().map(|(p, _)| p.clone()).collect();
    let features: HashMap<&str, (i64, i64)> = linears
        .iter()
        .map(|(p, l)| (p.as_str(), (l.in_features(), l.out_features())))
        .collect();
    let chosen = spec.select(&paths).map_err(|e| bad(e.to_string()))?;
    let mut expected = BTreeMap::new();
    for p in &chosen {
        let cfg = spec.config_for(p)?;
        let (in_f, out_f) = *features
            .get(p.as_str())
            .ok_or_else(|| bad(format!("no module {p}")))?;
        expected.insert(peft_keys::key(p, Factor::A), vec![cfg.rank, in_f]);
        expected.insert(peft_keys::key(p, Factor::B), vec![out_f, cfg.rank]);
    }
    check_tensors(&file.tensors, &expected, path)?;
    match &model.lora {
        Some(current) => {
            let current_chosen = current.select(&paths)?;
            let same = current_chosen == chosen
                && chosen.iter().all(|p| {
                    matches!((current.config_for(p), spec.config_for(p)),
                        (Ok(a), Ok(b)) if a.rank == b.rank && a.alpha == b.alpha && a.use_rslora == b.use_rslora)
                });
            if !same {
                let advice = match caller {
                    Caller::Python => "re-initialise with torch_hf_lora_init or load into a fresh model",
                    Caller::Cli => "set the config's [lora] rank, alpha, target_modules and use_rslora to the adapter's",
                };
                return Err(bad(format!(
                    "the adapter's layout (modules, rank, alpha, use_rslora) disagrees with the LoRA \
                     initialised on this model; {advice}"
                )));
            }
        }
        None => model.init_lora(spec.clone(), Kind::Float)?,
    }
    tch::no_grad(|| -> Result<()> {
        for (p, lin) in model.lm.linears_mut() {
            if let Some(ad) = lin.lora.as_mut() {
                ad.a.f_copy_(&file.tensors[&peft_keys::key(&p, Factor::A)])?;
                ad.b.f_copy_(&file.tensors[&peft_keys::key(&p, Factor::B)])?;
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

/// The spec of the adapter in `file` (read from `path`): its config's, or, for a bare `.pt`
/// file without one, the LoRA already on the model (`current`), which the file must fit.
fn file_spec(
    file: &AdapterFile,
    current: Option<&LoraSpec>,
    path: &Path,
    caller: Caller,
) -> Result<LoraSpec> {
    match (&file.config, current) {
        (Some((cfg, source)), _) => {
            // target_modules null (PEFT's per-model default): the modules present in the file.
            let in_file: BTreeSet<&str> = file
                .tensors
                .keys()
                .filter_map(|k| match peft_keys::parse(k)? {
                    (module, Factor::A) => Some(module),
                    (_, Factor::B) => None,
                })
                .collect();
            let fallback = in_file.into_iter().map(str::to_owned).collect();
            spec_from_json(cfg, fallback, source)
        }
        (None, Some(current)) => Ok(current.clone()),
        (None, None) => Err(Error::adapter(
            path,
            match caller {
                Caller::Python => {
                    "a .pt/.pth/.bin adapter has no config (rank, alpha); initialise LoRA with \
                     torch_hf_lora_init first, or load a PEFT directory / .safetensors file"
                }
                Caller::Cli => {
                    "a .pt/.pth/.bin adapter has no config (rank, alpha), which --adapter needs: \
                     give a PEFT directory (adapter_config.json) or a .safetensors adapter"
                }
            },
        )),
    }
}

/// Checks that `tensors` are exactly the `expected` keys, each of its shape, floating-point and
/// finite; errors are [`Error::AdapterFormat`] for `path`.
fn check_tensors(
    tensors: &BTreeMap<String, Tensor>,
    expected: &BTreeMap<String, Vec<i64>>,
    path: &Path,
) -> Result<()> {
    let bad = |m: String| Error::adapter(path, m);
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .collect();
    let unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(bad(format!(
            "tensors do not match the adapter config for this model: missing {missing:?}, unexpected {unexpected:?}"
        )));
    }
    for (k, shape) in expected {
        let t = &tensors[k];
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
    Ok(())
}
