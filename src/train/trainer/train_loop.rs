//! The training loop: [`Run::step`] takes one optimizer step and says what it did
//! ([`StepOutcome`]), [`Run::after_step`] logs, evaluates and saves, [`Run::finish`] ends the run.
use std::path::PathBuf;
use std::time::Instant;

use tch::Tensor;

use super::{seed_i64, Hooks, Outcome, Run, PLOT_FILE};
use crate::data::loader::mix;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::hf::peft;
use crate::runtime;
use crate::train::checkpoint;
use crate::train::metrics::{Record, TrainRecord};
use crate::train::plot::write_loss_plot;
use crate::train::tensorboard::{self, RUNS_DIR};

/// What the loop carries from step to step (not saved in checkpoints).
pub(super) struct Tally {
    /// Loss sum, target tokens and targets predicted right (argmax) of the updates since the
    /// last log line...
    loss: (f64, f64),
    correct: f64,
    /// ...their input tokens, and when that logging window began.
    tokens: u64,
    since: Instant,
    /// Seconds spent in training steps (batches, forward, backward, update) by this run.
    train_time: f64,
    last_train_loss: Option<f64>,
    /// The last validation loss and token accuracy, with its step.
    last_eval: Option<(u64, f64, f64)>,
    last_checkpoint: Option<PathBuf>,
    last_saved_step: Option<u64>,
}

impl Tally {
    pub(super) fn new() -> Self {
        Self {
            loss: (0.0, 0.0),
            correct: 0.0,
            tokens: 0,
            since: Instant::now(),
            train_time: 0.0,
            last_train_loss: None,
            last_eval: None,
            last_checkpoint: None,
            last_saved_step: None,
        }
    }

    fn restart_window(&mut self) {
        self.loss = (0.0, 0.0);
        self.correct = 0.0;
        self.tokens = 0;
        self.since = Instant::now();
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
enum StepOutcome {
    /// The update was applied.
    Updated { lr: f64, grad_norm: f64 },
    /// The update was skipped (the optimizer state and adapters are unchanged).
    Skipped {
        lr: f64,
        grad_norm: f64,
        reason: SkipReason,
    },
}

impl StepOutcome {
    /// The learning rate of the step (applied or not).
    fn lr(&self) -> f64 {
        match self {
            StepOutcome::Updated { lr, .. } | StepOutcome::Skipped { lr, .. } => *lr,
        }
    }

    /// The gradient norm before clipping (NaN when the loss was not finite).
    fn grad_norm(&self) -> f64 {
        match self {
            StepOutcome::Updated { grad_norm, .. } | StepOutcome::Skipped { grad_norm, .. } => {
                *grad_norm
            }
        }
    }
}

/// Why an update was skipped.
#[derive(Debug, Clone, PartialEq)]
enum SkipReason {
    /// The accumulation window had no target token (no loss to learn from).
    NoTargets,
    /// The loss or the gradient norm is NaN or infinite.
    NonFinite { loss: f64, grad_norm: f64 },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NoTargets => f.write_str("no target tokens in the window"),
            SkipReason::NonFinite { loss, grad_norm } => {
                write!(f, "loss {loss}, gradient norm {grad_norm}")
            }
        }
    }
}

impl Run<'_> {
    /// The loop: an evaluation before the first step (not on resume), then steps until the
    /// planned number or an interruption, then [`Run::finish`].
    pub(super) fn train(&mut self, hooks: &mut dyn Hooks) -> Result<Outcome> {
        let resumed = self.state.global_step > 0;
        let initial_eval = if resumed {
            None
        } else {
            self.evaluate_and_log(hooks)?
        };
        self.tally.last_checkpoint = checkpoint::list(&self.config.output_dir)?.pop();
        self.tally.restart_window();
        let mut interrupted = false;
        while self.state.global_step < self.state.total_steps {
            if hooks.should_stop() {
                interrupted = true;
                break;
            }
            let outcome = self.step(hooks)?;
            self.after_step(hooks, &outcome)?;
        }
        self.finish(hooks, interrupted, resumed, initial_eval)
    }

    /// One optimizer step over the next accumulation window: this process's forward and
    /// backward passes, the sums over processes, then the update, skipped when the loss or the
    /// gradient is not finite.
    fn step(&mut self, hooks: &mut dyn Hooks) -> Result<StepOutcome> {
        let t = &self.config.training;
        let step = self.state.global_step;
        let start = Instant::now();
        let window = self.next_window()?;
        let n_targets: i64 = window.iter().map(|b| b.n_target_tokens).sum();
        let [loss_sum, n_tokens, n_correct] = self.forward_backward(&window, n_targets, hooks)?;
        let loss = if n_targets > 0 {
            loss_sum / n_targets as f64
        } else {
            f64::NAN
        };
        let loss = hooks.inspect_loss(step, loss);
        let grad_norm = if n_targets == 0 || !loss.is_finite() {
            f64::NAN
        } else if t.max_grad_norm > 0.0 {
            self.optimizer.clip_grad_norm(t.max_grad_norm)?
        } else {
            self.optimizer.grad_norm()?
        };
        let lr = self.schedule.lr(step);
        let outcome = if loss.is_finite() && grad_norm.is_finite() {
            self.optimizer.set_lr(lr)?;
            self.optimizer.step()?;
            self.state.optimizer_steps += 1;
            self.state.nonfinite_in_a_row = 0;
            self.tally.loss.0 += loss_sum;
            self.tally.loss.1 += n_targets as f64;
            self.tally.correct += n_correct;
            StepOutcome::Updated { lr, grad_norm }
        } else {
            self.state.nonfinite_in_a_row += 1;
            let reason = if n_targets == 0 {
                SkipReason::NoTargets
            } else {
                SkipReason::NonFinite { loss, grad_norm }
            };
            StepOutcome::Skipped {
                lr,
                grad_norm,
                reason,
            }
        };
        self.optimizer.zero_grad()?;
        self.tally.train_time += start.elapsed().as_secs_f64();
        self.state.global_step += 1;
        self.tally.tokens += n_tokens as u64;
        self.state.tokens_seen += n_targets.max(0) as u64;
        let pos = self.loader.position();
        self.state.epoch = pos.epoch;
        self.state.batch = pos.batch;
        self.progress.set_position(self.state.global_step);
        Ok(outcome)
    }

    /// This process's share of `window` (micro-batch `i` when `i % world == rank`), forward and
    /// backward, each gradient scaled by `1 / n_targets` (the target tokens of the whole
    /// window); then the loss and token sums and the gradients are summed over processes.
    /// Returns `[summed loss, input tokens, targets predicted right]`.
    fn forward_backward(
        &mut self,
        window: &[Batch],
        n_targets: i64,
        hooks: &mut dyn Hooks,
    ) -> Result<[f64; 3]> {
        let step = self.state.global_step;
        tch::manual_seed(seed_i64(mix(
            mix(self.state.seed ^ step.rotate_left(17)) ^ self.rank as u64
        )));
        let mut sums = [0.0f64, 0.0, 0.0];
        if n_targets > 0 {
            let scale = 1.0 / n_targets as f64;
            for (i, batch) in window.iter().enumerate() {
                if i % self.world != self.rank {
                    continue;
                }
                let (s, _, correct) = self.batch_loss(batch, Some(scale))?;
                sums[0] += s;
                sums[1] += batch.n_tokens as f64;
                sums[2] += correct as f64;
            }
        }
        hooks.all_reduce_sum(&mut sums)?;
        if self.world > 1 {
            // Every rank must hand the all-reduce the same tensors, also a rank that had no
            // batch in a short last window (zero_grad leaves gradients undefined).
            let params = self.optimizer.params();
            crate::ffi::fill_missing_grads(&params.iter().collect::<Vec<_>>())?;
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| p.f_grad())
                .collect::<std::result::Result<_, _>>()?;
            let defined: Vec<Tensor> = grads.into_iter().filter(Tensor::defined).collect();
            hooks.all_reduce_grads(&defined)?;
        }
        Ok(sums)
    }

    /// After a step: reports a skipped update (and stops a run that skipped too many in a row),
    /// then logs, evaluates and saves a checkpoint as the config's intervals say.
    fn after_step(&mut self, hooks: &mut dyn Hooks, outcome: &StepOutcome) -> Result<()> {
        if let StepOutcome::Skipped { reason, .. } = outcome {
            self.report_skip(reason)?;
        }
        let t = &self.config.training;
        let (gs, total) = (self.state.global_step, self.state.total_steps);
        if gs % t.logging_steps == 0 || gs == total {
            self.log(outcome)?;
        }
        if t.eval_steps > 0 && gs % t.eval_steps == 0 && gs < total {
            self.evaluate_and_log(hooks)?;
        }
        // No checkpoint in a non-finite streak: the last good one is what a user needs.
        if t.save_steps > 0
            && gs % t.save_steps == 0
            && gs < total
            && self.state.nonfinite_in_a_row == 0
        {
            let eval_loss = self.eval_loss_at(gs);
            self.tally.last_checkpoint = Some(self.save_checkpoint(eval_loss)?);
            self.tally.last_saved_step = Some(gs);
        }
        Ok(())
    }

    /// The validation loss evaluated at step `gs`, if one was.
    fn eval_loss_at(&self, gs: u64) -> Option<f64> {
        self.tally
            .last_eval
            .filter(|e| e.0 == gs)
            .map(|(_, loss, _)| loss)
    }

    /// Warns about and logs the skipped update of the step just taken; too many in a row are an
    /// [`Error::NonFinite`] naming the last good checkpoint.
    fn report_skip(&mut self, reason: &SkipReason) -> Result<()> {
        let step = self.state.global_step;
        let in_a_row = self.state.nonfinite_in_a_row;
        self.say(&format!(
            "warning: step {step}: non-finite ({reason}); update skipped ({in_a_row} in a row)"
        ));
        self.metrics
            .record(Record::skipped(step, reason.to_string()))?;
        if in_a_row < self.config.training.max_nonfinite_steps {
            return Ok(());
        }
        let kept = self.tally.last_checkpoint.as_ref().map_or_else(
            || "no checkpoint was saved yet".to_string(),
            |p| format!("the last good checkpoint is {}", p.display()),
        );
        self.progress.abandon();
        Err(Error::NonFinite(format!(
            "{in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step \
             {step}); training stopped, {kept}. Lower the learning rate or check the data."
        )))
    }

    /// The log line of the step just taken (metrics record, progress bar and stderr), over the
    /// updates since the last one.
    fn log(&mut self, outcome: &StepOutcome) -> Result<()> {
        let (gs, total) = (self.state.global_step, self.state.total_steps);
        let (lr, grad_norm) = (outcome.lr(), outcome.grad_norm());
        let elapsed = self.tally.since.elapsed().as_secs_f64().max(1e-9);
        let tokens_per_s = self.tally.tokens as f64 / elapsed;
        let (loss_sum, n_targets) = self.tally.loss;
        let mean = (n_targets > 0.0).then(|| loss_sum / n_targets);
        let record = TrainRecord {
            step: gs,
            epoch: self.fractional_epoch(),
            loss: mean,
            mean_token_accuracy: (n_targets > 0.0).then(|| self.tally.correct / n_targets),
            learning_rate: lr,
            grad_norm,
            tokens_per_s,
            rss_bytes: runtime::rss_bytes(),
            peak_rss_bytes: runtime::peak_rss_bytes(),
            tokens_seen: self.state.tokens_seen,
            train_time_s: self.tally.train_time,
        };
        if let Some(m) = mean {
            self.tally.last_train_loss = Some(m);
            self.progress
                .set_message(format!("loss {m:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"));
            self.say(&format!(
                "step {gs}/{total}: loss {m:.4}, lr {lr:.3e}, grad_norm {grad_norm:.3}, \
                 {tokens_per_s:.0} tokens/s, rss {} MiB",
                runtime::rss_bytes() >> 20
            ));
        }
        self.metrics.record(Record::Train(record))?;
        self.tally.restart_window();
        Ok(())
    }

    /// Evaluates and logs the validation loss and token accuracy at the current step (None
    /// without validation data).
    fn evaluate_and_log(&mut self, hooks: &mut dyn Hooks) -> Result<Option<f64>> {
        let eval = self.evaluate(hooks)?;
        if let Some((l, a)) = eval {
            let gs = self.state.global_step;
            self.say(&format!(
                "step {gs}: eval_loss {l:.4}, eval_mean_token_accuracy {a:.4}"
            ));
            self.metrics.record(Record::eval(gs, l, Some(a)))?;
            self.tally.last_eval = Some((gs, l, a));
        }
        Ok(eval.map(|e| e.0))
    }

    /// The end of the run, completed or `interrupted`: the final evaluation, a checkpoint of
    /// the last step, and (rank 0, completed) the final adapter and the loss plot.
    fn finish(
        &mut self,
        hooks: &mut dyn Hooks,
        interrupted: bool,
        resumed: bool,
        initial_eval: Option<f64>,
    ) -> Result<Outcome> {
        let gs = self.state.global_step;
        let mut final_eval = None;
        if !interrupted {
            final_eval = match self.tally.last_eval {
                Some((s, l, a)) if s == gs => Some((l, a)),
                _ => self.evaluate(hooks)?,
            };
            if let Some((l, a)) = final_eval {
                self.say(&format!(
                    "step {gs}: eval_loss {l:.4}, eval_mean_token_accuracy {a:.4}"
                ));
                // A run killed after its final checkpoint has logged this evaluation already.
                if !(resumed && self.metrics.has_eval_at(gs)) {
                    self.metrics.record(Record::eval(gs, l, Some(a)))?;
                }
                self.tally.last_eval = Some((gs, l, a));
            }
        }
        if self.tally.last_saved_step != Some(gs) {
            let eval_loss = self.eval_loss_at(gs);
            self.tally.last_checkpoint = Some(self.save_checkpoint(eval_loss)?);
        }
        let config = self.config;
        let out = &config.output_dir;
        let best_checkpoint = self.state.best_checkpoint.as_ref().map(|b| out.join(b));
        let mut adapter_dir = None;
        let mut plot_file = None;
        if self.rank == 0 && !interrupted {
            if let (true, Some(best)) = (config.training.load_best_at_end, &best_checkpoint) {
                // Hugging Face's load_best_model_at_end: the model ends as the best checkpoint.
                peft::load(&mut self.model, best)?;
                self.say(&format!(
                    "load_best_at_end: the final adapter is {}'s (eval_loss {:.4})",
                    best.display(),
                    self.state.best_metric.unwrap_or(f64::NAN)
                ));
            }
            // The root of output_dir, so PeftModel.from_pretrained(base, output_dir) loads it.
            peft::save(&self.model, out)?;
            adapter_dir = Some(out.clone());
            let plot = out.join(PLOT_FILE);
            let curves = self.metrics.curves();
            write_loss_plot(&plot, &curves.train, &curves.validation)?;
            plot_file = Some(plot);
        }
        self.progress.finish_and_clear();
        let last_checkpoint = self.tally.last_checkpoint.clone();
        let tensorboard_dir = (self.rank == 0
            && tensorboard::wants_tensorboard(&config.training.report_to)?)
        .then(|| out.join(RUNS_DIR));
        if let (true, Some(c)) = (interrupted, &last_checkpoint) {
            self.say(&format!(
                "interrupted at step {gs}: checkpoint saved to {}; resume with {}",
                c.display(),
                self.caller.resume(c)
            ));
        }
        Ok(Outcome {
            global_step: gs,
            total_steps: self.state.total_steps,
            interrupted,
            initial_eval_loss: initial_eval,
            final_eval_loss: final_eval.map(|e| e.0),
            last_train_loss: self.tally.last_train_loss,
            adapter_dir,
            last_checkpoint,
            best_checkpoint,
            tensorboard_dir,
            metrics_file: self.metrics.path().to_path_buf(),
            plot_file,
            adapter_fingerprint: self.fingerprint()?,
        })
    }
}
