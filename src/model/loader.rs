//! Loading a model's blocks by checkpoint path: a [`Loader`] carries the checkpoint, the weights'
//! dtype and device, and a key prefix that [`Loader::pp`] extends one segment at a time, as the
//! checkpoint keys nest (`model.layers.0` → `.pp("self_attn")` → `.pp("q_proj")`). Each block's
//! `load` then names only its own tensors.
use super::linear::{Quantize, Weight};
use super::weights::WeightSource;
use crate::error::Result;
use std::fmt::Display;
use tch::{Device, Kind, Tensor};

/// A checkpoint seen from one module path.
#[derive(Clone)]
pub struct Loader<'a> {
    ck: &'a dyn WeightSource,
    prefix: String,
    /// How frozen matrices are held ([`Loader::weight`]).
    pub quantize: Quantize,
    /// The dtype every weight is loaded in.
    pub kind: Kind,
    /// The device every weight is loaded on.
    pub device: Device,
}

impl<'a> Loader<'a> {
    /// The checkpoint's root (no prefix).
    pub fn new(ck: &'a dyn WeightSource, kind: Kind, device: Device, quantize: Quantize) -> Self {
        Self {
            ck,
            prefix: String::new(),
            quantize,
            kind,
            device,
        }
    }

    /// The sub-module `segment` of this path (`"model"`, `"layers"`, `0`, `"q_proj"`).
    pub fn pp(&self, segment: impl Display) -> Self {
        Self {
            prefix: self.key(&segment.to_string()),
            ..self.clone()
        }
    }

    /// This loader's module path (the checkpoint key without the tensor name).
    pub fn path(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The tensor `<path>.<name>`, checked to have `shape`, in the loader's dtype and device.
    ///
    /// When the matrices are quantized on load the tensor is a copy: the model then keeps no view
    /// of the checkpoint's files, whose mapped pages would otherwise stay resident.
    pub fn tensor(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let key = self.key(name);
        match self.quantize {
            Quantize::To(_) => self.ck.load_owned(&key, shape, self.kind, self.device),
            _ => self.ck.load(&key, shape, self.kind, self.device),
        }
    }

    /// The frozen matrix `<path>.<name>` (a projection's or the embedding's), float or in a block
    /// format as the loader's [`Quantize`] says.
    pub fn weight(&self, name: &str, shape: &[i64]) -> Result<Weight> {
        self.ck.load_weight(
            &self.key(name),
            shape,
            self.kind,
            self.device,
            self.quantize,
        )
    }

    /// Whether the checkpoint has `<path>.<name>`.
    pub fn contains(&self, name: &str) -> bool {
        self.ck.contains(&self.key(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Checkpoint;
    use std::collections::HashMap;

    #[test]
    fn paths_join_like_checkpoint_keys() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        crate::io::safetensors::save(
            &dir.path().join("model.safetensors"),
            &[(
                "model.layers.0.mlp.up_proj.weight".to_string(),
                w.shallow_clone(),
            )],
            &HashMap::new(),
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let root = Loader::new(&ck, Kind::Float, Device::Cpu, Quantize::Stored);
        let up = root.pp("model").pp("layers").pp(0).pp("mlp").pp("up_proj");
        assert_eq!(up.path(), "model.layers.0.mlp.up_proj");
        assert!(up.contains("weight") && !up.contains("bias"));
        assert!(up.tensor("weight", &[2, 3]).unwrap().equal(&w));
        let err = up.tensor("weight", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.mlp.up_proj.weight"), "{err}");
        assert!(root.pp("lm_head").tensor("weight", &[2, 3]).is_err());
    }
}
