//! The training loop behind `loratch train` and `loratch.train()`: data, adapters, AdamW,
//! schedule, gradient accumulation normalised by target tokens, evaluation, logging,
//! checkpoints, exact resume, interruption and non-finite-loss handling.
//!
//! Data parallelism is a [`Hooks`] matter: every process builds the same batch plan, process
//! `rank` runs the micro-batches `i` with `i % world == rank` of each accumulation window of
//! `gradient_accumulation_steps * world` micro-batches, and the hooks sum gradients and loss
//! over processes. As each micro-batch's gradient is scaled by `1 / (target tokens of the whole
//! window)`, the summed gradient is the one of a single process running the whole window.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::data::loader::mix;
use crate::data::{self, Batch, DataLoader, LoaderConfig, Position};
use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::hf::loaded::{LoadOptions, LoadedModel};
use crate::hf::peft;
use crate::io::{atomic::write_atomic, safetensors};
use crate::lora::LoraSpec;
use crate::model::LoraMode;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::TrainConfig;
use crate::train::loss::causal_lm_loss;
use crate::train::optim::AdamW;
use crate::train::schedule::{Schedule, ScheduleKind};

/// The metrics file in the output directory: one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss-curve plot in the output directory.
pub const PLOT_FILE: &str = "loss.svg";
/// The final adapter (PEFT layout) in the output directory.
pub const ADAPTER_DIR: &str = "adapter";

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
    /// The final adapter directory (PEFT layout), when the run completed.
    pub adapter_dir: Option<PathBuf>,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
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
    rank: usize,
    world: usize,
    metrics: Metrics,
    progress: ProgressBar,
}

fn seed_i64(x: u64) -> i64 {
    (x >> 1) as i64
}

/// The resident set size of this process in bytes (Linux), else 0.
pub fn rss_bytes() -> u64 {
    fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The peak resident set size of this process in bytes (`VmHWM`, Linux), else 0. Unlike a
/// parent's `ru_maxrss` of the child, it never includes memory of the process that spawned it.
pub fn peak_rss_bytes() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Trains as `config` says, from scratch or from the checkpoint `resume` (a checkpoint
/// directory, or an output directory: its newest checkpoint).
pub fn train(
    config: &TrainConfig,
    resume: Option<&Path>,
    hooks: &mut dyn Hooks,
) -> Result<Outcome> {
    config.validate()?;
    let mut run = Run::setup(config, resume, hooks)?;
    run.train(hooks)
}

impl<'a> Run<'a> {
    fn setup(
        config: &'a TrainConfig,
        resume: Option<&Path>,
        hooks: &mut dyn Hooks,
    ) -> Result<Self> {
        let t = &config.training;
        let (rank, world) = hooks.world();
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "invalid process group: rank {rank} of {world}"
            )));
        }
        let device = parse_device(&t.device)?;
        let kind = parse_dtype(&t.dtype)?;
        if rank == 0 {
            // Leftovers of a killed run: unfinished saves and temporary files.
            checkpoint::recover(&config.output_dir)?;
            crate::io::atomic::remove_temp_files(&config.output_dir.join(ADAPTER_DIR))?;
        }
        let resume = resume.map(checkpoint::resolve).transpose()?;
        if resume.is_none() {
            // With overwrite_output_dir, rank 0 deletes; every rank refuses otherwise.
            if !t.overwrite_output_dir {
                checkpoint::prepare_fresh(&config.output_dir, false)?;
            } else if rank == 0 {
                checkpoint::prepare_fresh(&config.output_dir, true)?;
                // The earlier run's final adapter would pass for this run's if this one stops.
                let adapter = config.output_dir.join(ADAPTER_DIR);
                if adapter.is_dir() {
                    fs::remove_dir_all(&adapter).map_err(|e| Error::io(&adapter, e))?;
                }
            }
        }

        let tokenizer = Tokenizer::from_dir(&config.model)?;
        let pad_id = data::pad_id(&tokenizer)?;
        let train_set = data::load_examples(
            &config.data,
            &tokenizer,
            t.max_seq_length,
            t.train_on_inputs,
        )?;
        let (train_examples, val_examples) = match &config.validation_data {
            Some(path) => (
                train_set.examples,
                data::load_examples(path, &tokenizer, t.max_seq_length, t.train_on_inputs)?
                    .examples,
            ),
            None => data::train_validation_split(
                train_set.examples,
                config.validation_split,
                config.seed,
            )?,
        };
        if train_examples.is_empty() {
            return Err(Error::Input(format!(
                "{}: no trainable example ({} records, {} with nothing to train on after \
                 truncation to {} tokens)",
                config.data.display(),
                train_set.n_records,
                train_set.n_skipped,
                t.max_seq_length
            )));
        }
        let loader_config = LoaderConfig {
            batch_size: t.batch_size,
            max_seq_length: t.max_seq_length,
            packing: t.packing,
            shuffle: true,
            seed: config.seed,
            pad_id,
        };
        let mut loader = DataLoader::new(train_examples, loader_config.clone())?;
        let validation = if val_examples.is_empty() {
            None
        } else {
            Some(DataLoader::new(
                val_examples,
                LoaderConfig {
                    shuffle: false,
                    ..loader_config
                },
            )?)
        };

        let mut model = LoadedModel::load(&config.model, &LoadOptions { device, kind })?;
        let vocab = model.lm.config.vocab_size;
        let max_id = loader
            .examples()
            .iter()
            .chain(validation.iter().flat_map(|v| v.examples()))
            .flat_map(|e| e.input_ids.iter().copied())
            .max()
            .unwrap_or(0)
            .max(pad_id);
        if max_id >= vocab {
            return Err(Error::Input(format!(
                "the tokenizer in {} produces token id {max_id}, but the model's vocab_size is \
                 {vocab}: tokenizer and model do not match",
                config.model.display()
            )));
        }
        let mut spec = LoraSpec::simple(config.lora.rank, config.lora.alpha, config.targets()?);
        spec.dropout = config.lora.dropout;
        spec.use_rslora = config.lora.use_rslora;
        tch::manual_seed(seed_i64(mix(config.seed)));
        // Adapters (and so the optimizer state) are float32 whatever the model's dtype.
        model.init_lora(spec, Kind::Float)?;
        model.training = true;

        let window = (t.gradient_accumulation_steps * world) as u64;
        let total_steps = match t.max_steps {
            Some(s) => s,
            None => {
                let mut steps = 0;
                for epoch in 0..t.num_epochs {
                    steps += (loader.batches_in_epoch(epoch)? as u64).div_ceil(window);
                }
                steps
            }
        };
        let kind_name = ScheduleKind::from_name(&t.scheduler_type)?;
        let warmup = if kind_name.has_warmup() {
            t.warmup_steps
        } else {
            0
        };
        let schedule = Schedule::new(
            kind_name,
            t.learning_rate,
            t.min_lr,
            total_steps,
            warmup,
            0.1,
            100,
        )?;
        let mut optimizer = AdamW::new(
            model.parameters()?,
            schedule.lr(0),
            t.weight_decay,
            (0.9, 0.999),
            1e-8,
        )?;
        let mut state = TrainerState {
            global_step: 0,
            epoch: 0,
            batch: 0,
            optimizer_steps: 0,
            scheduler_type: t.scheduler_type.clone(),
            total_steps,
            seed: config.seed,
            best_loss: None,
            nonfinite_in_a_row: 0,
            tokens_seen: 0,
            world_size: world,
        };
        let metrics_path = config.output_dir.join(METRICS_FILE);
        if let Some(dir) = &resume {
            let saved = checkpoint::read_state(dir)?;
            if saved.world_size != world {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    msg: format!(
                        "saved by {} processes; resuming with {world} would change the data order",
                        saved.world_size
                    ),
                });
            }
            if saved.seed != config.seed {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    msg: format!(
                        "saved with seed {}; the config says {}",
                        saved.seed, config.seed
                    ),
                });
            }
            peft::load(&mut model, dir)?;
            optimizer.load_state(&checkpoint::read_optimizer(dir)?, saved.optimizer_steps)?;
            loader.seek(Position {
                epoch: saved.epoch,
                batch: saved.batch,
            })?;
            state = TrainerState {
                total_steps,
                scheduler_type: t.scheduler_type.clone(),
                ..saved
            };
            // The rate of the last update, as when the checkpoint was saved (the loop sets each
            // step's own before its update), so a re-saved checkpoint equals the original.
            optimizer.set_lr(schedule.lr(state.global_step.saturating_sub(1).min(total_steps)))?;
        }
        let metrics = if rank == 0 {
            fs::create_dir_all(&config.output_dir).map_err(|e| Error::io(&config.output_dir, e))?;
            Metrics::open(&metrics_path, state.global_step, resume.is_some())?
        } else {
            Metrics::disabled(&metrics_path)
        };
        let progress = if rank == 0 {
            ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        progress.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .map_err(|e| Error::State(format!("progress bar template: {e}")))?,
        );
        progress.set_position(state.global_step);
        Ok(Self {
            config,
            model,
            optimizer,
            schedule,
            loader,
            validation,
            state,
            rank,
            world,
            metrics,
            progress,
        })
    }

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

    /// The summed loss of `batch` (and its backward, scaled by `scale`, when given).
    fn batch_loss(&self, batch: &Batch, scale: Option<f64>) -> Result<(f64, i64)> {
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
        Ok((out.sum, out.n_tokens))
    }

    /// The mean validation loss per target token (grad off, dropout off), over all processes.
    fn evaluate(&mut self, hooks: &mut dyn Hooks) -> Result<Option<f64>> {
        let Some(mut val) = self.validation.take() else {
            return Ok(None);
        };
        let training = self.model.training;
        self.model.training = false;
        let result = (|| -> Result<f64> {
            val.seek(Position::default())?;
            let mut sums = [0.0f64, 0.0];
            for (i, batch) in (&mut val).enumerate() {
                let batch = batch?;
                if i % self.world == self.rank {
                    let (s, n) = tch::no_grad(|| self.batch_loss(&batch, None))?;
                    sums[0] += s;
                    sums[1] += n as f64;
                }
            }
            hooks.all_reduce_sum(&mut sums)?;
            if sums[1] == 0.0 {
                return Err(Error::Input(
                    "the validation data has no target tokens".into(),
                ));
            }
            Ok(sums[0] / sums[1])
        })();
        self.model.training = training;
        self.validation = Some(val);
        let loss = result?;
        if loss.is_finite() && self.state.best_loss.is_none_or(|b| loss < b) {
            self.state.best_loss = Some(loss);
        }
        Ok(Some(loss))
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

    fn train(&mut self, hooks: &mut dyn Hooks) -> Result<Outcome> {
        let t = &self.config.training;
        let total = self.state.total_steps;
        let resumed = self.state.global_step > 0;
        let mut initial_eval = None;
        if !resumed {
            initial_eval = self.evaluate(hooks)?;
            if let Some(l) = initial_eval {
                self.say(&format!("step 0: eval_loss {l:.4}"));
                self.metrics.record(json!({"step": 0, "eval_loss": l}))?;
            }
        }
        let mut last_checkpoint = checkpoint::list(&self.config.output_dir)?.pop();
        let mut last_saved_step = None;
        let mut window_loss = (0.0f64, 0.0f64);
        let mut window_tokens = 0u64;
        let mut window_start = Instant::now();
        // Seconds spent in training steps (batches, forward, backward, update) by this run.
        let mut train_time = 0.0f64;
        let mut last_train_loss = None;
        let mut last_eval = None;
        let mut interrupted = false;
        while self.state.global_step < total {
            if hooks.should_stop() {
                interrupted = true;
                break;
            }
            let step = self.state.global_step;
            let step_start = Instant::now();
            let window = self.next_window()?;
            if window.is_empty() {
                continue;
            }
            let n_targets: i64 = window.iter().map(|b| b.n_target_tokens).sum();
            tch::manual_seed(seed_i64(mix(
                mix(self.state.seed ^ step.rotate_left(17)) ^ self.rank as u64
            )));
            let mut sums = [0.0f64, 0.0];
            if n_targets > 0 {
                let scale = 1.0 / n_targets as f64;
                for (i, batch) in window.iter().enumerate() {
                    if i % self.world != self.rank {
                        continue;
                    }
                    let (s, _) = self.batch_loss(batch, Some(scale))?;
                    sums[0] += s;
                    sums[1] += batch.n_tokens as f64;
                }
            }
            hooks.all_reduce_sum(&mut sums)?;
            if self.world > 1 {
                // Every rank must hand the all-reduce the same tensors, also a rank that had no
                // batch in a short last window (zero_grad leaves gradients undefined).
                crate::bridge::fill_missing_grads(
                    &self.optimizer.params().iter().collect::<Vec<_>>(),
                )?;
            }
            let grads: Vec<Tensor> = self
                .optimizer
                .params()
                .iter()
                .map(|p| p.f_grad())
                .collect::<std::result::Result<_, _>>()?;
            let defined: Vec<Tensor> = grads.into_iter().filter(Tensor::defined).collect();
            if self.world > 1 {
                hooks.all_reduce_grads(&defined)?;
            }
            let loss = if n_targets > 0 {
                sums[0] / n_targets as f64
            } else {
                f64::NAN
            };
            let loss = hooks.inspect_loss(step, loss);
            let norm = if n_targets == 0 || !loss.is_finite() {
                f64::NAN
            } else if t.max_grad_norm > 0.0 {
                self.optimizer.clip_grad_norm(t.max_grad_norm)?
            } else {
                self.optimizer.grad_norm()?
            };
            let lr = self.schedule.lr(step);
            if loss.is_finite() && norm.is_finite() {
                self.optimizer.set_lr(lr)?;
                self.optimizer.step()?;
                self.state.optimizer_steps += 1;
                self.state.nonfinite_in_a_row = 0;
                window_loss.0 += sums[0];
                window_loss.1 += n_targets as f64;
            } else {
                self.state.nonfinite_in_a_row += 1;
                let what = if n_targets == 0 {
                    "no target tokens in the window".to_string()
                } else {
                    format!("loss {loss}, gradient norm {norm}")
                };
                self.say(&format!(
                    "warning: step {}: non-finite ({what}); update skipped ({} in a row)",
                    step + 1,
                    self.state.nonfinite_in_a_row
                ));
                self.metrics
                    .record(json!({"step": step + 1, "skipped": true, "reason": what}))?;
                if self.state.nonfinite_in_a_row >= t.max_nonfinite_steps {
                    self.optimizer.zero_grad()?;
                    let kept = last_checkpoint.as_ref().map_or_else(
                        || "no checkpoint was saved yet".to_string(),
                        |p| format!("the last good checkpoint is {}", p.display()),
                    );
                    self.progress.abandon();
                    return Err(Error::NonFinite(format!(
                        "{} optimizer steps in a row had a non-finite loss or gradient (last at \
                         step {}); training stopped, {kept}. Lower the learning rate or check \
                         the data.",
                        self.state.nonfinite_in_a_row,
                        step + 1
                    )));
                }
            }
            self.optimizer.zero_grad()?;
            train_time += step_start.elapsed().as_secs_f64();
            self.state.global_step += 1;
            window_tokens += sums[1] as u64;
            self.state.tokens_seen += n_targets.max(0) as u64;
            let pos = self.loader.position();
            self.state.epoch = pos.epoch;
            self.state.batch = pos.batch;
            let gs = self.state.global_step;
            self.progress.set_position(gs);

            if gs % t.logging_steps == 0 || gs == total {
                let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
                let mean = (window_loss.1 > 0.0).then(|| window_loss.0 / window_loss.1);
                let record = json!({
                    "step": gs,
                    "epoch": pos.epoch as f64
                        + pos.batch as f64 / self.loader.num_batches().max(1) as f64,
                    "loss": mean,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens_per_s": window_tokens as f64 / elapsed,
                    "rss_bytes": rss_bytes(),
                    "peak_rss_bytes": peak_rss_bytes(),
                    "tokens_seen": self.state.tokens_seen,
                    "train_time_s": train_time,
                });
                if let Some(m) = mean {
                    last_train_loss = Some(m);
                    self.progress.set_message(format!(
                        "loss {m:.4} lr {lr:.2e} {:.0} tok/s",
                        window_tokens as f64 / elapsed
                    ));
                    self.say(&format!(
                        "step {gs}/{total}: loss {m:.4}, lr {lr:.3e}, grad_norm {norm:.3}, \
                         {:.0} tokens/s, rss {} MiB",
                        window_tokens as f64 / elapsed,
                        rss_bytes() >> 20
                    ));
                }
                self.metrics.record(record)?;
                window_loss = (0.0, 0.0);
                window_tokens = 0;
                window_start = Instant::now();
            }
            if t.eval_steps > 0 && gs % t.eval_steps == 0 && gs < total {
                if let Some(l) = self.evaluate(hooks)? {
                    last_eval = Some((gs, l));
                    self.say(&format!("step {gs}: eval_loss {l:.4}"));
                    self.metrics.record(json!({"step": gs, "eval_loss": l}))?;
                }
            }
            // No checkpoint in a non-finite streak: the last good one is what a user needs.
            if t.save_steps > 0
                && gs % t.save_steps == 0
                && gs < total
                && self.state.nonfinite_in_a_row == 0
            {
                last_checkpoint = Some(self.save_checkpoint()?);
                last_saved_step = Some(gs);
            }
        }
        let gs = self.state.global_step;
        let mut final_eval = None;
        if !interrupted {
            final_eval = match last_eval {
                Some((s, l)) if s == gs => Some(l),
                _ => self.evaluate(hooks)?,
            };
            if let Some(l) = final_eval {
                self.say(&format!("step {gs}: eval_loss {l:.4}"));
                // A run killed after its final checkpoint has logged this evaluation already.
                if !(resumed && self.metrics.has_eval_at(gs)?) {
                    self.metrics.record(json!({"step": gs, "eval_loss": l}))?;
                }
            }
        }
        if last_saved_step != Some(gs) {
            last_checkpoint = Some(self.save_checkpoint()?);
        }
        let mut adapter_dir = None;
        let mut plot_file = None;
        if self.rank == 0 && !interrupted {
            let dir = self.config.output_dir.join(ADAPTER_DIR);
            peft::save(&self.model, &dir)?;
            adapter_dir = Some(dir);
            let plot = self.config.output_dir.join(PLOT_FILE);
            let (train_pts, val_pts) = self.metrics.curves()?;
            crate::train::plot::write_loss_plot(&plot, &train_pts, &val_pts)?;
            plot_file = Some(plot);
        }
        self.progress.finish_and_clear();
        if interrupted {
            if let Some(c) = &last_checkpoint {
                self.say(&format!(
                    "interrupted at step {gs}: checkpoint saved to {}; resume with --resume {}",
                    c.display(),
                    c.display()
                ));
            }
        }
        Ok(Outcome {
            global_step: gs,
            total_steps: total,
            interrupted,
            initial_eval_loss: initial_eval,
            final_eval_loss: final_eval,
            last_train_loss,
            adapter_dir,
            last_checkpoint,
            metrics_file: self.metrics.path.clone(),
            plot_file,
            adapter_fingerprint: self.fingerprint()?,
        })
    }

    fn fingerprint(&self) -> Result<f64> {
        let mut acc = 0.0;
        for (i, p) in self.optimizer.params().iter().enumerate() {
            acc += (i + 1) as f64 * p.f_sum(Kind::Double)?.f_double_value(&[])?;
        }
        Ok(acc)
    }

    /// Writes `checkpoint-{global_step}` (rank 0; the other ranks only return its path).
    fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let step = self.state.global_step;
        let out = &self.config.output_dir;
        if self.rank != 0 {
            return Ok(out.join(format!("checkpoint-{step}")));
        }
        let info = json!({
            "epoch": self.state.epoch,
            "global_step": step,
            "best_loss": self.state.best_loss,
            "current_lr": self.optimizer.lr(),
            "lora_config": self.config.lora,
            "training_config": self.config.training,
        });
        let path = checkpoint::write(out, step, |dir| {
            peft::save(&self.model, dir)?;
            let state = self.optimizer.state_tensors();
            safetensors::save(
                &dir.join(checkpoint::OPTIMIZER_FILE),
                &state,
                &Default::default(),
            )?;
            checkpoint::write_json(&dir.join(checkpoint::STATE_FILE), &self.state)?;
            checkpoint::write_json(&dir.join(checkpoint::INFO_FILE), &info)?;
            checkpoint::write_json(&dir.join("train_config.json"), &self.config.to_json())
        })?;
        self.say(&format!("checkpoint saved: {}", path.display()));
        Ok(path)
    }
}

/// `(step, loss)` points.
type Curve = Vec<(u64, f64)>;

/// `metrics.jsonl`: appended one line per record and flushed, so a killed run keeps what it
/// logged; on resume, records after the checkpoint's step are dropped (they will be redone).
struct Metrics {
    path: PathBuf,
    file: Option<fs::File>,
}

impl Metrics {
    fn disabled(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
        }
    }

    fn open(path: &Path, step: u64, resume: bool) -> Result<Self> {
        let kept: Vec<String> = if resume {
            read_metrics(path)?
                .into_iter()
                .filter(|r| {
                    r.get("step")
                        .and_then(Value::as_u64)
                        .is_some_and(|s| s <= step)
                })
                .map(|r| r.to_string())
                .collect()
        } else {
            Vec::new()
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    fn record(&mut self, value: Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{value}")
                .and_then(|()| f.flush())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }

    /// Whether the file holds a validation loss of `step` (false when disabled).
    fn has_eval_at(&self, step: u64) -> Result<bool> {
        if self.file.is_none() {
            return Ok(false);
        }
        Ok(read_metrics(&self.path)?.iter().any(|r| {
            r.get("step").and_then(Value::as_u64) == Some(step) && r.get("eval_loss").is_some()
        }))
    }

    /// (train loss, validation loss) points by step.
    fn curves(&self) -> Result<(Curve, Curve)> {
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for r in read_metrics(&self.path)? {
            let Some(step) = r.get("step").and_then(Value::as_u64) else {
                continue;
            };
            if let Some(l) = r.get("loss").and_then(Value::as_f64) {
                train.push((step, l));
            }
            if let Some(l) = r.get("eval_loss").and_then(Value::as_f64) {
                val.push((step, l));
            }
        }
        Ok((train, val))
    }
}

/// The records of a metrics file (a torn last line, from a kill, is ignored).
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}
