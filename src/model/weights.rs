//! A Hugging Face checkpoint on disk: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; each tensor is copied once, straight
//! from the map into its libtorch tensor of the requested dtype and device.
use super::linear::{Quantize, Weight};
use crate::error::{Error, Result};
use crate::io::safetensors::MappedSafetensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// What a model's blocks load their weights from, by checkpoint key (`model.layers.0.mlp.up_proj.weight`):
/// a Hugging Face checkpoint ([`Checkpoint`]) or a GGUF file ([`super::gguf::GgufCheckpoint`]).
pub trait WeightSource {
    /// Whether the source holds `key`.
    fn contains(&self, key: &str) -> bool;

    /// Tensor `key` as float `kind` on `device`, checked to have `shape`.
    fn load(&self, key: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor>;

    /// Tensor `key` as [`load`](Self::load) gives it, but in memory of its own: nothing of the
    /// source stays referenced (so a model whose matrices are all quantized keeps no file mapped).
    fn load_owned(&self, key: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.load(key, shape, kind, device)
    }

    /// A frozen matrix (projection, embedding) as `quantize` says (each source decides what it
    /// keeps of its file: see the implementations).
    fn load_weight(
        &self,
        key: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        quantize: Quantize,
    ) -> Result<Weight>;

    /// Memory maps that zero-copy weights view (kept alive by the model).
    fn mappings(&self) -> Vec<std::sync::Arc<memmap2::MmapMut>> {
        Vec::new()
    }
}

/// The weight files of one checkpoint, indexed by tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedSafetensors>,
    index: HashMap<String, usize>,
    /// Per file: whether a zero-copy weight views its mapping (only those maps must be kept).
    viewed: Vec<AtomicBool>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                    path: index_path.clone(),
                    msg: format!("malformed index: {e}"),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Checkpoint {
                    path: index_path.clone(),
                    msg: "index has no \"weight_map\" object".into(),
                })?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            let mut names: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            for (name, shard) in names {
                let shard = shard.as_str().ok_or_else(|| Error::Checkpoint {
                    path: index_path.clone(),
                    msg: format!("weight_map[{name:?}] is not a file name"),
                })?;
                let id = match shard_ids.get(shard) {
                    Some(&id) => id,
                    None => {
                        files.push(MappedSafetensors::open_checkpoint(&dir.join(shard))?);
                        shard_ids.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                index.insert(name.clone(), id);
            }
        } else if single.is_file() {
            let file = MappedSafetensors::open_checkpoint(&single)?;
            for name in file.names()? {
                index.insert(name, 0);
            }
            files.push(file);
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            ));
        }
        let viewed = files.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            viewed,
        })
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// The memory maps that zero-copy weights loaded so far view: whoever keeps such weights must
    /// keep these. A file whose weights were all copied (e.g. converted to bf16) is not among
    /// them, so its mapping is released with the checkpoint.
    pub fn mappings(&self) -> Vec<std::sync::Arc<memmap2::MmapMut>> {
        self.files
            .iter()
            .zip(&self.viewed)
            .filter(|(_, v)| v.load(Ordering::Relaxed))
            .map(|(f, _)| f.mapping())
            .collect()
    }

    /// Tensor `name` as `kind` on `device`, checked to have `shape`. A CPU weight already of
    /// `kind` is a zero-copy view of the (private, copy-on-write) file mapping: keep
    /// [`mappings`](Self::mappings) alive as long as it; anything else is copied once.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.load_as(name, shape, kind, device, true)
    }

    /// [`load`](Self::load); with `keep_view = false` a zero-copy view is not recorded as one
    /// the model keeps (its caller copies it, e.g. into quantized blocks, and drops it), so the
    /// file's mapping is released with the checkpoint.
    fn load_as(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        keep_view: bool,
    ) -> Result<Tensor> {
        let &file = self.index.get(name).ok_or_else(|| Error::Checkpoint {
            path: self.dir.clone(),
            msg: format!("missing weight {name:?}"),
        })?;
        let view = if device == Device::Cpu {
            self.files[file].tensor_view(name)?
        } else {
            None
        };
        let t = match view {
            Some(v) if v.f_kind()? == kind => {
                if keep_view {
                    self.viewed[file].store(true, Ordering::Relaxed);
                }
                v
            }
            _ => self.files[file].tensor(name)?,
        };
        if t.size() != shape {
            return Err(Error::Checkpoint {
                path: self.files[file].path().to_path_buf(),
                msg: format!(
                    "{name} has shape {:?}, the config implies {shape:?}",
                    t.size()
                ),
            });
        }
        if !t.f_is_floating_point()? {
            return Err(Error::Checkpoint {
                path: self.files[file].path().to_path_buf(),
                msg: format!("{name} is not floating point"),
            });
        }
        Ok(t.f_to_device(device)?
            .f_to_kind(kind)?
            .set_requires_grad(false))
    }
}

impl WeightSource for Checkpoint {
    fn contains(&self, key: &str) -> bool {
        Checkpoint::contains(self, key)
    }

    fn load(&self, key: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        Checkpoint::load(self, key, shape, kind, device)
    }

    fn load_owned(&self, key: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let view = self.load_as(key, shape, kind, device, false)?;
        let mut owned = Tensor::f_empty_like(&view)?;
        owned.f_copy_(&view)?;
        Ok(owned)
    }

    /// A matrix quantized on load is copied into its blocks: its float view of the file is not
    /// kept, so the mapping is not either (the model holds the blocks only).
    fn load_weight(
        &self,
        key: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
        quantize: Quantize,
    ) -> Result<Weight> {
        let keep = !matches!(quantize, Quantize::To(_));
        quantize.apply(self.load_as(key, shape, kind, device, keep)?)
    }

    fn mappings(&self) -> Vec<std::sync::Arc<memmap2::MmapMut>> {
        Checkpoint::mappings(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_with_zero_copy_weights_stay_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]);
        crate::io::safetensors::save(
            &dir.path().join("model.safetensors"),
            &[("w".to_string(), w.shallow_clone())],
            &HashMap::new(),
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        // A bf16 load copies: nothing views the fp32 file, so its map need not be kept.
        let bf16 = ck.load("w", &[3, 4], Kind::BFloat16, Device::Cpu).unwrap();
        assert!(ck.mappings().is_empty());
        assert!(bf16.to_kind(Kind::Float).equal(&w));
        // A load in the file's dtype views the map: now it must be kept.
        let f32 = ck.load("w", &[3, 4], Kind::Float, Device::Cpu).unwrap();
        assert_eq!(ck.mappings().len(), 1);
        assert!(f32.equal(&w));
    }
}
