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
    let mut rows = generate_batch(model, &[prompt.to_vec()], opts)?;
    Ok(rows.pop().unwrap_or_default())
}

/// Generates after each of `prompts` in one batch, left-padded as transformers pads for
/// generation (positions count real tokens only, no query attends to padding); each row stops
/// at its own stop token or after `max_new_tokens`. Returns each row's new tokens, equal to that
/// prompt generated alone up to float rounding (the batch's products may round differently).
/// Sampling draws the rows' tokens in turn from one generator.
pub fn generate_batch(
    model: &LoadedModel,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i64>>> {
    opts.validate()?;
    if prompts.is_empty() {
        return Err(Error::Shape("no prompts to generate from".into()));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Shape(match prompts.len() {
            1 => "the prompt is empty".into(),
            _ => format!("prompt {i} is empty"),
        }));
    }
    let mut rng = match opts.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_entropy(),
    };
    let _guard = tch::no_grad_guard();
    // longrope (Phi-3) reruns a row's whole sequence when it passes the switch length, at a
    // step that differs per row: such models generate row by row.
    if prompts.len() > 1 && model.lm.rope_switch_length().is_some() {
        return prompts
            .iter()
            .map(|p| Decoder::new(model, std::slice::from_ref(p))?.run(opts, &mut rng))
            .map(|rows| rows.map(|mut r| r.pop().unwrap_or_default()))
            .collect();
    }
    Decoder::new(model, prompts)?.run(opts, &mut rng)
}

/// One batch to decode: the left-padded prompts and their attention mask (None for one row,
/// which needs none).
struct Decoder<'a> {
    model: &'a LoadedModel,
    ids: Tensor,
    mask: Option<Tensor>,
    rows: usize,
}

impl<'a> Decoder<'a> {
    fn new(model: &'a LoadedModel, prompts: &[Vec<i64>]) -> Result<Self> {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(prompts.len() * width);
        let mut mask = Vec::with_capacity(prompts.len() * width);
        for p in prompts {
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().map(|_| 1)));
        }
        let shape = [prompts.len() as i64, width as i64];
        let ids = Tensor::f_from_slice(&ids)?.f_reshape(shape)?;
        let mask = Tensor::f_from_slice(&mask)?.f_reshape(shape)?;
        let (ids, mask) = model.check_inputs(&ids, Some(&mask))?;
        Ok(Self {
            model,
            ids,
            mask: mask.filter(|_| prompts.len() > 1),
            rows: prompts.len(),
        })
    }

    /// Each row's new tokens, decoded step by step over one KV cache sized for the whole run.
    fn run(self, opts: &GenerateOptions, rng: &mut StdRng) -> Result<Vec<Vec<i64>>> {
        let lm = &self.model.lm;
        let (n_layers, device) = (lm.model.layers.len(), lm.device());
        let reserve = self.ids.size()[1] + opts.max_new_tokens as i64;
        let mut cache = KvCache::with_capacity(n_layers, reserve);
        let mut out: Vec<Vec<i64>> = vec![Vec::with_capacity(opts.max_new_tokens); self.rows];
        let mut done = vec![false; self.rows];
        let mut mask = self.mask.as_ref().map(Tensor::shallow_clone);
        let mut next_input = self.ids.shallow_clone();
        let switch = lm.rope_switch_length();
        let _decoding = crate::ops::linear::DecodingSteps::enter();
        for _ in 0..opts.max_new_tokens {
            // longrope (Phi-3, one row): keys cached under the short factors are stale once the
            // sequence passes the switch; as transformers, the whole sequence runs again, without
            // the cache.
            if let Some(at) = switch {
                if cache.len() + next_input.size()[1] > at && cache.len() <= at && !cache.is_empty()
                {
                    cache = KvCache::with_capacity(n_layers, reserve);
                    let generated = Tensor::f_from_slice(&out[0])?.f_to_device(device)?;
                    next_input = Tensor::f_cat(&[&self.ids, &generated.f_unsqueeze(0)?], 1)?;
                }
            }
            let logits = self
                .model
                .last_logits_cached(&next_input, mask.as_ref(), &mut cache)?;
            let logits = logits.f_to_kind(Kind::Float)?;
            let tokens: Vec<i64> = if opts.greedy {
                Vec::<i64>::try_from(&logits.f_argmax(1, false)?)?
            } else {
                (0..self.rows as i64)
                    .map(|r| sample(&logits.f_select(0, r)?, opts, rng))
                    .collect::<Result<_>>()?
            };
            for (r, &token) in tokens.iter().enumerate() {
                if !done[r] {
                    out[r].push(token);
                    done[r] = opts.eos_token_ids.contains(&token);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            // Finished rows keep decoding (their tokens dropped): the batch stays rectangular.
            next_input = Tensor::f_from_slice(&tokens)?
                .f_unsqueeze(1)?
                .f_to_device(device)?;
            if let Some(m) = &mask {
                let ones = Tensor::f_ones([self.rows as i64, 1], (Kind::Int64, device))?;
                mask = Some(Tensor::f_cat(&[m, &ones], 1)?);
            }
        }
        Ok(out)
    }
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
