//! Autoregressive generation with a key/value cache: greedy, or sampling with temperature,
//! top-k and top-p (nucleus) filtering from a seeded generator of its own (torch's global RNG
//! is left alone).
use super::loaded::LoadedModel;
use crate::error::{Error, Result};
use crate::model::KvCache;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Kind, Tensor};

/// How to pick tokens.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop after emitting any of these (the stop token is included in the output).
    pub eos_token_ids: Vec<i64>,
    /// Always take the most likely token.
    pub greedy: bool,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
}

impl GenerateOptions {
    fn validate(&self) -> Result<()> {
        let valid_temperature = self.temperature.is_finite() && self.temperature > 0.0;
        if !self.greedy && !valid_temperature {
            return Err(Error::Config(format!(
                "temperature must be > 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Config("top_k must be >= 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Config(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }
}

/// Generates up to `max_new_tokens` after `prompt` (token ids); returns the new tokens only.
pub fn generate(model: &LoadedModel, prompt: &[i64], opts: &GenerateOptions) -> Result<Vec<i64>> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(Error::Shape("the prompt is empty".into()));
    }
    let ids = Tensor::f_from_slice(prompt)?.f_unsqueeze(0)?;
    let (ids, _) = model.check_inputs(&ids, None)?;
    let mut rng = match opts.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_entropy(),
    };
    let _guard = tch::no_grad_guard();
    let mut cache = KvCache::new(model.lm.model.layers.len());
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let mut next_input = ids.shallow_clone();
    let switch = model.lm.rope_switch_length();
    for _ in 0..opts.max_new_tokens {
        // longrope (Phi-3): keys cached under the short factors are stale once the sequence
        // passes the switch; as transformers, the whole sequence runs again, without the cache.
        if let Some(at) = switch {
            if cache.len() + next_input.size()[1] > at && cache.len() <= at && !cache.is_empty() {
                cache = KvCache::new(model.lm.model.layers.len());
                let generated = Tensor::f_from_slice(&out)?.f_to_device(ids.device())?;
                next_input = Tensor::f_cat(&[&ids, &generated.f_unsqueeze(0)?], 1)?;
            }
        }
        let logits = model.forward_cached(&next_input, None, &mut cache)?;
        let last = logits
            .f_select(1, -1)?
            .f_squeeze_dim(0)?
            .f_to_kind(Kind::Float)?;
        let token = if opts.greedy {
            last.f_argmax(0, false)?.f_int64_value(&[])?
        } else {
            sample(&last, opts, &mut rng)?
        };
        out.push(token);
        if opts.eos_token_ids.contains(&token) {
            break;
        }
        next_input = Tensor::f_from_slice(&[token])?
            .f_unsqueeze(0)?
            .f_to_device(model.lm.device())?;
    }
    Ok(out)
}

/// Samples from `logits` `[vocab]` after temperature, top-k and top-p filtering.
fn sample(logits: &Tensor, opts: &GenerateOptions, rng: &mut StdRng) -> Result<i64> {
    let scaled = logits.f_div_scalar(opts.temperature)?;
    let (sorted, order) = scaled.f_sort(0, true)?;
    let mut probs: Vec<f64> = Vec::<f64>::try_from(&sorted.f_softmax(0, Kind::Double)?)?;
    let order: Vec<i64> = Vec::<i64>::try_from(&order)?;
    let mut keep = probs.len();
    if let Some(k) = opts.top_k {
        keep = keep.min(k);
    }
    if let Some(p) = opts.top_p {
        // Smallest prefix whose mass reaches p (at least one token).
        let mut mass = 0.0;
        for (i, q) in probs.iter().enumerate().take(keep) {
            mass += q;
            if mass >= p {
                keep = i + 1;
                break;
            }
        }
    }
    probs.truncate(keep.max(1));
    let total: f64 = probs.iter().sum();
    let mut r = rng.gen::<f64>() * total;
    for (i, q) in probs.iter().enumerate() {
        r -= q;
        if r <= 0.0 {
            return Ok(order[i]);
        }
    }
    Ok(order[probs.len() - 1])
}
