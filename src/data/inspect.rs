//! The data inspector: the trainer's own tokenization of a data file (records, loss masks,
//! truncation, packing), counted and checked for the mistakes that otherwise show only after
//! training: an EOS (end-of-turn) token that is never a target, so the model never learns to
//! stop; a chat template without a recognisable assistant part; examples left without a target
//! by truncation; a doubled BOS. `loratch data`, `loratch.inspect_data` and the trainer's setup
//! all go through [`tokenize_checked`], so the warnings are the same everywhere.
use std::fmt;
use std::path::Path;

use crate::data::loader::{train_validation_split, DataLoader, LoaderConfig, Packing};
use crate::data::records::{read_records, Record};
use crate::data::tokenize::{
    check_max_seq_length, encode_record, render, truncate, Example, IGNORE_INDEX,
};
use crate::data::{pad_id, Examples};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::train::config::TrainConfig;

/// What tokenizing a data file gave, counted over every record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records read.
    pub records: usize,
    /// Examples kept (records with a target left after truncation).
    pub examples: usize,
    /// Tokens of the kept examples.
    pub tokens: usize,
    /// Target (trained) tokens of the kept examples.
    pub target_tokens: usize,
    /// Records longer than `max_seq_length`, cut on the right.
    pub truncated: usize,
    /// Records that had a target, but none left after truncation (skipped).
    pub no_target_after_truncation: usize,
    /// Records without any target even untruncated (skipped), e.g. a chat without an answer.
    pub without_target: usize,
    /// Target tokens that are the EOS (end-of-turn) token.
    pub eos_targets: usize,
    /// Examples opening with two BOS tokens.
    pub doubled_bos: usize,
    /// Chat records whose assistant content is not found in the rendering, or gives no target.
    pub assistant_missing: usize,
}

/// A problem with the data that training would not report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataWarning {
    /// No target token is the EOS token: the model would never learn to stop.
    EosNeverTrained {
        /// The EOS token.
        token: String,
    },
    /// The chat template renders no recognisable assistant part.
    NoAssistantPart {
        /// How many chat records.
        records: usize,
        /// The first, 1-based.
        first: usize,
    },
    /// Records with a target before truncation and none after (they are skipped).
    NoTargetAfterTruncation {
        /// How many records.
        records: usize,
        /// The first, 1-based.
        first: usize,
        /// The truncation length.
        max_seq_length: usize,
    },
    /// Examples open with BOS twice (the text or template has one and the tokenizer adds one).
    DoubledBos {
        /// How many examples.
        records: usize,
        /// The first, 1-based record.
        first: usize,
        /// The BOS token.
        token: String,
    },
}

impl DataWarning {
    /// A stable name for the kind of warning (`eos_never_trained`, `no_assistant_part`,
    /// `no_target_after_truncation`, `doubled_bos`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EosNeverTrained { .. } => "eos_never_trained",
            Self::NoAssistantPart { .. } => "no_assistant_part",
            Self::NoTargetAfterTruncation { .. } => "no_target_after_truncation",
            Self::DoubledBos { .. } => "doubled_bos",
        }
    }
}

impl fmt::Display for DataWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EosNeverTrained { token } => write!(
                f,
                "the EOS token {token:?} is never a target: the model would not learn to stop \
                 (does the chat template end assistant turns with it?)"
            ),
            Self::NoAssistantPart { records, first } => write!(
                f,
                "{records} chat record(s) (first: record {first}): the assistant content is not \
                 found in the chat template's rendering, or gives no target; the template has \
                 no recognisable assistant part"
            ),
            Self::NoTargetAfterTruncation {
                records,
                first,
                max_seq_length,
            } => write!(
                f,
                "{records} record(s) (first: record {first}) have no target left after \
                 truncation to {max_seq_length} tokens and are skipped (raise max_seq_length)"
            ),
            Self::DoubledBos {
                records,
                first,
                token,
            } => write!(
                f,
                "{records} example(s) (first: record {first}) open with {token:?} twice: the \
                 text or template holds BOS and the tokenizer adds it again"
            ),
        }
    }
}

/// Tokenized examples with their counts and warnings.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The examples, exactly as [`crate::data::tokenize_records`] gives them.
    pub examples: Examples,
    /// The 1-based record number of each kept example.
    pub record_numbers: Vec<usize>,
    /// Which kept examples were truncated.
    pub truncated: Vec<bool>,
    /// The counts.
    pub counts: Counts,
    /// The warnings, in a fixed order.
    pub warnings: Vec<DataWarning>,
}

/// Whether a chat record has an assistant message with content that its rendering lacks.
fn assistant_missing(record: &Record, tokenizer: &Tokenizer, full: &Example) -> Result<bool> {
    let Record::Chat(messages) = record else {
        return Ok(false);
    };
    let answers: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == "assistant")
        .map(|m| m.content.trim())
        .filter(|c| !c.is_empty())
        .collect();
    if answers.is_empty() {
        return Ok(false);
    }
    let text = render(tokenizer, messages, false)?;
    let no_target = full.labels.iter().all(|&l| l == IGNORE_INDEX);
    Ok(no_target || answers.iter().any(|a| !text.contains(a)))
}

/// Tokenizes `records` as the trainer does, counting and checking as it goes; `source` names
/// them in errors.
pub fn tokenize_checked(
    records: &[Record],
    tokenizer: &Tokenizer,
    max_seq_length: usize,
    train_on_inputs: bool,
    source: &str,
) -> Result<Checked> {
    check_max_seq_length(max_seq_length)?;
    let eos = tokenizer.eos_token_id().map(i64::from);
    let bos = tokenizer.bos_token_id().map(i64::from);
    let mut counts = Counts {
        records: records.len(),
        ..Counts::default()
    };
    let (mut kept, mut numbers, mut truncated) = (Vec::new(), Vec::new(), Vec::new());
    // The first record of each warning kind: truncation, assistant part, doubled BOS.
    let (mut first_cut, mut first_missing, mut first_bos) = (None, None, None);
    for (i, record) in records.iter().enumerate() {
        let full = encode_record(record, tokenizer, train_on_inputs).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{source}: record {}: {m}", i + 1)),
            e => e,
        })?;
        if assistant_missing(record, tokenizer, &full)? {
            counts.assistant_missing += 1;
            first_missing.get_or_insert(i + 1);
        }
        let had_target = full.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX);
        let cut = full.len() > max_seq_length;
        counts.truncated += usize::from(cut);
        let Some(example) = truncate(full, max_seq_length) else {
            if had_target {
                counts.no_target_after_truncation += 1;
                first_cut.get_or_insert(i + 1);
            } else {
                counts.without_target += 1;
            }
            continue;
        };
        counts.tokens += example.len();
        counts.target_tokens += example.n_targets();
        counts.eos_targets += example.labels.iter().filter(|&&l| Some(l) == eos).count();
        if bos.is_some_and(|b| example.input_ids.starts_with(&[b, b])) {
            counts.doubled_bos += 1;
            first_bos.get_or_insert(i + 1);
        }
        kept.push(example);
        numbers.push(i + 1);
        truncated.push(cut);
    }
    counts.examples = kept.len();
    let mut warnings = Vec::new();
    if let (Some(token), true) = (tokenizer.eos_token(), counts.examples > 0) {
        if counts.eos_targets == 0 {
            warnings.push(DataWarning::EosNeverTrained {
                token: token.to_owned(),
            });
        }
    }
    if let Some(first) = first_missing {
        warnings.push(DataWarning::NoAssistantPart {
            records: counts.assistant_missing,
            first,
        });
    }
    if let Some(first) = first_cut {
        warnings.push(DataWarning::NoTargetAfterTruncation {
            records: counts.no_target_after_truncation,
            first,
            max_seq_length,
        });
    }
    if let Some(first) = first_bos {
        warnings.push(DataWarning::DoubledBos {
            records: counts.doubled_bos,
            first,
            token: tokenizer.bos_token().unwrap_or_default().to_owned(),
        });
    }
    let n_skipped = counts.records - counts.examples;
    Ok(Checked {
        examples: Examples {
            examples: kept,
            n_records: records.len(),
            n_skipped,
        },
        record_numbers: numbers,
        truncated,
        counts,
        warnings,
    })
}

/// Reads and checks a JSON-array or JSONL file (the trainer's [`crate::data::load_examples`]
/// with the counts and warnings kept).
pub fn load_checked(
    path: &Path,
    tokenizer: &Tokenizer,
    max_seq_length: usize,
    train_on_inputs: bool,
) -> Result<Checked> {
    let records = read_records(path)?;
    tokenize_checked(
        &records,
        tokenizer,
        max_seq_length,
        train_on_inputs,
        &path.display().to_string(),
    )
}

/// How the training examples are laid out in the first epoch's batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// How examples are put into rows.
    pub packing: Packing,
    /// Batches in the first epoch.
    pub batches: usize,
    /// Rows over those batches (with packing, rows that hold several examples).
    pub rows: usize,
    /// The fraction of the batches' `rows x width` token slots that are padding.
    pub padding_fraction: f64,
}

/// The first epoch's layout of `examples` as the trainer's [`DataLoader`] batches them.
pub fn layout(examples: Vec<Example>, config: LoaderConfig) -> Result<Layout> {
    let packing = config.packing;
    let loader = DataLoader::new(examples, config)?;
    let (mut rows, mut slots, mut tokens) = (0usize, 0usize, 0usize);
    let batches = loader.epoch_batches(0)?;
    for batch in &batches {
        let lengths: Vec<usize> = batch
            .iter()
            .map(|row| row.iter().map(|&i| loader.examples()[i].len()).sum())
            .collect();
        let width = lengths.iter().copied().max().unwrap_or(0);
        rows += batch.len();
        slots += batch.len() * width;
        tokens += lengths.iter().sum::<usize>();
    }
    let padding_fraction = if slots == 0 {
        0.0
    } else {
        1.0 - tokens as f64 / slots as f64
    };
    Ok(Layout {
        packing,
        batches: batches.len(),
        rows,
        padding_fraction,
    })
}

/// One example as trained: its text in runs, each trained or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The 1-based record number.
    pub record: usize,
    /// Its tokens.
    pub tokens: usize,
    /// Its target tokens.
    pub target_tokens: usize,
    /// Whether it was cut to `max_seq_length`.
    pub truncated: bool,
    /// The decoded text in runs: `(text, trained)`.
    pub spans: Vec<(String, bool)>,
}

/// The opening and closing marks of trained text where colour is not used.
pub const MARKS: (&str, &str) = ("\u{27e6}", "\u{27e7}");

impl Sample {
    /// Decodes `example` in runs of trained and untrained tokens.
    fn new(
        tokenizer: &Tokenizer,
        example: &Example,
        record: usize,
        truncated: bool,
    ) -> Result<Self> {
        let mut spans: Vec<(String, bool)> = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        let mut trained = false;
        let flush =
            |run: &mut Vec<u32>, trained: bool, spans: &mut Vec<(String, bool)>| -> Result<()> {
                if !run.is_empty() {
                    spans.push((tokenizer.decode(run, false)?, trained));
                    run.clear();
                }
                Ok(())
            };
        for (&id, &label) in example.input_ids.iter().zip(&example.labels) {
            let t = label != IGNORE_INDEX;
            if t != trained {
                flush(&mut run, trained, &mut spans)?;
                trained = t;
            }
            run.push(u32::try_from(id).map_err(|_| Error::Input(format!("token id {id}")))?);
        }
        flush(&mut run, trained, &mut spans)?;
        Ok(Sample {
            record,
            tokens: example.len(),
            target_tokens: example.n_targets(),
            truncated,
            spans,
        })
    }

    /// The text with the trained runs marked: green on a terminal (`color`), else between
    /// [`MARKS`].
    pub fn marked(&self, color: bool) -> String {
        let (open, close) = if color {
            ("\x1b[32m", "\x1b[0m")
        } else {
            MARKS
        };
        let mut s = String::new();
        for (text, trained) in &self.spans {
            if *trained {
                s.push_str(open);
                s.push_str(text);
                s.push_str(close);
            } else {
                s.push_str(text);
            }
        }
        s
    }
}

/// What `loratch data` shows.
#[derive(Debug, Clone)]
pub struct DataReport {
    /// The data file.
    pub source: String,
    /// The truncation length.
    pub max_seq_length: usize,
    /// Counts over every record of the file.
    pub counts: Counts,
    /// Training examples after the validation split (0 held out with `validation_data`).
    pub train_examples: usize,
    /// Examples held out for validation from this file.
    pub validation_examples: usize,
    /// The training examples' first-epoch layout.
    pub layout: Layout,
    /// The first examples, rendered.
    pub samples: Vec<Sample>,
    /// The warnings.
    pub warnings: Vec<DataWarning>,
}

/// Inspects `config`'s training data as the trainer would tokenize, split and batch it, with
/// the first `show` examples rendered.
pub fn inspect(config: &TrainConfig, show: usize) -> Result<DataReport> {
    let t = &config.training;
    let tokenizer = Tokenizer::for_model(&config.model)?;
    let checked = load_checked(
        &config.data,
        &tokenizer,
        t.max_seq_length,
        t.train_on_inputs,
    )?;
    let samples = (checked.examples.examples.iter())
        .zip(&checked.record_numbers)
        .zip(&checked.truncated)
        .take(show)
        .map(|((e, &n), &cut)| Sample::new(&tokenizer, e, n, cut))
        .collect::<Result<Vec<_>>>()?;
    let examples = checked.examples.examples;
    let (train, validation) = match &config.validation_data {
        Some(_) => (examples, Vec::new()),
        None => train_validation_split(examples, config.validation_split, config.seed)?,
    };
    let (train_examples, validation_examples) = (train.len(), validation.len());
    if train.is_empty() {
        return Err(Error::Input(format!(
            "{}: no trainable example ({} records, {} with nothing to train on after \
             truncation to {} tokens)",
            config.data.display(),
            checked.counts.records,
            checked.counts.records - checked.counts.examples,
            t.max_seq_length
        )));
    }
    let layout = layout(
        train,
        LoaderConfig {
            batch_size: t.batch_size,
            max_seq_length: t.max_seq_length,
            packing: t.packing,
            shuffle: true,
            seed: config.seed,
            pad_id: pad_id(&tokenizer)?,
        },
    )?;
    Ok(DataReport {
        source: config.data.display().to_string(),
        max_seq_length: t.max_seq_length,
        counts: checked.counts,
        train_examples,
        validation_examples,
        layout,
        samples,
        warnings: checked.warnings,
    })
}

impl DataReport {
    /// The report as `loratch data` prints it; `color` marks trained text in green instead of
    /// between [`MARKS`].
    pub fn text(&self, color: bool) -> String {
        let c = &self.counts;
        let (open, close) = MARKS;
        let mut s = String::new();
        for sample in &self.samples {
            s += &format!(
                "--- record {} ({} tokens, {} trained{}) ---\n{}\n",
                sample.record,
                sample.tokens,
                sample.target_tokens,
                if sample.truncated { ", truncated" } else { "" },
                sample.marked(color)
            );
        }
        if !self.samples.is_empty() {
            let how = if color {
                "green"
            } else {
                &format!("between {open} {close}")
            };
            s += &format!("--- (trained text {how}) ---\n");
        }
        let packing = match self.layout.packing {
            Packing::Off => "off",
            Packing::Rows => "rows",
            Packing::Examples => "examples",
        };
        s += &format!(
            "{}: {} records -> {} examples ({} train, {} validation)\n\
             tokens: {} ({} trained, {:.1}%)\n\
             truncated to {}: {} ({} left without a target)\n\
             skipped without any target: {}\n\
             packing {packing}: {} rows in {} batches (epoch 1), padding {:.1}%\n",
            self.source,
            c.records,
            c.examples,
            self.train_examples,
            self.validation_examples,
            c.tokens,
            c.target_tokens,
            100.0 * c.target_tokens as f64 / c.tokens.max(1) as f64,
            self.max_seq_length,
            c.truncated,
            c.no_target_after_truncation,
            c.without_target,
            self.layout.rows,
            self.layout.batches,
            100.0 * self.layout.padding_fraction,
        );
        for w in &self.warnings {
            s += &format!("warning: {w}\n");
        }
        s
    }
}

#[cfg(test)]
#[path = "inspect_tests.rs"]
mod tests;
