//! The steps of a run's setup, each on its own: prepare the output directory (lock, clean up,
//! refuse or delete an earlier run's checkpoints), load the data, load the model and add the
//! adapters, plan the steps, build the optimizer and schedule, resume from a checkpoint.
use std::fs;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tch::Kind;

use super::train_loop::Tally;
use super::{seed_i64, Hooks, Run, ADAPTER_DIR, METRICS_FILE};
use crate::data::loader::mix;
use crate::data::{self, DataLoader, LoaderConfig, Position};
use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::hf::loaded::{LoadOptions, LoadedModel};
use crate::hf::peft;
use crate::lora::LoraSpec;
use crate::model::Quantize;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::TrainConfig;
use crate::train::lock::OutputDirLock;
use crate::train::metrics::Metrics;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::schedule::{Schedule, ScheduleConfig, ScheduleKind};

/// The training and validation batches of a run.
struct Data {
    loader: DataLoader,
    validation: Option<DataLoader>,
    pad_id: i64,
    /// The data inspector's warnings on the training data (printed by rank 0).
    warnings: Vec<data::inspect::DataWarning>,
}

/// `(rank, world_size)` of this process, checked.
fn process_group(hooks: &dyn Hooks) -> Result<(usize, usize)> {
    let (rank, world) = hooks.world();
    if world == 0 || rank >= world {
        return Err(Error::Config(format!(
            "invalid process group: rank {rank} of {world}"
        )));
    }
    Ok((rank, world))
}

/// Before anything is loaded: rank 0 locks the output directory and cleans up after a killed
/// run; a fresh run (not `resuming`) refuses, or with `overwrite_output_dir` deletes, an earlier
/// run's checkpoints and adapter. Returns rank 0's lock.
fn prepare_output_dir(
    config: &TrainConfig,
    rank: usize,
    resuming: bool,
) -> Result<Option<OutputDirLock>> {
    let out = &config.output_dir;
    let lock = if rank == 0 {
        let lock = OutputDirLock::acquire(out)?;
        // Leftovers of a killed run: unfinished saves and temporary files.
        checkpoint::recover(out)?;
        crate::io::atomic::remove_temp_files(&out.join(ADAPTER_DIR))?;
        Some(lock)
    } else {
        None
    };
    if !resuming {
        // With overwrite_output_dir, rank 0 deletes; every rank refuses otherwise.
        if !config.training.overwrite_output_dir {
            checkpoint::prepare_fresh(out, false)?;
        } else if rank == 0 {
            checkpoint::prepare_fresh(out, true)?;
            // The earlier run's final adapter would pass for this run's if this one stops.
            let adapter = out.join(ADAPTER_DIR);
            if adapter.is_dir() {
                fs::remove_dir_all(&adapter).map_err(|e| Error::io(&adapter, e))?;
            }
        }
    }
    Ok(lock)
}

/// Tokenizes the training data (and the validation data, or splits it off) into loaders.
fn load_data(config: &TrainConfig) -> Result<Data> {
    let t = &config.training;
    let tokenizer = Tokenizer::for_model(&config.model)?;
    let pad_id = data::pad_id(&tokenizer)?;
    let checked = data::inspect::load_checked(
        &config.data,
        &tokenizer,
        t.max_seq_length,
        t.train_on_inputs,
    )?;
    let (train_set, warnings) = (checked.examples, checked.warnings);
    let (train_examples, val_examples) = match &config.validation_data {
        Some(path) => (
            train_set.examples,
            data::load_examples(path, &tokenizer, t.max_seq_length, t.train_on_inputs)?.examples,
        ),
        None => {
            data::train_validation_split(train_set.examples, config.validation_split, config.seed)?
        }
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
    let loader = DataLoader::new(train_examples, loader_config.clone())?;
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
    Ok(Data {
        loader,
        validation,
        pad_id,
        warnings,
    })
}

/// Loads the model, checks that the data's token ids fit its vocabulary, and adds freshly
/// initialised adapters (float32 whatever the model's dtype), in training mode.
fn load_model(config: &TrainConfig, options: &LoadOptions, data: &Data) -> Result<LoadedModel> {
    let mut model = LoadedModel::load(&config.model, options)?;
    let vocab = model.lm.config.vocab_size;
    let max_id = data
        .loader
        .examples()
        .iter()
        .chain(data.validation.iter().flat_map(|v| v.examples()))
        .flat_map(|e| e.input_ids.iter().copied())
        .max()
        .unwrap_or(0)
        .max(data.pad_id);
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
    model.set_gradient_checkpointing(config.training.gradient_checkpointing);
    Ok(model)
}

/// The optimizer steps of the run: `max_steps`, else the accumulation windows of every epoch
/// (a window never spans two epochs, so an epoch's last one may be short).
fn plan_steps(config: &TrainConfig, loader: &mut DataLoader, world: usize) -> Result<u64> {
    let t = &config.training;
    let window = (t.gradient_accumulation_steps * world) as u64;
    Ok(match t.max_steps {
        Some(s) => s,
        None => {
            let mut steps = 0;
            for epoch in 0..t.num_epochs {
                steps += (loader.batches_in_epoch(epoch)? as u64).div_ceil(window);
            }
            steps
        }
    })
}

/// The learning-rate schedule over `total_steps` and AdamW over the model's adapters.
fn optimizer_and_schedule(
    config: &TrainConfig,
    model: &LoadedModel,
    total_steps: u64,
) -> Result<(AdamW, Schedule)> {
    let t = &config.training;
    let kind_name = ScheduleKind::from_name(&t.scheduler_type)?;
    let warmup = if kind_name.has_warmup() {
        t.warmup_steps
    } else {
        0
    };
    let schedule = Schedule::new(ScheduleConfig {
        kind: kind_name,
        initial_lr: t.learning_rate,
        min_lr: t.min_lr,
        total_steps,
        warmup_steps: warmup,
        ..Default::default()
    })?;
    let optimizer = AdamW::new(
        model.parameters()?,
        AdamWConfig {
            lr: schedule.lr(0),
            weight_decay: t.weight_decay,
            ..Default::default()
        },
    )?;
    Ok((optimizer, schedule))
}

/// The progress bar: drawn on rank 0's stderr, hidden elsewhere.
fn progress_bar(rank: usize, total_steps: u64, position: u64) -> Result<ProgressBar> {
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
    progress.set_position(position);
    Ok(progress)
}

impl<'a> Run<'a> {
    /// Runs the setup steps in order; see the module docs.
    pub(super) fn setup(
        config: &'a TrainConfig,
        resume: Option<&Path>,
        hooks: &mut dyn Hooks,
    ) -> Result<Self> {
        let t = &config.training;
        let (rank, world) = process_group(hooks)?;
        let options = LoadOptions {
            device: parse_device(&t.device)?,
            kind: parse_dtype(&t.dtype)?,
            quantize: Quantize::parse(config.quantize.as_deref())?,
        };
        let lock = prepare_output_dir(config, rank, resume.is_some())?;
        let resume = resume.map(checkpoint::resolve).transpose()?;
        let mut data = load_data(config)?;
        if rank == 0 {
            // Before the (slow) model load: `loratch data` shows the same.
            for w in &data.warnings {
                eprintln!("warning: {w}");
            }
        }
        let model = load_model(config, &options, &data)?;
        if let (0, Some((summary, warning))) = (rank, model.lora_coverage()) {
            eprintln!("{summary}");
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
        }
        let total_steps = plan_steps(config, &mut data.loader, world)?;
        let (optimizer, schedule) = optimizer_and_schedule(config, &model, total_steps)?;
        let state = TrainerState {
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
        let mut run = Self {
            config,
            model,
            optimizer,
            schedule,
            loader: data.loader,
            validation: data.validation,
            state,
            rank,
            world,
            metrics: Metrics::disabled(&metrics_path),
            progress: ProgressBar::hidden(),
            tally: Tally::new(),
            _lock: lock,
        };
        if let Some(dir) = &resume {
            run.resume_from(dir)?;
        }
        if rank == 0 {
            fs::create_dir_all(&config.output_dir).map_err(|e| Error::io(&config.output_dir, e))?;
            run.metrics = Metrics::open(&metrics_path, run.state.global_step, resume.is_some())?;
        }
        run.progress = progress_bar(rank, total_steps, run.state.global_step)?;
        Ok(run)
    }

    /// Continues from checkpoint `dir`: adapters, optimizer state, data position and trainer
    /// state as saved (the schedule is the config's).
    fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let (config, world) = (self.config, self.world);
        let saved = checkpoint::read_state(dir)?;
        if saved.world_size != world {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "saved by {} processes; resuming with {world} would change the data order",
                    saved.world_size
                ),
            });
        }
        if saved.seed != config.seed {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "saved with seed {}; the config says {}",
                    saved.seed, config.seed
                ),
            });
        }
        peft::load(&mut self.model, dir)?;
        self.optimizer
            .load_state(&checkpoint::read_optimizer(dir)?, saved.optimizer_steps)?;
        self.loader.seek(Position {
            epoch: saved.epoch,
            batch: saved.batch,
        })?;
        let total_steps = self.state.total_steps;
        self.state = TrainerState {
            total_steps,
            scheduler_type: config.training.scheduler_type.clone(),
            ..saved
        };
        // The rate of the last update, as when the checkpoint was saved (the loop sets each
        // step's own before its update), so a re-saved checkpoint equals the original.
        let last = self.state.global_step.saturating_sub(1).min(total_steps);
        self.optimizer.set_lr(self.schedule.lr(last))
    }
}
