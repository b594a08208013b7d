//! The training data pipeline: records from JSON/JSONL files ([`records`]), tokenized with label
//! masks ([`tokenize`]), split, shuffled and collated into padded or packed batches ([`batch`],
//! [`loader`]).
pub mod batch;
pub mod inspect;
pub mod loader;
pub mod records;
pub mod tokenize;

use std::path::Path;

pub use batch::{block_diagonal_mask, Batch};
pub use loader::{train_validation_split, DataLoader, LoaderConfig, Packing, Position};
pub use records::{parse_records, read_records, Record};
pub use tokenize::{tokenize, Example, IGNORE_INDEX};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Tokenized examples and how many records were skipped (nothing trainable after truncation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Examples {
    /// The kept examples, in record order.
    pub examples: Vec<Example>,
    /// The number of records read.
    pub n_records: usize,
    /// The number of records skipped.
    pub n_skipped: usize,
}

/// Tokenizes `records`; `source` names them in errors. (The data inspector's
/// [`inspect::tokenize_checked`] with its counts and warnings dropped.)
pub fn tokenize_records(
    records: &[Record],
    tokenizer: &Tokenizer,
    max_seq_length: usize,
    train_on_inputs: bool,
    source: &str,
) -> Result<Examples> {
    Ok(
        inspect::tokenize_checked(records, tokenizer, max_seq_length, train_on_inputs, source)?
            .examples,
    )
}

/// Reads and tokenizes a JSON-array or JSONL file.
pub fn load_examples(
    path: impl AsRef<Path>,
    tokenizer: &Tokenizer,
    max_seq_length: usize,
    train_on_inputs: bool,
) -> Result<Examples> {
    Ok(inspect::load_checked(path.as_ref(), tokenizer, max_seq_length, train_on_inputs)?.examples)
}

/// The padding id: the tokenizer's pad token, else its EOS token.
pub fn pad_id(tokenizer: &Tokenizer) -> Result<i64> {
    tokenizer
        .pad_token_id()
        .or_else(|| tokenizer.eos_token_id())
        .map(i64::from)
        .ok_or_else(|| Error::Config("the tokenizer has neither a pad nor an EOS token".into()))
}

#[cfg(test)]
mod tests;
