//! The steps of a run's setup, each on its own: check the data files, prepare the output
//! directory (lock, clean up, refuse or delete an earlier run's checkpoints and adapter), load the data,
//! plan the steps and the schedule (so every config error comes before the model loads), load
//! the model and add the adapters, build the optimizer, resume from a checkpoint.
use std::fs;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tch::Kind;

use super::train_loop::Tally;
use super::{seed_i64, Hooks, Run, ADAPTER_FILES, LEGACY_ADAPTER_DIR, METRICS_FILE};
use crate::advice::Caller;
use crate::data::loader::mix;
use crate::data::{self, DataLoader, LoaderConfig, Position};
use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::hf::hub_cache;
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
use crate::train::tensorboard::{self, RUNS_DIR};

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
    caller: Caller,
) -> Result<Option<OutputDirLock>> {
    let out = &config.output_dir;
    let lock = if rank == 0 {
        let lock = OutputDirLock::acquire(out)?;
        // Leftovers of a killed run: unfinished saves and temporary files.
        checkpoint::recover(out)?;
        crate::io::atomic::remove_temp_files(&out.join(LEGACY_ADAPTER_DIR))?;
        Some(lock)
    } else {
        None
    };
    if !resuming {
        // With overwrite_output_dir, rank 0 deletes; every rank refuses otherwise.
        if !config.training.overwrite_output_dir {
            checkpoint::prepare_fresh(out, false, caller)?;
        } else if rank == 0 {
            checkpoint::prepare_fresh(out, true, caller)?;
            // The earlier run's final adapter would pass for this run's if this one stops.
            let legacy = out.join(LEGACY_ADAPTER_DIR);
            if legacy.is_dir() {
                fs::remove_dir_all(&legacy).map_err(|e| Error::io(&legacy, e))?;
            }
            for name in ADAPTER_FILES {
                let file = out.join(name);
                if file.is_file() {
                    fs::remove_file(&file).map_err(|e| Error::io(&file, e))?;
                }
            }
        }
    }
    Ok(lock)
}

/// Tokenizes the training data (and the validation data, or splits it off) into loaders.
fn load_data(config: &TrainConfig, model_path: &Path) -> Result<Data> {
    let t = &config.training;
    let tokenizer = Tokenizer::for_model(model_path)?;
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
fn load_model(
    config: &TrainConfig,
    model_path: &Path,
    options: &LoadOptions,
    data: &Data,
) -> Result<LoadedModel> {
    let mut model = LoadedModel::load(model_path, options)?;
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

/// The learning-rate schedule over `total_steps` (before the model loads, so its errors and
/// the warm-up warning come first). A warm-up as long as the run is clamped, with a warning.
fn schedule(config: &TrainConfig, total_steps: u64, rank: usize) -> Result<Schedule> {
    let t = &config.training;
    let (warmup, warning) = config.warmup_for(total_steps)?;
    if let (Some(w), 0) = (warning, rank) {
        eprintln!("warning: {w}");
    }
    Schedule::new(ScheduleConfig {
        kind: ScheduleKind::from_name(&t.scheduler_type)?,
        initial_lr: t.learning_rate,
        min_lr: t.min_lr,
        total_steps,
        warmup_steps: warmup,
        ..Default::default()
    })
}

/// AdamW over the model's adapters, at the schedule's first rate.
fn optimizer(config: &TrainConfig, model: &LoadedModel, schedule: &Schedule) -> Result<AdamW> {
    AdamW::new(
        model.parameters()?,
        AdamWConfig {
            lr: schedule.lr(0),
            weight_decay: config.training.weight_decay,
            ..Default::default()
        },
    )
}

/// The data files exist (checked before anything is loaded, so a missing file is reported
/// before a model error).
fn check_data_files(config: &TrainConfig) -> Result<()> {
    for path in std::iter::once(&config.data).chain(config.validation_data.as_ref()) {
        fs::metadata(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// The checkpoint's adapters have the config's layout (`[lora]` rank, alpha, target_modules,
/// use_rslora), or an error saying which keys to set to resume it.
fn check_lora_layout(config: &TrainConfig, dir: &Path, caller: Caller) -> Result<()> {
    let Some(saved) = checkpoint::read_lora_config(dir) else {
        return Ok(());
    };
    let ours = &config.lora;
    let show = |v: serde_json::Value| v.to_string();
    let py = |v: &serde_json::Value| match v {
        serde_json::Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        other => other.to_string(),
    };
    let pairs = [
        (
            "rank",
            serde_json::json!(saved.rank),
            serde_json::json!(ours.rank),
        ),
        (
            "alpha",
            serde_json::json!(saved.alpha),
            serde_json::json!(ours.alpha),
        ),
        (
            "target_modules",
            saved.target_modules.clone(),
            ours.target_modules.clone(),
        ),
        (
            "use_rslora",
            serde_json::json!(saved.use_rslora),
            serde_json::json!(ours.use_rslora),
        ),
    ];
    let differ: Vec<_> = pairs.iter().filter(|(_, a, b)| a != b).collect();
    if differ.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = differ
        .iter()
        .map(|(k, a, b)| {
            format!(
                "{k}: {} in the checkpoint, {} in the config",
                show(a.clone()),
                show(b.clone())
            )
        })
        .collect();
    let set: Vec<String> = differ
        .iter()
        .map(|(k, a, _)| caller.setting("lora", k, &show(a.clone()), &py(a)))
        .collect();
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!(
            "its adapters differ from the config's ({}): to resume, set {}; or start a fresh run \
             into another output_dir",
            what.join("; "),
            set.join(" and ")
        ),
    })
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
        // Every error the config and the data files can cause comes before the model loads.
        check_data_files(config)?;
        let caller = hooks.caller();
        let lock = prepare_output_dir(config, rank, resume.is_some(), caller)?;
        let resume = resume.map(checkpoint::resolve).transpose()?;
        let model_path = hub_cache::resolve(&config.model)?;
        let mut data = load_data(config, &model_path)?;
        if rank == 0 {
            // Before the (slow) model load: `loratch data` shows the same.
            for w in &data.warnings {
                eprintln!("warning: {w}");
            }
        }
        let total_steps = plan_steps(config, &mut data.loader, world)?;
        let schedule = schedule(config, total_steps, rank)?;
        let model = load_model(config, &model_path, &options, &data)?;
        if let (0, Some((summary, warning))) = (rank, model.lora_coverage()) {
            eprintln!("{summary}");
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
        }
        let optimizer = optimizer(config, &model, &schedule)?;
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
            best_checkpoint: None,
            best_metric: None,
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
            resumed_from: resume.clone(),
            rank,
            world,
            caller,
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
            let runs = tensorboard::wants_tensorboard(&t.report_to)?
                .then(|| config.output_dir.join(RUNS_DIR));
            run.metrics = Metrics::open(
                &metrics_path,
                run.state.global_step,
                resume.is_some(),
                runs.as_deref(),
            )?;
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
        check_lora_layout(config, dir, self.caller)?;
        peft::load_for(&mut self.model, dir, self.caller)?;
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
