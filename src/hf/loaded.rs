//! A loaded model with its LoRA state: which modules carry adapters (a [`LoraSpec`]), whether
//! they are enabled or merged, training or evaluation mode; forward with input checks.
use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::lora::coverage::Coverage;
use crate::lora::peft_keys::{self, Factor};
use crate::lora::{Adapter, LoraSpec};
use crate::model::{
    CausalLm, Checkpoint, GgufCheckpoint, KvCache, LoraMode, ModelConfig, Quantize,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The load options as written: `torch_hf_load_model_lora`'s config dict, the CLI's flags.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// "cpu" (the default), "cuda[:N]", "mps".
    pub device: String,
    /// "float32" (the default), "bfloat16", "float16".
    pub dtype: String,
    /// How the frozen projections and embeddings are held: absent = as stored (float for a
    /// Hugging Face directory, a GGUF's block formats as they are), "none" = float (a GGUF
    /// decoded on load), "q8_0" / "q4_0" / "nf4" = quantized on load, decoded on use.
    pub quantize: Option<String>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: "float32".into(),
            quantize: None,
        }
    }
}

/// Where and in which dtype a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub kind: Kind,
    pub quantize: Quantize,
}

impl LoadOptions {
    /// Parses the device and dtype names ([`Error::Device`], [`Error::Dtype`] when unknown).
    pub fn parse(config: &LoadConfig) -> Result<Self> {
        Ok(Self {
            device: parse_device(&config.device)?,
            kind: parse_dtype(&config.dtype)?,
            quantize: Quantize::parse(config.quantize.as_deref())?,
        })
    }
}

/// A model in the registry.
#[derive(Debug)]
pub struct LoadedModel {
    pub lm: CausalLm,
    pub path: PathBuf,
    /// The adapters' layout, once LoRA is initialised.
    pub lora: Option<LoraSpec>,
    /// Adapters take part in forwards.
    pub enabled: bool,
    /// Adapters are folded into the base weights.
    pub merged: bool,
    /// Dropout active.
    pub training: bool,
}

impl LoadedModel {
    /// Loads `path`: a Hugging Face directory (config.json + safetensors weights), a GGUF file,
    /// or a Hub id in the local cache ([`crate::hf::hub_cache::resolve`]; `path` is then the
    /// snapshot directory).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        // A Hub id (`owner/name[@rev]`) that is not a path: its snapshot in the local cache.
        let resolved = crate::hf::hub_cache::resolve(path)?;
        let path = resolved.as_path();
        let lm = if path.is_file() {
            let ck = GgufCheckpoint::open(path)?;
            let config = ck.config()?;
            tch::no_grad(|| CausalLm::load(&ck, config, opts.kind, opts.device, opts.quantize))?
        } else if path.is_dir() {
            let config = ModelConfig::from_dir(path)?;
            let ck = Checkpoint::open(path)?;
            tch::no_grad(|| CausalLm::load(&ck, config, opts.kind, opts.device, opts.quantize))?
        } else {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model not found (a Hugging Face directory or a .gguf file)",
                ),
            ));
        };
        Ok(Self {
            lm,
            path: path.to_path_buf(),
            lora: None,
            enabled: true,
            merged: false,
            training: false,
        })
    }

    fn mode(&self) -> LoraMode {
        LoraMode {
            enabled: self.enabled,
            training: self.training,
        }
    }

    /// Turns activation checkpointing of the decoder layers on or off
    /// ([`CausalLm::set_gradient_checkpointing`]): forwards that record gradients keep only each
    /// layer's input and run the layer again in the backward.
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) {
        self.lm.set_gradient_checkpointing(enabled);
    }

    /// Checks `input_ids` (`[B, T]` or `[T]`, int64/int32, ids in `[0, vocab)`) and the optional
    /// `attention_mask` (same shape, 0/1); returns them as int64 `[B, T]` on the model's device.
    pub fn check_inputs(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let to_2d = |t: &Tensor, what: &str| -> Result<Tensor> {
            let kind = t.f_kind()?;
            if !matches!(kind, Kind::Int64 | Kind::Int | Kind::Bool)
                || (what == "input_ids" && kind == Kind::Bool)
            {
                return Err(Error::Dtype(format!(
                    "{what} must be int64 (or int32), got {}",
                    dtype_name(kind)
                )));
            }
            let t = match t.dim() {
                1 => t.f_unsqueeze(0)?,
                2 => t.shallow_clone(),
                d => {
                    return Err(Error::Shape(format!(
                        "{what} must be [batch, seq] or [seq], got {d}-D {:?}",
                        t.size()
                    )))
                }
            };
            if t.size()[1] == 0 || t.size()[0] == 0 {
                return Err(Error::Shape(format!("{what} is empty: {:?}", t.size())));
            }
            Ok(t.f_to_device(self.lm.device())?.f_to_kind(Kind::Int64)?)
        };
        let ids = to_2d(ids, "input_ids")?;
        self.lm
            .config
            .check_ids(&ids, "token ids", " (vocab_size)")?;
        let mask = match mask {
            Some(m) => {
                let m = to_2d(m, "attention_mask")?;
                if m.size() != ids.size() {
                    return Err(Error::Shape(format!(
                        "attention_mask {:?} does not match input_ids {:?}",
                        m.size(),
                        ids.size()
                    )));
                }
                let bad = m
                    .f_ne(0)?
                    .f_logical_and(&m.f_ne(1)?)?
                    .f_any()?
                    .f_int64_value(&[])?;
                if bad != 0 {
                    return Err(Error::Input("attention_mask must hold only 0 and 1".into()));
                }
                Some(m)
            }
            None => None,
        };
        Ok((ids, mask))
    }

    /// Logits `[B, T, vocab]` (LoRA applied per the current state).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (ids, mask) = self.check_inputs(ids, mask)?;
        let mask = self.training_mask(mask)?;
        self.lm.forward(&ids, mask.as_ref(), None, self.mode())
    }

    /// The attention mask a forward uses: none for a mask of ones when the forward records
    /// gradients into adapters. That changes nothing in the result (the positions and the causal
    /// attention are those of no mask) but lets attention take the trainer's fused causal kernel
    /// instead of libtorch's masked one. Other forwards keep the mask, so their results stay
    /// those of transformers bit for bit.
    fn training_mask(&self, mask: Option<Tensor>) -> Result<Option<Tensor>> {
        let Some(m) = mask else { return Ok(None) };
        let trains = self.enabled
            && !self.merged
            && crate::ops::checkpoint::grad_enabled()
            && self.lm.linears().iter().any(|(_, l)| {
                l.lora
                    .as_ref()
                    .is_some_and(|ad| ad.a.requires_grad() || ad.b.requires_grad())
            });
        if trains && m.f_ne(0)?.f_all()?.f_int64_value(&[])? != 0 {
            return Ok(None);
        }
        Ok(Some(m))
    }

    /// transformers' `model(input_ids, labels=labels, attention_mask=mask).loss`: the mean
    /// cross-entropy over the target tokens, `labels[:, t + 1]` the target of position `t`
    /// (shifted here), positions labelled [`IGNORE_INDEX`](crate::data::IGNORE_INDEX) left out;
    /// `labels` default to the input ids. As in transformers the attention mask does not mask the
    /// loss: padding counts unless labelled -100, and a padded batch runs as transformers' forward
    /// without position ids runs it (so the padding's own outputs are transformers'): positions
    /// count every column, and no query attends to a padding key ([`transformers_mask`]).
    /// Computed as the trainer's loss is ([`crate::train::loss::mean_loss`]): the head in chunks,
    /// no `[tokens, vocab]` logits; a float32 0-dim tensor whose backward reaches the adapters.
    pub fn loss(
        &self,
        ids: &Tensor,
        labels: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (ids, mask) = self.check_inputs(ids, mask)?;
        let labels = match labels {
            None => ids.shallow_clone(),
            Some(l) => {
                let kind = l.f_kind()?;
                if !matches!(kind, Kind::Int64 | Kind::Int) {
                    return Err(Error::Dtype(format!(
                        "labels must be int64 (or int32), got {}",
                        dtype_name(kind)
                    )));
                }
                let l = if l.dim() == 1 {
                    l.f_unsqueeze(0)?
                } else {
                    l.shallow_clone()
                };
                if l.size() != ids.size() {
                    return Err(Error::Shape(format!(
                        "labels {:?} do not match input_ids {:?}",
                        l.size(),
                        ids.size()
                    )));
                }
                l.f_to_device(self.lm.device())?.f_to_kind(Kind::Int64)?
            }
        };
        let mode = self.mode();
        let hidden = match self.training_mask(mask)? {
            None => self.lm.hidden_states(&ids, None, None, mode)?,
            Some(m) => {
                let positions = Tensor::f_arange(ids.size()[1], (Kind::Int64, ids.device()))?
                    .f_expand(ids.size(), false)?;
                let mask = transformers_mask(&m)?;
                self.lm
                    .hidden_states_packed(&ids, &positions, Some(&mask), mode)?
            }
        };
        crate::train::loss::mean_loss(&self.lm, &hidden, &labels, mode)
    }

    /// Logits for new tokens after `cache` (incremental decoding).
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.lm.forward(ids, mask, Some(cache), self.mode())
    }

    /// Logits `[B, vocab]` of the last position only, for new tokens after `cache` (the head runs
    /// on one row per sequence, as transformers' generation runs it).
    pub fn last_logits_cached(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let mode = self.mode();
        let h = self.lm.hidden_states(ids, mask, Some(cache), mode)?;
        let last = h.f_narrow(1, h.size()[1] - 1, 1)?;
        let logits = self
            .lm
            .softcap_logits(self.lm.lm_head.forward(&last, mode)?)?;
        Ok(logits.f_squeeze_dim(1)?)
    }

    /// Lays fresh adapters (A kaiming-uniform, B zeros) on the modules `spec` selects, in `kind`.
    /// Existing adapters are removed first (unmerged if needed).
    pub fn init_lora(&mut self, spec: LoraSpec, kind: Kind) -> Result<()> {
        let paths: Vec<String> = self.lm.linears().into_iter().map(|(p, _)| p).collect();
        let chosen = spec.select(&paths)?;
        if self.lm.config.tie_word_embeddings && chosen.iter().any(|p| p == "lm_head") {
            return Err(Error::Config(
                "lm_head is tied to embed_tokens in this model; adapting it is not supported"
                    .into(),
            ));
        }
        let configs = chosen
            .iter()
            .map(|p| spec.config_for(p))
            .collect::<Result<Vec<_>>>()?;
        let device = self.lm.device();
        let linears: HashMap<String, _> = self.lm.linears().into_iter().collect();
        let mut adapters = Vec::with_capacity(chosen.len());
        for (path, cfg) in chosen.iter().zip(&configs) {
            let lin = linears
                .get(path)
                .ok_or_else(|| Error::Config(format!("no module {path}")))?;
            adapters.push(Adapter::new(
                lin.in_features(),
                lin.out_features(),
                *cfg,
                kind,
                device,
            )?);
        }
        self.remove_lora()?;
        let mut adapters = adapters.into_iter();
        for (path, lin) in self.lm.linears_mut() {
            if chosen.contains(&path) {
                lin.lora = adapters.next();
            }
        }
        self.lora = Some(spec);
        self.enabled = true;
        Ok(())
    }

    /// The one-line summary of which modules have adapters (`LoRA on 30 layers x [q_proj ...]
    /// (120 modules)`) and, unless the spec's `layers` restricted them on purpose, the warning
    /// naming the layers a target missed. `None` without adapters.
    pub fn lora_coverage(&self) -> Option<(String, Option<String>)> {
        let spec = self.lora.as_ref()?;
        let linears = self.lm.linears();
        let coverage = Coverage::new(linears.iter().map(|(p, l)| (p.as_str(), l.lora.is_some())));
        let warning = if spec.layers.is_none() {
            coverage.warning()
        } else {
            None
        };
        Some((coverage.summary(), warning))
    }

    /// Removes every adapter (unmerging first).
    pub fn remove_lora(&mut self) -> Result<()> {
        for (_, lin) in self.lm.linears_mut() {
            lin.remove_lora()?;
        }
        self.lora = None;
        self.merged = false;
        Ok(())
    }

    fn require_lora(&self) -> Result<&LoraSpec> {
        self.lora.as_ref().ok_or_else(|| {
            Error::State("LoRA is not initialised on this model (call torch_hf_lora_init)".into())
        })
    }

    /// The live adapter tensors in a fixed order: by layer, then module (q, k, v, o, gate, up,
    /// down), A then B.
    pub fn parameters(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .named_parameters()?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// The live adapter tensors keyed by PEFT's file key names ([`peft_keys`]), same order as
    /// [`parameters`](Self::parameters).
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.require_lora()?;
        let mut out = Vec::new();
        for (path, lin) in self.lm.linears() {
            if let Some(ad) = &lin.lora {
                out.push((peft_keys::key(&path, Factor::A), ad.a.shallow_clone()));
                out.push((peft_keys::key(&path, Factor::B), ad.b.shallow_clone()));
            }
        }
        Ok(out)
    }

    /// Enables or disables the adapters. Disabling a merged model unmerges it first (as PEFT),
    /// so a disabled model always computes exactly the base model.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        self.require_lora()?;
        if !enabled && self.merged {
            self.unmerge()?;
        }
        self.enabled = enabled;
        Ok(())
    }

    /// Folds every adapter into its base weight (float32 math). All deltas are checked for
    /// NaN/Inf before any weight changes.
    pub fn merge(&mut self) -> Result<()> {
        self.require_lora()?;
        if self.merged {
            return Err(Error::State("the adapters are already merged".into()));
        }
        if !self.enabled {
            return Err(Error::State(
                "the adapters are disabled; enable them before merging".into(),
            ));
        }
        for (_, lin) in self.lm.linears() {
            lin.check_mergeable()?;
        }
        for (_, lin) in self.lm.linears_mut() {
            lin.merge()?;
        }
        self.merged = true;
        Ok(())
    }

    /// Takes the adapters back out of the base weights.
    pub fn unmerge(&mut self) -> Result<()> {
        self.require_lora()?;
        if !self.merged {
            return Err(Error::State("the adapters are not merged".into()));
        }
        for (_, lin) in self.lm.linears_mut() {
            lin.unmerge()?;
        }
        self.merged = false;
        Ok(())
    }

    /// Bytes of adapters (A, B and their gradients when allocated).
    pub fn adapter_bytes(&self) -> (i64, i64) {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as i64;
        let (mut params, mut grads) = (0, 0);
        for (_, lin) in self.lm.linears() {
            if let Some(ad) = &lin.lora {
                for t in [&ad.a, &ad.b] {
                    params += bytes(t);
                    let g = t.grad();
                    if g.defined() {
                        grads += bytes(&g);
                    }
                }
            }
        }
        (params, grads)
    }

    /// `[(part, bytes)]`: base weights, adapters, adapter gradients, and optimizer state.
    /// The model knows no optimizer: `optimizer_state_bytes` is given the data pointers of the
    /// adapters' tensors and returns the bytes of optimizer state kept for them (the caller owns
    /// the optimizers; one that trains none of these tensors adds 0).
    pub fn memory_report(
        &self,
        optimizer_state_bytes: impl FnOnce(&std::collections::HashSet<usize>) -> i64,
    ) -> Vec<(&'static str, i64)> {
        let (adapters, grads) = self.adapter_bytes();
        let ptrs: std::collections::HashSet<usize> = self
            .lm
            .linears()
            .into_iter()
            .filter_map(|(_, l)| l.lora.as_ref())
            .flat_map(|ad| [ad.a.data_ptr() as usize, ad.b.data_ptr() as usize])
            .collect();
        vec![
            ("weights", self.lm.weight_bytes()),
            ("adapters", adapters),
            ("adapter_grads", grads),
            ("optimizer_state", optimizer_state_bytes(&ptrs)),
        ]
    }
}

/// transformers' causal-and-padding mask `[B, 1, T, T]` (true = attend) for a `[B, T]` attention
/// mask: no query attends to a padding key, not even a padding query to itself (loratch's
/// [`crate::model::mask::attention_mask_4d`] lets it, which changes only the padding's outputs). A
/// query with no key left (left padding's first positions) attends to itself, as there, rather than
/// giving NaN.
fn transformers_mask(mask: &Tensor) -> Result<Tensor> {
    let t = mask.size()[1];
    let device = mask.device();
    let keys = mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
    let allowed = crate::ops::attention::causal_mask(0, t, None, device)?.f_logical_and(&keys)?;
    let lonely = allowed.f_any_dim(-1, true)?.f_logical_not()?;
    let own = Tensor::f_eye(t, (Kind::Bool, device))?;
    Ok(allowed.f_logical_or(&lonely.f_logical_and(&own)?)?)
}
