//! The rotary embedding's keys of a `config.json`: transformers 5's `rope_parameters` (flat, or
//! one entry per layer type) and the legacy `rope_theta`, `rope_scaling` and
//! `rope_local_base_freq`, checked into [`RopeParams`].
use super::{kind_name, unsupported, Architecture, RawConfig, Words};
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// A non-default rotary scaling (`rope_scaling`, or transformers 5's `rope_parameters`):
/// `"llama3"`, `"linear"` or `"longrope"`; other types are refused.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: Option<i64>,
    /// longrope: per-frequency divisors up to and beyond the original length.
    #[serde(default)]
    pub short_factor: Option<Vec<f64>>,
    #[serde(default)]
    pub long_factor: Option<Vec<f64>>,
    /// longrope: the factor on cos and sin (derived from `factor` when absent).
    #[serde(default)]
    pub attention_factor: Option<f64>,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}

/// The rotary embedding of a set of layers.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    /// The base (`rope_theta`).
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

impl RawConfig {
    /// The rotary embedding of full layers and (Gemma 3) of sliding ones, from transformers 5's
    /// `rope_parameters` (flat, or one entry per layer type) or the legacy `rope_theta`,
    /// `rope_scaling` and `rope_local_base_freq`.
    pub(super) fn rope(
        &self,
        arch: Architecture,
        head_dim: i64,
    ) -> Result<(RopeParams, Option<RopeParams>)> {
        let theta = self.rope_theta.unwrap_or(10000.0);
        if let Some(f) = self.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(unsupported("partial_rotary_factor", f, "only 1.0"));
        }
        let parse = |v: &Value, key: &str| self.rope_params(v, key, theta, head_dim);
        let per_type = self.rope_parameters.as_ref().and_then(|p| {
            p.get("full_attention")
                .map(|full| (full, p.get("sliding_attention")))
        });
        let (full, sliding) = match (&self.rope_parameters, per_type) {
            (_, Some((full, sliding))) => (
                parse(full, "rope_parameters.full_attention")?,
                sliding
                    .map(|s| parse(s, "rope_parameters.sliding_attention"))
                    .transpose()?,
            ),
            (Some(p), None) => (parse(p, "rope_parameters")?, None),
            (None, None) => {
                let full = match &self.rope_scaling {
                    Some(s) if !s.is_null() => parse(s, "rope_scaling")?,
                    _ => RopeParams {
                        theta,
                        scaling: None,
                    },
                };
                let local = RopeParams {
                    theta: self.rope_local_base_freq.unwrap_or(10000.0),
                    scaling: None,
                };
                (full, (arch == Architecture::Gemma3).then_some(local))
            }
        };
        Ok((full, sliding.filter(|_| arch == Architecture::Gemma3)))
    }

    /// One set of rope parameters (`key` names it in errors); `theta` when it has no `rope_theta`.
    fn rope_params(&self, v: &Value, key: &str, theta: f64, head_dim: i64) -> Result<RopeParams> {
        let Some(obj) = v.as_object() else {
            return Err(Error::Config(format!(
                "malformed config.json: {key}: expected an object, got {}",
                kind_name(v, Words::Json)
            )));
        };
        let theta = obj
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(theta);
        if let Some(f) = obj
            .get("partial_rotary_factor")
            .and_then(Value::as_f64)
            .filter(|&f| f != 1.0)
        {
            return Err(unsupported(
                &format!("{key}.partial_rotary_factor"),
                f,
                "only 1.0",
            ));
        }
        // transformers writes the type under `rope_type` and (legacy) `type`, sometimes both.
        let mut obj = obj.clone();
        if let Some(t) = obj.remove("type") {
            obj.entry("rope_type").or_insert(t);
        }
        let ty = match obj.get("rope_type") {
            Some(Value::String(t)) => t.clone(),
            Some(other) => {
                return Err(Error::Config(format!(
                    "malformed config.json: {key}.rope_type: expected a string, got {}",
                    kind_name(other, Words::Json)
                )))
            }
            None => {
                return Err(Error::Config(format!(
                    "malformed config.json: {key}: missing field `rope_type`"
                )))
            }
        };
        if ty == "default" {
            return Ok(RopeParams {
                theta,
                scaling: None,
            });
        }
        let mut s: RopeScaling = serde_json::from_value(Value::Object(obj))
            .map_err(|e| Error::Config(format!("malformed config.json: {key}: {e}")))?;
        let needs_factor = |s: &RopeScaling| match s.factor {
            Some(f) if f.is_finite() && f > 0.0 => Ok(()),
            other => Err(Error::Config(format!(
                "{key}: rope_type {ty:?} needs a factor > 0, got {other:?}"
            ))),
        };
        match ty.as_str() {
            "llama3" | "linear" => needs_factor(&s)?,
            "longrope" => {
                s.original_max_position_embeddings = s
                    .original_max_position_embeddings
                    .or(self.original_max_position_embeddings);
                let half = (head_dim / 2) as usize;
                for (name, f) in [
                    ("short_factor", &s.short_factor),
                    ("long_factor", &s.long_factor),
                ] {
                    if f.as_ref().map(Vec::len) != Some(half) {
                        return Err(Error::Config(format!(
                            "{key}.{name} must hold head_dim / 2 = {half} numbers, got {:?}",
                            f.as_ref().map(Vec::len)
                        )));
                    }
                }
                if s.original_max_position_embeddings.is_none_or(|n| n <= 0) {
                    return Err(Error::Config(format!(
                        "{key}: longrope needs original_max_position_embeddings > 0"
                    )));
                }
            }
            other => {
                return Err(unsupported(
                    &format!("{key} type"),
                    other,
                    "loratch has \"default\", \"linear\", \"llama3\" and \"longrope\"",
                ))
            }
        }
        Ok(RopeParams {
            theta,
            scaling: Some(s),
        })
    }
}
