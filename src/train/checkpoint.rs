//! Training checkpoints: `output_dir/checkpoint-{step}/` holds the adapters in PEFT layout, the
//! optimizer state, the trainer state (step, data position, schedule, RNG seed, best checkpoint,
//! with Hugging Face's `trainer_state.json` keys besides) and the spec's metadata JSON. A
//! checkpoint is written into a hidden temporary directory, synced, and renamed into place, so a
//! `checkpoint-*` directory is always complete: a kill or a full disk during a save leaves the
//! previous checkpoints as they were; [`rotate`] keeps their number within `save_total_limit`.
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::Tensor;

use crate::advice::Caller;
use crate::error::{Error, Result};
use crate::io::safetensors::MappedSafetensors;
use crate::train::config::{LoraSection, TrainingSection};

/// The adapter files (PEFT layout) inside a checkpoint directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Optimizer moments (and fp32 masters), safetensors.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// [`StateFile`] as JSON.
pub const STATE_FILE: &str = "trainer_state.json";
/// The spec's metadata: `epoch, global_step, best_loss, current_lr, lora_config,
/// training_config`.
pub const INFO_FILE: &str = "training_info.json";

/// Everything besides tensors that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken (updates and skipped non-finite steps).
    pub global_step: u64,
    /// The data position: the epoch of the next batch (`data_epoch` in the file, where `epoch`
    /// is Hugging Face's fractional epoch; older files have only this, as `epoch`)...
    #[serde(rename = "data_epoch")]
    pub epoch: u64,
    /// ...and its index in that epoch.
    pub batch: usize,
    /// The optimizer's own step count (updates actually applied).
    pub optimizer_steps: u64,
    /// The schedule: its kind and total steps (the learning rate is a function of the step).
    pub scheduler_type: String,
    pub total_steps: u64,
    /// Dropout's generator is reseeded from (seed, step, rank) at every step, so the seed is its
    /// whole state.
    pub seed: u64,
    /// The lowest validation loss so far.
    pub best_loss: Option<f64>,
    /// Non-finite steps in a row at this point.
    pub nonfinite_in_a_row: u32,
    /// Target tokens trained on so far.
    pub tokens_seen: u64,
    /// Processes the run had (resuming with another number changes the data order).
    pub world_size: usize,
    /// The checkpoint (directory name) with the lowest validation loss evaluated at its step...
    #[serde(default)]
    pub best_checkpoint: Option<String>,
    /// ...and that loss (Hugging Face's `best_metric`).
    #[serde(default)]
    pub best_metric: Option<f64>,
}

/// Hugging Face's `trainer_state.json` keys that [`TrainerState`] lacks, written beside it so
/// that tools reading Hugging Face's file (`log_history`, `best_model_checkpoint`) read ours;
/// derived from the run when saved, not read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HfState {
    /// Fractional epoch: the data position after the step.
    pub epoch: f64,
    pub max_steps: u64,
    pub num_train_epochs: u64,
    pub logging_steps: u64,
    pub eval_steps: u64,
    pub save_steps: u64,
    pub train_batch_size: usize,
    /// The best checkpoint's path and step.
    pub best_model_checkpoint: Option<String>,
    pub best_global_step: Option<u64>,
    /// The records of `metrics.jsonl` up to this step.
    pub log_history: Vec<Value>,
}

/// `trainer_state.json`: [`TrainerState`] and [`HfState`] side by side in one object.
#[derive(Debug, Serialize)]
pub struct StateFile<'a> {
    #[serde(flatten)]
    pub state: &'a TrainerState,
    #[serde(flatten)]
    pub hf: &'a HfState,
}

/// `training_info.json`: the spec's metadata of a checkpoint, for people and tools (the trainer
/// reads [`TrainerState`] to resume). Fields in the order the file has always listed them
/// (alphabetical).
#[derive(Debug, Serialize)]
pub struct TrainingInfo<'a> {
    pub best_loss: Option<f64>,
    pub current_lr: f64,
    pub epoch: u64,
    pub global_step: u64,
    pub lora_config: &'a LoraSection,
    pub training_config: &'a TrainingSection,
}

/// The step of a `checkpoint-{step}` directory name.
pub fn step_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// The complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(output_dir, e))?.path();
        if let Some(step) = step_of(&path) {
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// `path` itself when it is a checkpoint, else the newest checkpoint in it.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no checkpoint here"),
        ));
    }
    list(path)?.pop().ok_or_else(|| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: "no complete checkpoint-* directory to resume from".into(),
    })
}

/// The step of a hidden `.checkpoint-{step}.{suffix}` directory name (a save in progress).
fn hidden_step_of(path: &Path, suffix: &str) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(".checkpoint-")?
        .strip_suffix(suffix)?
        .strip_suffix('.')?
        .parse()
        .ok()
}

/// Cleans up after saves that a kill interrupted: a re-save of a step killed between moving the
/// old `checkpoint-{step}` aside and renaming the new one into place gets the old one back, and
/// the hidden leftovers of unfinished saves (and of killed atomic writes) are deleted.
pub fn recover(output_dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        paths.push(entry.map_err(|e| Error::io(output_dir, e))?.path());
    }
    for path in &paths {
        if let Some(step) = hidden_step_of(path, "old") {
            let target = output_dir.join(format!("checkpoint-{step}"));
            if !target.exists() && path.join(STATE_FILE).is_file() {
                fs::rename(path, &target).map_err(|e| Error::io(&target, e))?;
                continue;
            }
        }
        if hidden_step_of(path, "old").is_some() || hidden_step_of(path, "partial").is_some() {
            fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
    }
    crate::io::atomic::remove_temp_files(output_dir)?;
    sync_dir(output_dir)
}

/// Before a fresh run (no resume) into `output_dir`: the checkpoints of an earlier run there are
/// deleted when `overwrite`, else they are an error, as a later resume could pick one of them up.
pub fn prepare_fresh(output_dir: &Path, overwrite: bool, caller: Caller) -> Result<()> {
    let old = list(output_dir)?;
    if old.is_empty() {
        return Ok(());
    }
    if overwrite {
        for path in &old {
            fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
        return sync_dir(output_dir);
    }
    let names: Vec<String> = old
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    Err(Error::Config(format!(
        "output_dir {} already holds checkpoints of an earlier run ({}): continue that run \
         with {}, use another output_dir, or set {} to delete them",
        output_dir.display(),
        names.join(", "),
        caller.resume(output_dir),
        caller.setting("training", "overwrite_output_dir", "true", "True")
    )))
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes a checkpoint of `step` into `output_dir` through `fill`, which writes the files into
/// the directory it is given. Returns the checkpoint's path.
pub fn write(
    output_dir: &Path,
    step: u64,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let target = output_dir.join(format!("checkpoint-{step}"));
    let partial = output_dir.join(format!(".checkpoint-{step}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    fs::create_dir(&partial).map_err(|e| Error::io(&partial, e))?;
    let filled = fill(&partial).and_then(|()| {
        for entry in fs::read_dir(&partial).map_err(|e| Error::io(&partial, e))? {
            let p = entry.map_err(|e| Error::io(&partial, e))?.path();
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
        sync_dir(&partial)
    });
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&partial);
        // The failing file sits in the hidden directory, just deleted: name the checkpoint instead.
        return Err(match e {
            Error::Io { path, source } => {
                let kept = list(output_dir).ok().and_then(|mut l| l.pop()).map_or_else(
                    || "no earlier checkpoint exists".to_string(),
                    |p| format!("the last complete checkpoint, {}, is intact", p.display()),
                );
                let file = path.file_name().map_or_else(
                    || path.display().to_string(),
                    |f| f.to_string_lossy().into_owned(),
                );
                Error::io(
                    &target,
                    std::io::Error::new(
                        source.kind(),
                        format!("cannot save this checkpoint: {file}: {source}; {kept}"),
                    ),
                )
            }
            other => other,
        });
    }
    if target.exists() {
        // Re-saving a step (after a resume): swap the old one out only once the new one is done.
        let old = output_dir.join(format!(".checkpoint-{step}.old"));
        let _ = fs::remove_dir_all(&old);
        fs::rename(&target, &old).map_err(|e| Error::io(&target, e))?;
        fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    }
    sync_dir(output_dir)?;
    Ok(target)
}

/// Writes `value` as pretty JSON to `path` (inside a checkpoint being filled).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::State(format!("cannot serialise {}: {e}", path.display())))?;
    fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The `[lora]` section a checkpoint was saved with (from its training info), when it has one.
pub fn read_lora_config(dir: &Path) -> Option<LoraSection> {
    let text = fs::read_to_string(dir.join(INFO_FILE)).ok()?;
    let info: serde_json::Value = serde_json::from_str(&text).ok()?;
    serde_json::from_value(info.get("lora_config")?.clone()).ok()
}

/// Reads the trainer state of checkpoint `dir` (Hugging Face's keys are ignored).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let invalid = |e: serde_json::Error| Error::Checkpoint {
        path: path.clone(),
        msg: format!("invalid trainer state: {e}"),
    };
    let mut value: Value = serde_json::from_str(&text).map_err(invalid)?;
    // Files written before Hugging Face's keys hold the data epoch as `epoch`.
    if let Some(map) = value.as_object_mut() {
        if !map.contains_key("data_epoch") {
            if let Some(e) = map.get("epoch").cloned() {
                map.insert("data_epoch".into(), e);
            }
        }
    }
    serde_json::from_value(value).map_err(invalid)
}

/// Keeps at most `limit` checkpoints in `output_dir`, deleting the oldest but never one in
/// `keep` (the best, the one resumed from) nor the newest; so more than `limit` stay when
/// those are more. Returns the deleted ones. Each is first renamed to a hidden `.partial`
/// name, so a kill mid-delete leaves what [`recover`] removes, never a torn checkpoint.
pub fn rotate(output_dir: &Path, limit: usize, keep: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut all = list(output_dir)?;
    all.pop(); // the newest
    let mut excess = (all.len() + 1).saturating_sub(limit);
    let same = |a: &Path, b: &Path| match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    let mut deleted = Vec::new();
    for path in all {
        if excess == 0 {
            break;
        }
        if keep.iter().any(|k| same(k, &path)) {
            continue;
        }
        let Some(step) = step_of(&path) else {
            continue;
        };
        let hidden = output_dir.join(format!(".checkpoint-{step}.partial"));
        fs::rename(&path, &hidden).map_err(|e| Error::io(&path, e))?;
        fs::remove_dir_all(&hidden).map_err(|e| Error::io(&hidden, e))?;
        deleted.push(path);
        excess -= 1;
    }
    if !deleted.is_empty() {
        sync_dir(output_dir)?;
    }
    Ok(deleted)
}

/// Reads the optimizer state tensors of checkpoint `dir` (copied out of the file).
pub fn read_optimizer(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let path = dir.join(OPTIMIZER_FILE);
    let file = MappedSafetensors::open(&path)?;
    file.names()?
        .into_iter()
        .map(|n| Ok((n.clone(), file.tensor(&n)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            global_step: step,
            epoch: 0,
            batch: 3,
            optimizer_steps: step,
            scheduler_type: "cosine".into(),
            total_steps: 10,
            seed: 1,
            best_loss: Some(1.5),
            nonfinite_in_a_row: 0,
            tokens_seen: 99,
            world_size: 1,
            best_checkpoint: Some("checkpoint-2".into()),
            best_metric: Some(1.5),
        }
    }

    fn hf(step: u64) -> HfState {
        HfState {
            epoch: 0.75,
            max_steps: 10,
            num_train_epochs: 3,
            logging_steps: 1,
            eval_steps: 2,
            save_steps: 2,
            train_batch_size: 2,
            best_model_checkpoint: Some("out/checkpoint-2".into()),
            best_global_step: Some(2),
            log_history: vec![serde_json::json!({"loss": 2.0, "step": step})],
        }
    }

    #[test]
    fn the_state_file_holds_hugging_face_keys_and_older_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let c = write(dir.path(), 4, |d| {
            let file = StateFile {
                state: &state(4),
                hf: &hf(4),
            };
            write_json(&d.join(STATE_FILE), &file)
        })
        .unwrap();
        let v: Value =
            serde_json::from_str(&fs::read_to_string(c.join(STATE_FILE)).unwrap()).unwrap();
        for key in [
            "global_step",
            "epoch",
            "max_steps",
            "log_history",
            "best_metric",
            "best_model_checkpoint",
            "best_global_step",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "train_batch_size",
            "num_train_epochs",
            "data_epoch",
            "best_checkpoint",
        ] {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
        assert_eq!(v["epoch"], 0.75);
        assert_eq!(v["log_history"][0]["step"], 4);
        assert_eq!(read_state(&c).unwrap(), state(4));
        // A file from before: the data epoch as `epoch`, no best checkpoint.
        let old = r#"{"global_step":6,"epoch":1,"batch":3,"optimizer_steps":6,
            "scheduler_type":"cosine","total_steps":10,"seed":1,"best_loss":1.5,
            "nonfinite_in_a_row":0,"tokens_seen":99,"world_size":1}"#;
        let c6 = write(dir.path(), 6, |d| {
            fs::write(d.join(STATE_FILE), old).map_err(|e| Error::io(d, e))
        })
        .unwrap();
        let mut expected = state(6);
        expected.epoch = 1;
        expected.best_checkpoint = None;
        expected.best_metric = None;
        assert_eq!(read_state(&c6).unwrap(), expected);
    }

    #[test]
    fn rotation_keeps_the_newest_the_best_and_the_resumed_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let save = |s: u64| write(out, s, |d| write_json(&d.join(STATE_FILE), &state(s))).unwrap();
        let names = || -> Vec<u64> {
            list(out)
                .unwrap()
                .iter()
                .filter_map(|p| step_of(p))
                .collect()
        };
        for s in [2, 4, 6] {
            save(s);
        }
        // Limit 2, the best is checkpoint-2: the oldest other one (4) goes.
        let deleted = rotate(out, 2, &[out.join("checkpoint-2")]).unwrap();
        assert_eq!(deleted, vec![out.join("checkpoint-4")]);
        assert_eq!(names(), vec![2, 6]);
        save(8);
        // Best 2, resumed from 6 (named through another path), newest 8: none may go.
        let resumed = out.join(".").join("checkpoint-6");
        assert!(rotate(out, 1, &[out.join("checkpoint-2"), resumed])
            .unwrap()
            .is_empty());
        assert_eq!(names(), vec![2, 6, 8]);
        // Nothing protected: down to the newest, oldest first.
        assert_eq!(rotate(out, 1, &[]).unwrap().len(), 2);
        assert_eq!(names(), vec![8]);
        assert!(!out.join(".checkpoint-2.partial").exists());
        assert!(rotate(out, 3, &[]).unwrap().is_empty());
    }

    #[test]
    fn checkpoints_appear_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        assert!(list(out).unwrap().is_empty());
        let c2 = write(out, 2, |d| write_json(&d.join(STATE_FILE), &state(2))).unwrap();
        assert_eq!(step_of(&c2), Some(2));
        // A failing save leaves nothing behind and the earlier checkpoint untouched.
        let e = write(out, 4, |d| {
            write_json(&d.join(STATE_FILE), &state(4))?;
            Err(Error::State("disk full".into()))
        });
        assert!(e.is_err());
        assert_eq!(list(out).unwrap(), vec![c2.clone()]);
        assert!(!out.join(".checkpoint-4.partial").exists());
        // A file system error names the checkpoint, the file, the cause and what is kept.
        let e = write(out, 4, |d| {
            write_json(&d.join(STATE_FILE), &state(4))?;
            Err(Error::io(
                d.join(OPTIMIZER_FILE),
                std::io::Error::from_raw_os_error(28),
            ))
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Io { .. }), "{msg}");
        for part in [
            "checkpoint-4: cannot save this checkpoint: optimizer.safetensors: ",
            "os error 28",
            "the last complete checkpoint",
            "checkpoint-2, is intact",
        ] {
            assert!(msg.contains(part), "{msg} lacks {part}");
        }
        assert!(!msg.contains(".partial"), "{msg}");
        assert_eq!(list(out).unwrap(), vec![c2.clone()]);
        assert!(!out.join(".checkpoint-4.partial").exists());
        let c10 = write(out, 10, |d| write_json(&d.join(STATE_FILE), &state(10))).unwrap();
        assert_eq!(list(out).unwrap(), vec![c2.clone(), c10.clone()]);
        assert_eq!(resolve(out).unwrap(), c10);
        assert_eq!(resolve(&c2).unwrap(), c2);
        assert_eq!(read_state(&c10).unwrap(), state(10));
        // Re-saving a step replaces it.
        let mut s = state(10);
        s.tokens_seen = 7;
        write(out, 10, |d| write_json(&d.join(STATE_FILE), &s)).unwrap();
        assert_eq!(read_state(&c10).unwrap().tokens_seen, 7);
        assert!(resolve(&out.join("nothing")).is_err());
    }

    #[test]
    fn floats_read_back_exactly() {
        // serde_json's default float parser reads this eval loss back one ulp high (…053), which
        // changed best_loss across a resume; with `float_roundtrip` every f64 comes back as written.
        let dir = tempfile::tempdir().unwrap();
        let c = write(dir.path(), 6, |d| {
            let mut s = state(6);
            s.best_loss = Some(10.910387545824051);
            write_json(&d.join(STATE_FILE), &s)
        })
        .unwrap();
        assert_eq!(
            read_state(&c).unwrap().best_loss.unwrap().to_bits(),
            10.910387545824051f64.to_bits()
        );
        let mut x = 1.0f64 / 3.0;
        for _ in 0..2000 {
            x = (x * 1.618_033_988_749_895 + 0.1).fract() * 12.0;
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
    }

    #[test]
    fn recover_restores_a_checkpoint_moved_aside_and_drops_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        write(out, 2, |d| write_json(&d.join(STATE_FILE), &state(2))).unwrap();
        write(out, 4, |d| write_json(&d.join(STATE_FILE), &state(4))).unwrap();
        // A re-save of step 4 killed between its two renames, and an unfinished save of step 6.
        fs::rename(out.join("checkpoint-4"), out.join(".checkpoint-4.old")).unwrap();
        fs::create_dir(out.join(".checkpoint-4.partial")).unwrap();
        fs::create_dir(out.join(".checkpoint-6.partial")).unwrap();
        // A checkpoint that exists next to a stale `.old` copy is kept as it is.
        fs::create_dir(out.join(".checkpoint-2.old")).unwrap();
        fs::write(out.join(".loratch-tmp-x1"), "half a metrics file").unwrap();
        recover(out).unwrap();
        assert_eq!(
            list(out).unwrap(),
            vec![out.join("checkpoint-2"), out.join("checkpoint-4")]
        );
        assert_eq!(read_state(&out.join("checkpoint-4")).unwrap(), state(4));
        let mut left: Vec<String> = fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["checkpoint-2", "checkpoint-4"]);
        recover(&out.join("missing")).unwrap();
    }

    #[test]
    fn a_fresh_run_refuses_old_checkpoints_unless_told_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        prepare_fresh(&out.join("missing"), false, Caller::Cli).unwrap();
        prepare_fresh(out, false, Caller::Cli).unwrap();
        write(out, 3, |d| write_json(&d.join(STATE_FILE), &state(3))).unwrap();
        fs::write(out.join("notes.txt"), "mine").unwrap();
        let py = prepare_fresh(out, false, Caller::Python)
            .unwrap_err()
            .to_string();
        assert!(
            py.contains("loratch.train(config, resume=")
                && py.contains("config[\"training\"][\"overwrite_output_dir\"] = True")
                && !py.contains("--"),
            "{py}"
        );
        let e = prepare_fresh(out, false, Caller::Cli).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("checkpoint-3")
                && msg.contains("--resume")
                && msg.contains("overwrite_output_dir"),
            "{msg}"
        );
        assert_eq!(list(out).unwrap().len(), 1);
        prepare_fresh(out, true, Caller::Cli).unwrap();
        assert!(list(out).unwrap().is_empty());
        assert!(out.join("notes.txt").is_file());
    }
}
