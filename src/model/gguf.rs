//! A GGUF file (llama.cpp, Ollama) as a model checkpoint: the `config.json` keys from its
//! `<arch>.*` metadata (`meta`), checkpoint keys from llama.cpp's tensor names
//! (`blk.0.attn_q.weight` → `model.layers.0.self_attn.q_proj.weight`, one table per architecture
//! in `arch`), llama.cpp's q/k row permutation of Llama weights and its `1 + w` Gemma norms
//! undone, and the frozen matrices kept in their stored block format unless asked otherwise.
mod arch;
mod meta;

pub use arch::{hf_key, llama_cpp_name, GgufArch};

use super::config::ModelConfig;
use super::linear::{Quantize, Weight};
use super::weights::WeightSource;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::ops::quant::QWeight;
use crate::quant::QType;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A GGUF file read as a checkpoint.
pub struct GgufCheckpoint {
    file: GgufFile,
    arch: GgufArch,
    /// Checkpoint key → GGUF tensor name.
    names: HashMap<String, String>,
    heads: i64,
    kv_heads: i64,
}

impl GgufCheckpoint {
    /// Opens `path` and checks that its architecture is one loratch builds.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch_name = file
            .get_str("general.architecture")?
            .ok_or_else(|| err(&file, "missing key general.architecture"))?
            .to_string();
        let arch = GgufArch::of(&arch_name).ok_or_else(|| {
            err(
                &file,
                &format!(
                    "unsupported architecture {arch_name:?} (general.architecture); loratch reads {}",
                    GgufArch::ALL.map(|a| format!("{:?}", a.name())).join(", ")
                ),
            )
        })?;
        if let Some(msg) = meta::unsupported(&file, arch)? {
            return Err(err(&file, &msg));
        }
        let names = file
            .tensors()
            .iter()
            .filter_map(|t| Some((hf_key(arch, &t.name)?, t.name.clone())))
            .collect();
        let heads = req_u64(&file, &format!("{arch_name}.attention.head_count"))? as i64;
        let kv_heads = file
            .get_u64(&format!("{arch_name}.attention.head_count_kv"))?
            .map_or(heads, |v| v as i64);
        Ok(Self {
            file,
            arch,
            names,
            heads,
            kv_heads,
        })
    }

    /// The file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The file's architecture.
    pub fn arch(&self) -> GgufArch {
        self.arch
    }

    /// The model's `config.json`, as transformers builds it for this GGUF.
    pub fn config_json(&self) -> Result<Value> {
        meta::config_json(&self.file, self.arch, self.heads, self.kv_heads)
    }

    /// The model's configuration (checked as a `config.json` is; errors name the file).
    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_json(&self.config_json()?.to_string()).map_err(|e| match e {
            Error::Config(msg) => err(&self.file, &format!("metadata: {msg}")),
            other => other,
        })
    }

    /// The GGUF name behind checkpoint key `key`, with its `[out, in]` (or `[n]`) shape.
    fn tensor(&self, key: &str, shape: &[i64]) -> Result<(&str, QType)> {
        let name = self
            .names
            .get(key)
            .ok_or_else(|| err(&self.file, &format!("missing tensor for {key}")))?;
        let info = self
            .file
            .tensor(name)
            .ok_or_else(|| err(&self.file, &format!("missing tensor {name}")))?;
        let stored: Vec<i64> = info.dims.iter().rev().map(|&d| d as i64).collect();
        if stored != shape {
            return Err(err(
                &self.file,
                &format!("tensor {name} has shape {stored:?}, the metadata implies {shape:?}"),
            ));
        }
        Ok((name.as_str(), info.ty))
    }

    /// For q/k projections (weight and bias) of a permuted family: HF row `r` is GGUF row `perm[r]`.
    fn row_permutation(&self, key: &str, rows: i64) -> Option<Vec<usize>> {
        if !self.arch.permuted() {
            return None;
        }
        let module = key.rsplit_once('.').map_or(key, |(m, _)| m);
        let heads = if module.ends_with("self_attn.q_proj") {
            self.heads
        } else if module.ends_with("self_attn.k_proj") {
            self.kv_heads
        } else {
            return None;
        };
        let d = rows / heads;
        let half = d / 2;
        // llama.cpp writes HF row (h, part, i) of `(heads, 2, d/2)` at (h, i, part).
        Some(
            (0..rows)
                .map(|r| {
                    let (h, j) = (r / d, r % d);
                    let (part, i) = (j / half, j % half);
                    (h * d + 2 * i + part) as usize
                })
                .collect(),
        )
    }
}

pub(super) fn err(file: &GgufFile, msg: &str) -> Error {
    Error::Checkpoint {
        path: file.path().to_path_buf(),
        msg: msg.to_string(),
    }
}

pub(super) fn req_u64(file: &GgufFile, key: &str) -> Result<u64> {
    file.get_u64(key)?
        .ok_or_else(|| err(file, &format!("missing key {key}")))
}

impl WeightSource for GgufCheckpoint {
    fn contains(&self, key: &str) -> bool {
        self.names.contains_key(key)
    }

    fn load(&self, key: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let (name, _) = self.tensor(key, shape)?;
        let mut values = self.file.dequantize(name)?;
        if let Some(offset) = self.arch.stored_offset(name) {
            // In float32, as transformers subtracts from the dequantized array.
            values.iter_mut().for_each(|v| *v -= offset);
        }
        let t = Tensor::f_from_slice(&values)?.f_reshape(shape)?;
        let t = match self.row_permutation(key, shape[0]) {
            Some(perm) => {
                let idx: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
                t.f_index_select(0, &Tensor::f_from_slice(&idx)?)?
            }
            None => t,
        };
        Ok(t.f_to_device(device)?.f_to_kind(kind)?)
    }

    fn load_weight(
        &self,
        key: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        quantize: Quantize,
    ) -> Result<Weight> {
        let (name, ty) = self.tensor(key, shape)?;
        let float = matches!(ty, QType::F32 | QType::F16 | QType::BF16);
        let keep = match quantize {
            Quantize::Stored => !float,
            Quantize::Float => false,
            Quantize::To(want) => want == ty,
        };
        if !keep || shape.len() != 2 || self.arch.stored_offset(name).is_some() {
            return quantize.apply(self.load(key, shape, kind, device)?);
        }
        let bytes = self.file.tensor_bytes(name)?;
        let blocks = match self.row_permutation(key, shape[0]) {
            Some(perm) => {
                let row = ty.row_bytes(shape[1] as usize)?;
                let mut out = Vec::with_capacity(bytes.len());
                for p in perm {
                    out.extend_from_slice(&bytes[p * row..(p + 1) * row]);
                }
                std::borrow::Cow::Owned(out)
            }
            None => std::borrow::Cow::Borrowed(bytes),
        };
        let q = QWeight::from_blocks(&blocks, ty, shape[0], shape[1], kind, device)
            .map_err(|e| err(&self.file, &format!("tensor {name}: {e}")))?;
        Ok(Weight::Quantized(q))
    }
}

#[cfg(test)]
mod tests;
