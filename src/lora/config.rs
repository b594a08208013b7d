//! The hyper-parameters of one LoRA adapter, validated on construction.
use crate::error::{Error, Result};

/// Rank, alpha, dropout and scaling rule of an adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update `B @ A` (> 0).
    pub rank: i64,
    /// `lora_alpha` (> 0).
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in [0, 1).
    pub dropout: f64,
    /// rsLoRA scaling `alpha / sqrt(r)` (Kalajdzievski 2023) instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// A validated config: rank > 0, alpha finite and > 0, 0 <= dropout < 1.
    pub fn new(rank: i64, alpha: f64, dropout: f64, use_rslora: bool) -> Result<Self> {
        if rank <= 0 {
            return Err(Error::Config(format!("rank must be > 0, got {rank}")));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(Error::Config(format!(
                "alpha must be a finite number > 0, got {alpha}"
            )));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Config(format!(
                "dropout must be in [0, 1), got {dropout}"
            )));
        }
        Ok(Self {
            rank,
            alpha,
            dropout,
            use_rslora,
        })
    }

    /// The factor applied to `B @ A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn invalid_values_are_rejected() {
        assert!(LoraConfig::new(0, 1.0, 0.0, false).is_err());
        assert!(LoraConfig::new(-3, 1.0, 0.0, false).is_err());
        assert!(LoraConfig::new(4, 0.0, 0.0, false).is_err());
        assert!(LoraConfig::new(4, f64::NAN, 0.0, false).is_err());
        assert!(LoraConfig::new(4, 8.0, 1.0, false).is_err());
        assert!(LoraConfig::new(4, 8.0, -0.1, false).is_err());
    }

    proptest! {
        #[test]
        fn scaling_follows_the_rule(rank in 1i64..512, alpha in 0.01f64..1024.0, rs: bool) {
            let cfg = LoraConfig::new(rank, alpha, 0.0, rs).unwrap();
            let expected = if rs { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
            prop_assert!((cfg.scaling() - expected).abs() <= 1e-12 * expected);
        }
    }
}
