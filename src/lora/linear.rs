//! `LoraLinear`: a frozen linear layer `y = x W^T + b` plus one LoRA adapter, with merge/unmerge.
use super::adapter::Adapter;
use super::config::LoraConfig;
use crate::device::dtype_name;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// A linear layer with a LoRA adapter (the spec's "Basic LoRA API").
#[derive(Debug)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Adapter,
    merged: bool,
    training: bool,
}

impl LoraLinear {
    /// A new layer whose base weight and bias are initialised as `torch.nn.Linear` does
    /// (U(-1/sqrt(in), 1/sqrt(in))) and frozen; the adapter is fresh (B = 0).
    pub fn new(
        in_features: i64,
        out_features: i64,
        config: LoraConfig,
        bias: bool,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        check_floating(kind)?;
        let adapter = Adapter::new(in_features, out_features, config, kind, device)?;
        let bound = 1.0 / (in_features as f64).sqrt();
        let uniform = |shape: &[i64]| -> Result<Tensor> {
            let mut t = Tensor::f_empty(shape, (Kind::Float, device))?;
            let _ = tch::no_grad(|| t.f_uniform_(-bound, bound))?;
            Ok(t.f_to_kind(kind)?)
        };
        let weight = uniform(&[out_features, in_features])?;
        let bias = if bias {
            Some(uniform(&[out_features])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            adapter,
            merged: false,
            training: true,
        })
    }

    /// Wraps an existing weight `[out, in]` and optional bias `[out]`. The tensors are shared, not
    /// copied (merging writes into them) and are frozen (`requires_grad` set to false) as PEFT
    /// does. The adapter takes the weight's dtype and device.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>, config: LoraConfig) -> Result<Self> {
        let size = weight.size();
        if size.len() != 2 {
            return Err(Error::Shape(format!(
                "linear weight must be 2-D [out, in], got {size:?}"
            )));
        }
        let kind = weight.f_kind()?;
        check_floating(kind)?;
        let (out_features, in_features) = (size[0], size[1]);
        if let Some(b) = &bias {
            if b.size() != [out_features] {
                return Err(Error::Shape(format!(
                    "bias must be [{out_features}], got {:?}",
                    b.size()
                )));
            }
            if b.f_kind()? != kind {
                return Err(Error::Dtype(format!(
                    "bias dtype {} differs from weight dtype {}",
                    dtype_name(b.f_kind()?),
                    dtype_name(kind)
                )));
            }
        }
        let adapter = Adapter::new(in_features, out_features, config, kind, weight.device())?;
        let weight = weight.set_requires_grad(false);
        let bias = bias.map(|b| b.set_requires_grad(false));
        Ok(Self {
            weight,
            bias,
            adapter,
            merged: false,
            training: true,
        })
    }

    /// `y = x W^T + b + scaling * B(A(dropout(x)))`; after a merge, `x W'^T + b` only.
    /// `x` may have any number of leading batch dimensions; its last must be `in_features`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        if self.merged {
            return Ok(x.f_linear(&self.weight, self.bias.as_ref())?);
        }
        self.adapter
            .forward_with_base(x, &self.weight, self.bias.as_ref(), self.training)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        if !x.defined() {
            return Err(Error::Shape("input tensor is undefined".into()));
        }
        let size = x.size();
        if size.last() != Some(&self.in_features()) {
            return Err(Error::Shape(format!(
                "input's last dimension must be in_features={}, got shape {size:?}",
                self.in_features()
            )));
        }
        let (kind, want) = (x.f_kind()?, self.weight.f_kind()?);
        if kind != want {
            return Err(Error::Dtype(format!(
                "input dtype {} does not match the layer's dtype {}",
                dtype_name(kind),
                dtype_name(want)
            )));
        }
        if x.device() != self.weight.device() {
            return Err(Error::Device(format!(
                "input is on {:?} but the layer is on {:?}",
                x.device(),
                self.weight.device()
            )));
        }
        Ok(())
    }

    /// Folds the adapter into the weight: `W += scaling * B @ A` (float32 math). Errors if
    /// already merged, or if the delta is not finite (then `W` is untouched).
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Err(Error::State(
                "the adapter is already merged into the weight".into(),
            ));
        }
        self.adapter.add_delta_to(&mut self.weight, 1.0)?;
        self.merged = true;
        Ok(())
    }

    /// Undoes [`merge`](Self::merge): `W -= scaling * B @ A`. Errors if not merged.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(Error::State("the adapter is not merged".into()));
        }
        self.adapter.add_delta_to(&mut self.weight, -1.0)?;
        self.merged = false;
        Ok(())
    }

    /// Training mode (dropout active) or evaluation mode.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether dropout is active.
    pub fn training(&self) -> bool {
        self.training
    }

    /// Whether the adapter is currently folded into the weight.
    pub fn merged(&self) -> bool {
        self.merged
    }

    /// The (frozen) base weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The (frozen) bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter (A, B, config).
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// The adapter, mutably (loading adapter files writes into A and B in place).
    pub fn adapter_mut(&mut self) -> &mut Adapter {
        &mut self.adapter
    }

    /// The live trainable tensors `[A, B]` (handles sharing storage and autograd state).
    pub fn trainable_params(&self) -> Vec<Tensor> {
        vec![
            self.adapter.a.shallow_clone(),
            self.adapter.b.shallow_clone(),
        ]
    }

    /// Input width.
    pub fn in_features(&self) -> i64 {
        self.adapter.in_features()
    }

    /// Output width.
    pub fn out_features(&self) -> i64 {
        self.adapter.out_features()
    }

    /// The adapter's hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.adapter.config
    }
}

fn check_floating(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => Ok(()),
        other => Err(Error::Dtype(format!(
            "LoRA layers need a floating dtype, got {}",
            dtype_name(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layer(i: i64, o: i64, r: i64, alpha: f64) -> LoraLinear {
        LoraLinear::new(
            i,
            o,
            LoraConfig::new(r, alpha, 0.0, false).unwrap(),
            true,
            Kind::Float,
            Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn fresh_adapter_changes_nothing() {
        let l = layer(8, 5, 4, 8.0);
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let base = x.linear(l.weight(), l.bias());
        assert_eq!(
            crate::testing::max_diff(&l.forward(&x).unwrap(), &base),
            0.0
        );
    }

    #[test]
    fn wrong_inputs_are_typed_errors() {
        let l = layer(8, 5, 4, 8.0);
        let x = Tensor::randn([3, 7], (Kind::Float, Device::Cpu));
        assert!(matches!(l.forward(&x), Err(Error::Shape(_))));
        let x = Tensor::randn([3, 8], (Kind::Double, Device::Cpu));
        assert!(matches!(l.forward(&x), Err(Error::Dtype(_))));
    }

    #[test]
    fn merging_twice_or_unmerging_unmerged_is_an_error() {
        let mut l = layer(4, 4, 2, 2.0);
        assert!(matches!(l.unmerge(), Err(Error::State(_))));
        l.merge().unwrap();
        assert!(matches!(l.merge(), Err(Error::State(_))));
    }

    #[test]
    fn non_finite_delta_leaves_weight_untouched() {
        let mut l = layer(4, 3, 2, 2.0);
        let before = l.weight().copy();
        let _ = tch::no_grad(|| l.adapter_mut().b.fill_(f64::NAN));
        assert!(matches!(l.merge(), Err(Error::NonFinite(_))));
        assert!(!l.merged());
        assert_eq!(crate::testing::max_diff(l.weight(), &before), 0.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn forward_matches_formula_and_merge_roundtrips(
            i in 1i64..24, o in 1i64..24, r in 1i64..8, alpha in 0.5f64..64.0, batch in 1i64..5, seed: u32,
        ) {
            tch::manual_seed(seed as i64);
            let mut l = layer(i, o, r, alpha);
            tch::no_grad(|| { let _ = l.adapter_mut().b.normal_(0.0, 0.1); });
            let x = Tensor::randn([batch, 2, i], (Kind::Float, Device::Cpu));
            let s = alpha / r as f64;
            let a = &l.adapter().a; let b = &l.adapter().b;
            let expected = x.matmul(&l.weight().tr()) + l.bias().unwrap()
                + x.matmul(&a.tr()).matmul(&b.tr()) * s;
            let y = l.forward(&x).unwrap();
            prop_assert!(crate::testing::max_diff(&y, &expected) <= 1e-4);
            let w0 = l.weight().copy();
            l.merge().unwrap();
            prop_assert!(crate::testing::max_diff(&l.forward(&x).unwrap(), &y) <= 1e-4);
            l.unmerge().unwrap();
            // W + d - d in float32 rounds at the scale of |W| + |d|, not of |W| alone.
            let delta = l.adapter().delta_f32().unwrap();
            let scale = w0.abs().max().double_value(&[]) + delta.abs().max().double_value(&[]);
            let err = crate::testing::max_diff(l.weight(), &w0);
            prop_assert!(err <= 1e-6 * scale.max(1e-6), "unmerge left {} (scale {})", err, scale);
        }
    }
}
