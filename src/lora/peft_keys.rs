//! PEFT's names of adapter tensors in a model's state dict and in adapter files:
//! `base_model.model.<module path>.lora_A.weight` and `.lora_B.weight`. Every place that writes
//! or reads such a key goes through here.

/// The model prefix PEFT's `PeftModel` puts before every module path.
const PREFIX: &str = "base_model.model.";

/// One of an adapter's two factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `lora_A`, `[r, in_features]`.
    A,
    /// `lora_B`, `[out_features, r]`.
    B,
}

impl Factor {
    /// The key of this factor inside its module: `lora_A.weight` or `lora_B.weight`.
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::A => "lora_A.weight",
            Self::B => "lora_B.weight",
        }
    }
}

/// The key of factor `factor` of the adapter on module `path` (`model.layers.0.self_attn.q_proj`).
pub fn key(path: &str, factor: Factor) -> String {
    format!("{PREFIX}{path}.{}", factor.suffix())
}

/// The module path and factor a key names; None for a key that is not an adapter factor.
pub fn parse(key: &str) -> Option<(&str, Factor)> {
    let rest = key.strip_prefix(PREFIX)?;
    [Factor::A, Factor::B].into_iter().find_map(|f| {
        let path = rest.strip_suffix(f.suffix())?.strip_suffix('.')?;
        (!path.is_empty()).then_some((path, f))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let p = "model.layers.3.self_attn.q_proj";
        assert_eq!(
            key(p, Factor::A),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            key(p, Factor::B),
            format!("base_model.model.{p}.lora_B.weight")
        );
        for f in [Factor::A, Factor::B] {
            assert_eq!(parse(&key(p, f)), Some((p, f)));
        }
        for other in [
            "model.layers.3.self_attn.q_proj.lora_A.weight",
            "base_model.model.lora_A.weight",
            "base_model.model.x.lora_A.bias",
            "base_model.model.xlora_B.weight",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }
}
