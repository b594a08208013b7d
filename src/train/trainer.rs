//! The training loop behind `loratch train` and `loratch.train()`: data, adapters, AdamW,
//! schedule, gradient accumulation normalised by target tokens, evaluation, logging,
//! checkpoints, exact resume, interruption and non-finite-loss handling.
//!
//! Data parallelism is a [`Hooks`] matter: every process builds the same batch plan, process
//! `rank` runs the micro-batches `i` with `i % world == rank` of each accumulation window of
//! `gradient_accumulation_steps * world` micro-batches, and the hooks sum gradients and loss
//! over processes. As each micro-batch's gradient is scaled by `1 / (target tokens of the whole
//! window)`, the summed gradient is the one of a single process running the whole window.
//!
//! A run is set up in named steps (`setup`: output directory, data, model and adapters, step
//! plan, optimizer and schedule, resume), then driven by the loop (`train_loop`: step, after
//! step, finish); the helpers both use live here.
//!
//! The outputs are where Hugging Face's tools look: the final adapter (PEFT layout) at the root
//! of `output_dir`, `checkpoint-{step}/` directories whose `trainer_state.json` carries
//! Hugging Face's keys and names the best checkpoint, `metrics.jsonl` with Hugging Face's key
//! names, and with `report_to = ["tensorboard"]` event files in `output_dir/runs/`.
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use tch::{Kind, Tensor};

use crate::advice::Caller;
use crate::data::{Batch, DataLoader, Position};
use crate::error::{Error, Result};
use crate::hf::loaded::LoadedModel;
use crate::hf::peft;
use crate::io::safetensors;
use crate::model::LoraMode;
use crate::train::checkpoint::{self, HfState, StateFile, TrainerState};
use crate::train::config::TrainConfig;
use crate::train::lock::OutputDirLock;
use crate::train::loss::causal_lm_loss;
use crate::train::metrics::Metrics;
use crate::train::optim::AdamW;
use crate::train::schedule::Schedule;
use train_loop::Tally;

mod setup;
mod train_loop;

pub use crate::train::metrics::{read_metrics, METRICS_FILE};

/// The loss-curve plot in the output directory.
pub const PLOT_FILE: &str = "loss.svg";
/// Where earlier versions kept the final adapter (now at the root of the output directory):
/// deleted with the rest of an earlier run by `overwrite_output_dir`.
pub const LEGACY_ADAPTER_DIR: &str = "adapter";
/// The final adapter's files at the root of the output directory (PEFT layout, so
/// `PeftModel.from_pretrained(base, output_dir)` loads it).
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// What the loop asks of its environment. The defaults are a single process that is never
/// interrupted.
pub trait Hooks {
    /// `(rank, world_size)` of this process.
    fn world(&self) -> (usize, usize) {
        (0, 1)
    }
    /// Sums `values` over the processes, in place.
    fn all_reduce_sum(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    /// Sums the gradients over the processes, in place.
    fn all_reduce_grads(&mut self, _grads: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// Polled before every optimizer step: true saves a checkpoint and stops the run.
    fn should_stop(&mut self) -> bool {
        false
    }
    /// Who runs the trainer, so that advice in messages is in its words (flags or arguments).
    fn caller(&self) -> Caller {
        Caller::Cli
    }
    /// Sees (and may replace) the loss of each step before it is checked; tests inject faults
    /// here.
    fn inspect_loss(&mut self, _step: u64, loss: f64) -> f64 {
        loss
    }
}

/// A single process, never interrupted.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Optimizer steps done (including those before a resume).
    pub global_step: u64,
    /// The steps the run was planned for.
    pub total_steps: u64,
    /// Stopped by [`Hooks::should_stop`] (Ctrl-C) before the end.
    pub interrupted: bool,
    /// The validation loss before the first step (not set on resume) and at the end.
    pub initial_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// The mean training loss of the last logging window.
    pub last_train_loss: Option<f64>,
    /// The final adapter directory (PEFT layout: the output directory itself), when the run
    /// completed.
    pub adapter_dir: Option<PathBuf>,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// The checkpoint with the lowest validation loss evaluated at its step, if any.
    pub best_checkpoint: Option<PathBuf>,
    /// The directory of this run's TensorBoard event files (`report_to = ["tensorboard"]`).
    pub tensorboard_dir: Option<PathBuf>,
    pub metrics_file: PathBuf,
    pub plot_file: Option<PathBuf>,
    /// A checksum of this process's adapters (`sum_i (i + 1) * sum(param_i)` in float64): equal
    /// on every rank of a data-parallel run whose ranks stayed in sync.
    pub adapter_fingerprint: f64,
}

/// Everything loaded for a run.
struct Run<'a> {
    config: &'a TrainConfig,
    model: LoadedModel,
    optimizer: AdamW,
    schedule: Schedule,
    loader: DataLoader,
    validation: Option<DataLoader>,
    state: TrainerState,
    /// The checkpoint this run resumed from: never deleted by `save_total_limit`.
    resumed_from: Option<PathBuf>,
    rank: usize,
    world: usize,
    /// Whose words advice uses ([`Hooks::caller`]).
    caller: Caller,
    metrics: Metrics,
    progress: ProgressBar,
    tally: Tally,
    /// Rank 0's lock on the output directory, held until the run is dropped (the last field:
    /// released after the metrics file is closed).
    _lock: Option<OutputDirLock>,
}

/// A `u64` seed as the non-negative `i64` that `tch::manual_seed` takes.
fn seed_i64(x: u64) -> i64 {
    (x >> 1) as i64
}

/// Trains as `config` says, from scratch or from the checkpoint `resume` (a checkpoint
/// directory, or an output directory: its newest checkpoint).
///
/// Rank 0 holds a lock on the output directory for the whole run (see [`OutputDirLock`]): a
/// second run into the same directory fails at once with [`Error::State`] naming the first's pid.
pub fn train(
    config: &TrainConfig,
    resume: Option<&Path>,
    hooks: &mut dyn Hooks,
) -> Result<Outcome> {
    config.validate()?;
    config.validate_outputs()?;
    let mut run = Run::setup(config, resume, hooks)?;
    run.train(hooks)
}

impl Run<'_> {
    fn say(&self, line: &str) {
        if self.rank != 0 {
            return;
        }
        if self.progress.is_hidden() {
            eprintln!("{line}");
        } else {
            self.progress.println(line);
        }
    }

    fn mode(&self) -> LoraMode {
        LoraMode {
            enabled: true,
            training: self.model.training,
        }
    }

    /// The summed loss of `batch` (and its backward, scaled by `scale`, when given), its target
    /// tokens and those predicted right (argmax).
    fn batch_loss(&self, batch: &Batch, scale: Option<f64>) -> Result<(f64, i64, i64)> {
        let device = self.model.lm.device();
        let batch = batch.to_device(device)?;
        let lm = &self.model.lm;
        let hidden = if batch.packed {
            lm.hidden_states_segments(
                &batch.input_ids,
                &batch.position_ids,
                &batch.segment_lengths,
                self.mode(),
            )?
        } else {
            lm.hidden_states_packed(&batch.input_ids, &batch.position_ids, None, self.mode())?
        };
        let out = causal_lm_loss(&self.model.lm, &hidden, &batch.labels, self.mode(), scale)?;
        Ok((out.sum, out.n_tokens, out.n_correct))
    }

    /// The mean validation loss per target token and the token accuracy (grad off, dropout off),
    /// over all processes.
    fn evaluate(&mut self, hooks: &mut dyn Hooks) -> Result<Option<(f64, f64)>> {
        let Some(mut val) = self.validation.take() else {
            return Ok(None);
        };
        let training = self.model.training;
        self.model.training = false;
        let result = (|| -> Result<(f64, f64)> {
            val.seek(Position::default())?;
            let mut sums = [0.0f64, 0.0, 0.0];
            for (i, batch) in (&mut val).enumerate() {
                let batch = batch?;
                if i % self.world == self.rank {
                    let (s, n, c) = tch::no_grad(|| self.batch_loss(&batch, None))?;
                    sums[0] += s;
                    sums[1] += n as f64;
                    sums[2] += c as f64;
                }
            }
            hooks.all_reduce_sum(&mut sums)?;
            if sums[1] == 0.0 {
                return Err(Error::Input(
                    "the validation data has no target tokens".into(),
                ));
            }
            Ok((sums[0] / sums[1], sums[2] / sums[1]))
        })();
        self.model.training = training;
        self.validation = Some(val);
        let (loss, accuracy) = result?;
        if loss.is_finite() && self.state.best_loss.is_none_or(|b| loss < b) {
            self.state.best_loss = Some(loss);
        }
        Ok(Some((loss, accuracy)))
    }

    /// The next accumulation window: up to `accum * world` micro-batches, all from one epoch.
    /// Empty when the epoch is over (the loader then moves to the next one).
    fn next_window(&mut self) -> Result<Vec<Batch>> {
        let size = self.config.training.gradient_accumulation_steps * self.world;
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            match self.loader.next() {
                Some(b) => out.push(b?),
                None if out.is_empty() => {
                    // The loader moved to the next epoch; a window never spans two.
                    continue;
                }
                // The epoch ended part-way through the window: a shorter last window.
                None => break,
            }
        }
        Ok(out)
    }

    /// The epoch as Hugging Face logs it: the data position after the step, fractional.
    fn fractional_epoch(&self) -> f64 {
        let pos = self.loader.position();
        pos.epoch as f64 + pos.batch as f64 / self.loader.num_batches().max(1) as f64
    }

    /// A checksum of this process's adapters (see [`Outcome::adapter_fingerprint`]).
    fn fingerprint(&self) -> Result<f64> {
        let mut acc = 0.0;
        for (i, p) in self.optimizer.params().iter().enumerate() {
            acc += (i + 1) as f64 * p.f_sum(Kind::Double)?.f_double_value(&[])?;
        }
        Ok(acc)
    }

    /// Writes `checkpoint-{global_step}` (rank 0; the other ranks only return its path), after
    /// naming it the best when `eval_loss` (the validation loss at this step, if evaluated) is
    /// the lowest so far; then deletes the checkpoints beyond `save_total_limit`.
    fn save_checkpoint(&mut self, eval_loss: Option<f64>) -> Result<PathBuf> {
        let step = self.state.global_step;
        let out = &self.config.output_dir;
        let name = format!("checkpoint-{step}");
        if let Some(l) = eval_loss.filter(|l| l.is_finite()) {
            if self.state.best_metric.is_none_or(|b| l < b) {
                self.state.best_checkpoint = Some(name.clone());
                self.state.best_metric = Some(l);
            }
        }
        if self.rank != 0 {
            return Ok(out.join(name));
        }
        let t = &self.config.training;
        let best = self.state.best_checkpoint.as_ref();
        let hf = HfState {
            epoch: self.fractional_epoch(),
            max_steps: self.state.total_steps,
            num_train_epochs: t.num_epochs,
            logging_steps: t.logging_steps,
            eval_steps: t.eval_steps,
            save_steps: t.save_steps,
            train_batch_size: t.batch_size,
            best_model_checkpoint: best.map(|b| out.join(b).display().to_string()),
            best_global_step: best.and_then(|b| checkpoint::step_of(Path::new(b))),
            log_history: (self.metrics.records().iter())
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect(),
        };
        let info = checkpoint::TrainingInfo {
            best_loss: self.state.best_loss,
            current_lr: self.optimizer.lr(),
            epoch: self.state.epoch,
            global_step: step,
            lora_config: &self.config.lora,
            training_config: &self.config.training,
        };
        let path = checkpoint::write(out, step, |dir| {
            peft::save(&self.model, dir)?;
            let state = self.optimizer.state_tensors();
            safetensors::save(
                &dir.join(checkpoint::OPTIMIZER_FILE),
                &state,
                &Default::default(),
            )?;
            let state = StateFile {
                state: &self.state,
                hf: &hf,
            };
            checkpoint::write_json(&dir.join(checkpoint::STATE_FILE), &state)?;
            checkpoint::write_json(&dir.join(checkpoint::INFO_FILE), &info)?;
            checkpoint::write_json(&dir.join("train_config.json"), &self.config.to_json())
        })?;
        self.say(&format!("checkpoint saved: {}", path.display()));
        if let Some(limit) = t.save_total_limit {
            let keep: Vec<PathBuf> = (self.state.best_checkpoint.iter())
                .map(|b| out.join(b))
                .chain(self.resumed_from.clone())
                .collect();
            for old in checkpoint::rotate(out, limit as usize, &keep)? {
                self.say(&format!(
                    "checkpoint deleted (save_total_limit): {}",
                    old.display()
                ));
            }
        }
        Ok(path)
    }
}
