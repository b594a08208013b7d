//! Seeded train/validation splits and a resumable [`DataLoader`] of padded or packed batches.
//!
//! The order of an epoch is a shuffle of the examples by `StdRng::seed_from_u64` with a seed
//! mixed from the loader's seed and the epoch number, so each epoch has its own order and every
//! order is reproducible. A [`Position`] (epoch, batch index) is enough to resume exactly.
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::batch::{pack_first_fit, packed_batch, pad_batch, Batch};
use crate::data::tokenize::Example;
use crate::error::{Error, Result};

/// SplitMix64: decorrelates nearby seeds (also the trainer's per-step dropout seeds).
pub(crate) fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Splits `items` into (train, validation): a seeded random `fraction` of them (rounded, at
/// least one when `fraction > 0`, leaving at least one for training) is held out. Both parts keep
/// the original order.
pub fn train_validation_split<T>(
    items: Vec<T>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Config(format!(
            "validation_split must be in [0, 1), got {fraction}"
        )));
    }
    let n = items.len();
    if fraction == 0.0 || n == 0 {
        return Ok((items, Vec::new()));
    }
    if n < 2 {
        return Err(Error::Config(format!(
            "validation_split {fraction} needs at least 2 examples, got {n}"
        )));
    }
    let n_val = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        mix(seed ^ 0x7661_6c69_6461_7465),
    ));
    let mut held = vec![false; n];
    for &i in &order[..n_val] {
        held[i] = true;
    }
    let (mut train, mut val) = (Vec::with_capacity(n - n_val), Vec::with_capacity(n_val));
    for (item, h) in items.into_iter().zip(held) {
        if h {
            val.push(item);
        } else {
            train.push(item);
        }
    }
    Ok((train, val))
}

/// How examples are laid out in rows. In a config: `false` (off), `true` (rows), or one of the
/// names `"off"`, `"rows"`, `"examples"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "PackingSetting", into = "PackingSetting")]
pub enum Packing {
    /// One example per row, right-padded; a batch is `batch_size` examples.
    Off,
    /// Rows of up to `max_seq_length` tokens, each filled first-fit with several examples (TRL's
    /// packing); a batch is `batch_size` such rows.
    #[default]
    Rows,
    /// Padding-free batches: a batch is `batch_size` examples (as with `Off`, so the same number
    /// of optimizer steps) laid end to end in one row, without padding (as transformers'
    /// `DataCollatorWithFlattening`). Attention stays within each example.
    Examples,
}

/// [`Packing`] as written in a config file.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PackingSetting {
    Flag(bool),
    Name(String),
}

impl TryFrom<PackingSetting> for Packing {
    type Error = String;

    fn try_from(v: PackingSetting) -> std::result::Result<Self, String> {
        match v {
            PackingSetting::Flag(false) => Ok(Packing::Off),
            PackingSetting::Flag(true) => Ok(Packing::Rows),
            PackingSetting::Name(n) => match n.as_str() {
                "off" => Ok(Packing::Off),
                "rows" => Ok(Packing::Rows),
                "examples" => Ok(Packing::Examples),
                _ => Err(format!(
                    "packing must be true, false, \"off\", \"rows\" or \"examples\", got {n:?}"
                )),
            },
        }
    }
}

impl From<Packing> for PackingSetting {
    fn from(p: Packing) -> Self {
        match p {
            Packing::Off => PackingSetting::Flag(false),
            Packing::Rows => PackingSetting::Flag(true),
            Packing::Examples => PackingSetting::Name("examples".into()),
        }
    }
}

/// How a [`DataLoader`] batches.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Rows per batch with [`Packing::Rows`]; examples per batch otherwise.
    pub batch_size: usize,
    /// The longest row (examples must already be truncated to it).
    pub max_seq_length: usize,
    /// How examples are put into rows.
    pub packing: Packing,
    /// Shuffle the examples each epoch (off for validation).
    pub shuffle: bool,
    /// The shuffle seed.
    pub seed: u64,
    /// The id of padding tokens.
    pub pad_id: i64,
}

/// Where a [`DataLoader`] is: the next batch it yields is batch `batch` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// The epoch, from 0.
    pub epoch: u64,
    /// The index of the next batch in the epoch.
    pub batch: usize,
}

/// Yields the batches of one epoch at a time, resumable from any [`Position`].
///
/// As an iterator it yields the remaining batches of the current epoch, then returns `None` once
/// and moves to the start of the next epoch: `for b in &mut loader { .. }` runs one epoch.
#[derive(Debug)]
pub struct DataLoader {
    examples: Vec<Example>,
    config: LoaderConfig,
    position: Position,
    /// The batches of the current epoch: rows of example indices.
    plan: Vec<Vec<Vec<usize>>>,
}

impl DataLoader {
    /// A loader at the start of epoch 0.
    pub fn new(examples: Vec<Example>, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 || config.max_seq_length == 0 {
            return Err(Error::Config(format!(
                "batch_size and max_seq_length must be positive, got {} and {}",
                config.batch_size, config.max_seq_length
            )));
        }
        if examples.is_empty() {
            return Err(Error::Input("no examples to load".into()));
        }
        if let Some((i, e)) = examples
            .iter()
            .enumerate()
            .find(|(_, e)| e.is_empty() || e.len() > config.max_seq_length)
        {
            return Err(Error::Input(format!(
                "example {i} has {} tokens; it must have 1..={} (max_seq_length)",
                e.len(),
                config.max_seq_length
            )));
        }
        let mut loader = DataLoader {
            examples,
            config,
            position: Position::default(),
            plan: Vec::new(),
        };
        loader.plan = loader.plan_epoch(0)?;
        Ok(loader)
    }

    /// The examples, in their original order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The position of the next batch.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The number of batches of the current epoch (with packing it can differ between epochs).
    pub fn num_batches(&self) -> usize {
        self.plan.len()
    }

    /// The number of batches of `epoch`.
    pub fn batches_in_epoch(&self, epoch: u64) -> Result<usize> {
        Ok(self.plan_epoch(epoch)?.len())
    }

    /// Moves to `position`, as saved from [`DataLoader::position`].
    pub fn seek(&mut self, position: Position) -> Result<()> {
        let plan = self.plan_epoch(position.epoch)?;
        if position.batch > plan.len() {
            return Err(Error::Config(format!(
                "cannot resume at batch {} of epoch {}: it has {} batches",
                position.batch,
                position.epoch,
                plan.len()
            )));
        }
        self.plan = plan;
        self.position = position;
        Ok(())
    }

    /// The example indices of `epoch` in the order they are batched.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(
                mix(self.config.seed) ^ epoch
            )));
        }
        order
    }

    /// The batches of `epoch`, each a list of rows of indices into [`DataLoader::examples`].
    pub fn epoch_batches(&self, epoch: u64) -> Result<Vec<Vec<Vec<usize>>>> {
        self.plan_epoch(epoch)
    }

    /// The batches of `epoch`, each a list of rows of example indices.
    fn plan_epoch(&self, epoch: u64) -> Result<Vec<Vec<Vec<usize>>>> {
        let order = self.epoch_order(epoch);
        let (bs, max_len) = (self.config.batch_size, self.config.max_seq_length);
        // First-fit rows of `ids` (indices into `examples`), in the given order.
        let pack = |ids: &[usize]| -> Result<Vec<Vec<usize>>> {
            let lengths: Vec<usize> = ids.iter().map(|&i| self.examples[i].len()).collect();
            Ok(pack_first_fit(&lengths, max_len)?
                .into_iter()
                .map(|row| row.into_iter().map(|j| ids[j]).collect())
                .collect())
        };
        match self.config.packing {
            Packing::Off => Ok(order
                .chunks(bs)
                .map(|c| c.iter().map(|&i| vec![i]).collect())
                .collect()),
            Packing::Rows => Ok(pack(&order)?.chunks(bs).map(<[_]>::to_vec).collect()),
            // One row per batch, of any width (`new` checked each example's length).
            Packing::Examples => Ok(order.chunks(bs).map(|ids| vec![ids.to_vec()]).collect()),
        }
    }

    /// The example indices of each row of the next batch, if the epoch has one left.
    pub fn peek_rows(&self) -> Option<&[Vec<usize>]> {
        self.plan.get(self.position.batch).map(Vec::as_slice)
    }

    fn build(&self, rows: &[Vec<usize>]) -> Result<Batch> {
        if self.config.packing != Packing::Off {
            let rows: Vec<Vec<&Example>> = rows
                .iter()
                .map(|r| r.iter().map(|&i| &self.examples[i]).collect())
                .collect();
            packed_batch(&rows, self.config.pad_id)
        } else {
            let examples: Vec<&Example> = rows.iter().map(|r| &self.examples[r[0]]).collect();
            pad_batch(&examples, self.config.pad_id)
        }
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let Some(rows) = self.plan.get(self.position.batch) else {
            let next = Position {
                epoch: self.position.epoch + 1,
                batch: 0,
            };
            if let Err(e) = self.seek(next) {
                return Some(Err(e));
            }
            return None;
        };
        let batch = self.build(rows);
        self.position.batch += 1;
        Some(batch)
    }
}
