//! A projection of the model (`q_proj`, `down_proj`, ...): frozen weight (float, or kept in a
//! block-quantized format and decoded on use) and bias, plus an optional LoRA adapter that can be
//! enabled, disabled, merged and unmerged.
use super::loader::Loader;
use crate::error::{Error, Result};
use crate::lora::Adapter;
use crate::ops::quant::QWeight;
use crate::quant::QType;
use tch::{Kind, Tensor};

/// How the frozen projections and embeddings of a model are held: the load option `quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// As the checkpoint stores them: float for safetensors, a GGUF's block formats as they are.
    #[default]
    Stored,
    /// Float (`"none"`): a GGUF's blocks are decoded on load.
    Float,
    /// Quantized on load into this block format (`"q8_0"`, `"q4_0"`, `"nf4"`).
    To(QType),
}

impl Quantize {
    /// The names `quantize` takes.
    pub const NAMES: [&'static str; 4] = ["none", "q8_0", "q4_0", "nf4"];

    /// `None` (the option absent) is [`Quantize::Stored`]; an unknown name is an
    /// [`Error::Config`] listing the known ones.
    pub fn parse(name: Option<&str>) -> Result<Self> {
        Ok(match name {
            None => Quantize::Stored,
            Some("none") => Quantize::Float,
            Some("q8_0") => Quantize::To(QType::Q8_0),
            Some("q4_0") => Quantize::To(QType::Q4_0),
            Some("nf4") => Quantize::To(QType::Nf4),
            Some(other) => {
                return Err(Error::Config(format!(
                    "unknown quantize {other:?}; loratch has {}",
                    Self::NAMES.map(|n| format!("{n:?}")).join(", ")
                )))
            }
        })
    }

    /// A float weight as this policy holds it.
    pub fn apply(self, dense: Tensor) -> Result<Weight> {
        Ok(match self {
            Quantize::To(ty) => Weight::Quantized(QWeight::quantize(&dense, ty)?),
            Quantize::Stored | Quantize::Float => Weight::Dense(dense),
        })
    }
}

/// A frozen `[out, in]` weight: a float tensor, or blocks decoded on use (QLoRA's layout: the
/// adapter stays float).
#[derive(Debug)]
pub enum Weight {
    Dense(Tensor),
    Quantized(QWeight),
}

impl Weight {
    /// `[out, in]`.
    pub fn size(&self) -> [i64; 2] {
        match self {
            Weight::Dense(t) => {
                let s = t.size();
                [s[0], s[1]]
            }
            Weight::Quantized(q) => q.size(),
        }
    }

    /// The dtype of the weight's products (a quantized weight computes in the model's dtype).
    pub fn kind(&self) -> Kind {
        match self {
            Weight::Dense(t) => t.kind(),
            Weight::Quantized(q) => q.kind(),
        }
    }

    /// The float tensor: the weight itself, or its blocks decoded (a new tensor).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.shallow_clone()),
            Weight::Quantized(q) => q.dequantize(q.kind()),
        }
    }

    /// The dense tensor, if the weight is one.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quantized(_) => None,
        }
    }

    /// The same weight, sharing its storage.
    pub fn shallow_clone(&self) -> Self {
        match self {
            Weight::Dense(t) => Weight::Dense(t.shallow_clone()),
            Weight::Quantized(q) => Weight::Quantized(q.shallow_clone()),
        }
    }

    /// Bytes held, and the storage's address (to count shared storage once).
    pub fn bytes_and_ptr(&self) -> (i64, usize) {
        match self {
            Weight::Dense(t) => (
                (t.numel() * t.kind().elt_size_in_bytes()) as i64,
                t.data_ptr() as usize,
            ),
            Weight::Quantized(q) => (q.bytes(), q.data_ptr()),
        }
    }

    /// The block format's name ("q4_0", ...), or `None` for a float weight.
    pub fn quantization(&self) -> Option<&'static str> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quantized(q) => Some(q.qtype().name()),
        }
    }
}

/// How adapters take part in a forward.
#[derive(Debug, Clone, Copy)]
pub struct LoraMode {
    /// Adapters add their term (unless merged).
    pub enabled: bool,
    /// Dropout active.
    pub training: bool,
}

/// A linear layer of the checkpoint with an optional adapter.
#[derive(Debug)]
pub struct Linear {
    /// `<path>.weight`, `[out, in]`, frozen.
    pub weight: Weight,
    /// `<path>.bias`, `[out]`, frozen.
    pub bias: Option<Tensor>,
    /// The adapter, when LoRA targets this module.
    pub lora: Option<Adapter>,
    /// Whether the adapter is folded into `weight`.
    pub merged: bool,
}

impl Linear {
    /// Loads `<path>.weight` `[out, in]` (and `<path>.bias` when `bias`).
    pub fn load(vb: &Loader, in_f: i64, out_f: i64, bias: bool) -> Result<Self> {
        let weight = vb.weight("weight", &[out_f, in_f])?;
        let bias = if bias {
            Some(vb.tensor("bias", &[out_f])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
            merged: false,
        })
    }

    /// A linear over an existing weight (the tied output head).
    pub fn from_weight(weight: Weight) -> Self {
        Self {
            weight,
            bias: None,
            lora: None,
            merged: false,
        }
    }

    /// The same projection over the same tensors (the adapter's included).
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            lora: self.lora.as_ref().map(crate::lora::Adapter::shallow_clone),
            merged: self.merged,
        }
    }

    /// `in_features`.
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    /// `out_features`.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x W^T + b`, plus the adapter's term when enabled and not merged
    /// ([`crate::ops::lora_linear`]); without an active adapter [`crate::ops::frozen_linear`].
    ///
    /// A quantized weight's base product is [`QWeight::linear`]; the adapter's term is added in
    /// PEFT's steps ([`crate::ops::linear::quantized_lora_linear`]).
    pub fn forward(&self, x: &Tensor, mode: LoraMode) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        match (&self.weight, &self.lora) {
            (Weight::Dense(w), Some(ad)) if mode.enabled && !self.merged => {
                ad.forward_with_base(x, w, bias, mode.training)
            }
            (Weight::Dense(w), _) => crate::ops::frozen_linear(x, w, bias),
            (Weight::Quantized(q), Some(ad)) if mode.enabled && !self.merged => {
                let base = q.linear(x, bias)?;
                crate::ops::linear::add_lora_term(x, &base, &ad.term(), mode.training)
            }
            (Weight::Quantized(q), _) => q.linear(x, bias),
        }
    }

    /// Folds the adapter into the weight (no-op without adapter or when merged). A quantized
    /// weight is decoded to a float one first: the merged weight is `dequantized + delta`, which
    /// no block format holds exactly (it stays float after an unmerge too).
    pub fn merge(&mut self) -> Result<()> {
        if let (Some(ad), false) = (&self.lora, self.merged) {
            ad.delta_f32().map(drop)?;
            if let Weight::Quantized(q) = &self.weight {
                self.weight = Weight::Dense(q.dequantize(q.kind())?);
            }
            if let Weight::Dense(w) = &mut self.weight {
                ad.add_delta_to(w, 1.0)?;
            }
            self.merged = true;
        }
        Ok(())
    }

    /// Takes the adapter back out of the weight (no-op when not merged).
    pub fn unmerge(&mut self) -> Result<()> {
        if let (Some(ad), true, Weight::Dense(w)) = (&self.lora, self.merged, &mut self.weight) {
            ad.add_delta_to(w, -1.0)?;
            self.merged = false;
        }
        Ok(())
    }

    /// Checks that merging would succeed (finite delta) without changing anything.
    pub fn check_mergeable(&self) -> Result<()> {
        match &self.lora {
            Some(ad) if !self.merged => ad.delta_f32().map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Removes the adapter (unmerging first).
    pub fn remove_lora(&mut self) -> Result<()> {
        self.unmerge()?;
        self.lora = None;
        Ok(())
    }
}
