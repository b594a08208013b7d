//! `metrics.jsonl`, the trainer's log: one typed [`Record`] per line, appended and flushed as the
//! run goes (and, with `report_to = ["tensorboard"]`, written as TensorBoard scalars too), with
//! Hugging Face's key names (`loss`, `learning_rate`, `grad_norm`, `epoch`, `eval_loss`,
//! `mean_token_accuracy`); the records of the run are kept in memory for the end-of-run plot and
//! the checkpoints' `log_history`.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::train::tensorboard::EventWriter;

/// The metrics file in the output directory: one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`. The kinds are told apart by their keys (`eval_loss`, `skipped`,
/// else a training log line), as users and tests read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Eval(EvalRecord),
    Skipped(SkippedRecord),
    Train(TrainRecord),
}

// The fields of each record are in alphabetical order, as the `json!` maps they replaced wrote
// them (serde_json sorts map keys).

/// A validation loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Mean loss per target token over the validation data (null in the file when not finite).
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_loss: f64,
    /// The fraction of validation target tokens whose argmax is the label (TRL's key; absent in
    /// the logs of older runs).
    #[serde(default)]
    pub eval_mean_token_accuracy: Option<f64>,
    pub step: u64,
}

/// An optimizer step whose update was skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedRecord {
    /// Why: the non-finite loss and gradient norm, or no target tokens.
    pub reason: String,
    /// Always true: the key that marks the kind.
    pub skipped: bool,
    pub step: u64,
}

/// The log line of every `logging_steps` steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Fractional epoch: the data position after the step.
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch: f64,
    /// The gradient norm of this step (before clipping; null when not finite).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// The learning rate of this step (`lr` in the logs of older runs).
    #[serde(alias = "lr", deserialize_with = "nan_if_null")]
    pub learning_rate: f64,
    /// Mean loss per target token over the updates since the last log line (null if none).
    pub loss: Option<f64>,
    /// The fraction of those updates' target tokens whose argmax was the label (null if none).
    #[serde(default)]
    pub mean_token_accuracy: Option<f64>,
    pub peak_rss_bytes: u64,
    pub rss_bytes: u64,
    pub step: u64,
    /// Input tokens per second since the last log line.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    /// Target tokens trained on so far.
    pub tokens_seen: u64,
    /// Seconds spent in training steps by this process (not counting evaluation or saves).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_time_s: f64,
}

/// serde_json writes a non-finite float as null; it reads back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Record {
    /// A validation loss (and token accuracy) at `step`.
    pub fn eval(step: u64, eval_loss: f64, accuracy: Option<f64>) -> Self {
        Record::Eval(EvalRecord {
            eval_loss,
            eval_mean_token_accuracy: accuracy,
            step,
        })
    }

    /// A skipped update at `step`.
    pub fn skipped(step: u64, reason: String) -> Self {
        Record::Skipped(SkippedRecord {
            reason,
            skipped: true,
            step,
        })
    }

    /// The optimizer step the record belongs to.
    pub fn step(&self) -> u64 {
        match self {
            Record::Eval(r) => r.step,
            Record::Skipped(r) => r.step,
            Record::Train(r) => r.step,
        }
    }

    /// The record's TensorBoard scalars (Hugging Face's tags: `train/...`, `eval/...`).
    fn scalars(&self) -> Vec<(&'static str, f64)> {
        match self {
            Record::Train(r) => {
                let mut v = vec![
                    ("train/learning_rate", r.learning_rate),
                    ("train/grad_norm", r.grad_norm),
                    ("train/epoch", r.epoch),
                    ("train/tokens_per_s", r.tokens_per_s),
                    ("train/rss_bytes", r.rss_bytes as f64),
                ];
                v.extend(r.loss.map(|l| ("train/loss", l)));
                v.extend(
                    r.mean_token_accuracy
                        .map(|a| ("train/mean_token_accuracy", a)),
                );
                v
            }
            Record::Eval(r) => {
                let mut v = vec![("eval/loss", r.eval_loss)];
                v.extend(
                    r.eval_mean_token_accuracy
                        .map(|a| ("eval/mean_token_accuracy", a)),
                );
                v
            }
            Record::Skipped(_) => Vec::new(),
        }
    }
}

/// `(step, loss)` points.
pub type Curve = Vec<(u64, f64)>;

/// The loss curves of a run, in the order they were logged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// The training loss of each log line that had one.
    pub train: Curve,
    /// Every validation loss.
    pub validation: Curve,
}

impl Curves {
    fn add(&mut self, record: &Record) {
        match record {
            Record::Train(r) => {
                if let Some(l) = r.loss {
                    self.train.push((r.step, l));
                }
            }
            Record::Eval(r) => self.validation.push((r.step, r.eval_loss)),
            Record::Skipped(_) => {}
        }
    }
}

/// `metrics.jsonl` being written: each record is appended and flushed, so a killed run keeps what
/// it logged; on resume, records after the checkpoint's step are dropped (they will be redone).
/// A disabled log (ranks other than 0) writes and keeps nothing.
pub(crate) struct Metrics {
    path: PathBuf,
    file: Option<fs::File>,
    curves: Curves,
    records: Vec<Record>,
    tensorboard: Option<EventWriter>,
}

impl Metrics {
    /// A log that writes nothing, for the ranks other than 0.
    pub(crate) fn disabled(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            curves: Curves::default(),
            records: Vec::new(),
            tensorboard: None,
        }
    }

    /// Starts `path` afresh or, on `resume`, keeps its records up to `step`; with `tensorboard`,
    /// each new record is also written to a new event file in that directory.
    pub(crate) fn open(
        path: &Path,
        step: u64,
        resume: bool,
        tensorboard: Option<&Path>,
    ) -> Result<Self> {
        let kept: Vec<Record> = if resume {
            read_records(path)?
                .into_iter()
                .filter(|r| r.step() <= step)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        let mut curves = Curves::default();
        for r in &kept {
            text.push_str(&to_line(r, path)?);
            text.push('\n');
            curves.add(r);
        }
        write_atomic(path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
            curves,
            records: kept,
            tensorboard: tensorboard.map(EventWriter::create).transpose()?,
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` (and its points to the curves).
    pub(crate) fn record(&mut self, record: Record) -> Result<()> {
        if let Some(f) = &mut self.file {
            let line = to_line(&record, &self.path)?;
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .map_err(|e| Error::io(&self.path, e))?;
            if let Some(tb) = &mut self.tensorboard {
                tb.scalars(record.step(), &record.scalars())?;
            }
            self.curves.add(&record);
            self.records.push(record);
        }
        Ok(())
    }

    /// The records logged so far (with those kept on resume), in order.
    pub(crate) fn records(&self) -> &[Record] {
        &self.records
    }

    /// Whether the log holds a validation loss of `step` (false when disabled).
    pub(crate) fn has_eval_at(&self, step: u64) -> bool {
        self.curves.validation.iter().any(|&(s, _)| s == step)
    }

    /// The loss curves logged so far (with those kept on resume).
    pub(crate) fn curves(&self) -> &Curves {
        &self.curves
    }
}

fn to_line(record: &Record, path: &Path) -> Result<String> {
    serde_json::to_string(record).map_err(|e| {
        Error::State(format!(
            "cannot serialise a record of {}: {e}",
            path.display()
        ))
    })
}

/// The lines of a metrics file, `""` when it does not exist.
fn read_text(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The records of a metrics file (a torn last line, from a kill, is ignored).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    Ok(read_text(path)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Record>(l).ok())
        .collect())
}

/// The records of a metrics file as JSON objects (a torn last line, from a kill, is ignored).
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    Ok(read_text(path)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn train_record(step: u64, loss: Option<f64>, grad_norm: f64) -> Record {
        Record::Train(TrainRecord {
            epoch: 0.25,
            grad_norm,
            learning_rate: 1e-3,
            loss,
            mean_token_accuracy: loss.map(|_| 0.625),
            peak_rss_bytes: 2048,
            rss_bytes: 1024,
            step,
            tokens_per_s: 123.5,
            tokens_seen: 77,
            train_time_s: 0.5,
        })
    }

    #[test]
    fn lines_have_hugging_face_keys_and_older_lines_still_read() {
        // Keys sorted, non-finite floats as null; Hugging Face's names (`learning_rate`) and
        // TRL's `mean_token_accuracy`.
        let cases = [
            (
                Record::eval(3, 2.5, Some(0.5)),
                json!({"step": 3, "eval_loss": 2.5, "eval_mean_token_accuracy": 0.5}),
            ),
            (
                Record::skipped(4, "loss NaN, gradient norm NaN".into()),
                json!({"step": 4, "skipped": true, "reason": "loss NaN, gradient norm NaN"}),
            ),
            (
                train_record(5, Some(1.75), f64::NAN),
                json!({
                    "step": 5, "epoch": 0.25, "loss": 1.75, "learning_rate": 1e-3,
                    "mean_token_accuracy": 0.625, "grad_norm": f64::NAN,
                    "tokens_per_s": 123.5, "rss_bytes": 1024, "peak_rss_bytes": 2048,
                    "tokens_seen": 77, "train_time_s": 0.5,
                }),
            ),
            (
                train_record(6, None, 0.5),
                json!({
                    "step": 6, "epoch": 0.25, "loss": null, "learning_rate": 1e-3,
                    "mean_token_accuracy": null, "grad_norm": 0.5,
                    "tokens_per_s": 123.5, "rss_bytes": 1024, "peak_rss_bytes": 2048,
                    "tokens_seen": 77, "train_time_s": 0.5,
                }),
            ),
        ];
        for (record, old) in cases {
            let line = serde_json::to_string(&record).unwrap();
            assert_eq!(line, old.to_string());
            let back: Record = serde_json::from_str(&line).unwrap();
            // NaN != NaN: compare the lines again.
            assert_eq!(serde_json::to_string(&back).unwrap(), line);
            assert_eq!(back.step(), record.step());
        }
        let eval: Record = serde_json::from_str(r#"{"eval_loss":null,"step":2}"#).unwrap();
        assert!(
            matches!(eval, Record::Eval(r) if r.eval_loss.is_nan() && r.eval_mean_token_accuracy.is_none())
        );
        // A line of an older run (`lr`, no accuracy), kept on resume.
        let old = r#"{"epoch":0.5,"grad_norm":0.5,"loss":2.0,"lr":0.001,"peak_rss_bytes":2,"rss_bytes":1,"step":4,"tokens_per_s":9.0,"tokens_seen":7,"train_time_s":0.5}"#;
        match serde_json::from_str(old).unwrap() {
            Record::Train(r) => {
                assert_eq!((r.learning_rate, r.mean_token_accuracy), (0.001, None));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resume_keeps_the_records_up_to_the_step_and_their_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut m = Metrics::open(&path, 0, false, None).unwrap();
        m.record(Record::eval(0, 3.0, None)).unwrap();
        for s in 1..=4 {
            m.record(train_record(s, Some(3.0 - s as f64 / 4.0), 1.0))
                .unwrap();
        }
        m.record(Record::skipped(5, "no target tokens in the window".into()))
            .unwrap();
        m.record(train_record(5, None, f64::NAN)).unwrap();
        m.record(Record::eval(4, 2.2, Some(0.1))).unwrap();
        assert_eq!(m.curves().train.len(), 4);
        assert_eq!(m.curves().validation, vec![(0, 3.0), (4, 2.2)]);
        assert!(m.has_eval_at(4) && !m.has_eval_at(5));
        let written = read_records(&path).unwrap();
        assert_eq!(written.len(), 8);
        drop(m);
        // A kill left a torn line; the checkpoint is at step 4.
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"step\": 6, \"lo");
        fs::write(&path, text).unwrap();
        let m = Metrics::open(&path, 4, true, None).unwrap();
        let kept = read_records(&path).unwrap();
        assert_eq!(kept.len(), 6);
        assert!(kept.iter().all(|r| r.step() <= 4));
        assert_eq!(m.curves().train.len(), 4);
        assert_eq!(m.curves().validation, vec![(0, 3.0), (4, 2.2)]);
        assert_eq!(read_metrics(&path).unwrap().len(), 6);
        // The records kept (for the checkpoints' log_history) are those of the file.
        assert_eq!(m.records(), &kept[..]);
        // Fresh: emptied.
        let m = Metrics::open(&path, 0, false, None).unwrap();
        assert!(read_records(&path).unwrap().is_empty() && m.curves() == &Curves::default());
        assert!(!Metrics::disabled(&path).has_eval_at(0));
    }
}
