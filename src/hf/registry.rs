//! Loaded models addressed by name, shared safely between threads. Loading a name that exists
//! replaces that model; each model has its own lock, so different models run concurrently.
use super::loaded::LoadedModel;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

/// A registry entry: one model behind its own lock.
pub type Entry = Arc<Mutex<LoadedModel>>;

static MODELS: LazyLock<Mutex<BTreeMap<String, Entry>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

fn models() -> MutexGuard<'static, BTreeMap<String, Entry>> {
    // The map is only ever mutated by single insert/remove calls; a poisoned lock still holds a
    // consistent map.
    MODELS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stores `model` as `name`, replacing (and returning) any model of that name.
pub fn insert(name: &str, model: LoadedModel) -> Option<Entry> {
    models().insert(name.to_string(), Arc::new(Mutex::new(model)))
}

/// The model called `name`; an unknown name is an error that lists the loaded ones.
pub fn get(name: &str) -> Result<Entry> {
    let map = models();
    map.get(name).cloned().ok_or_else(|| Error::UnknownModel {
        name: name.to_string(),
        loaded: if map.is_empty() {
            "none".to_string()
        } else {
            map.keys()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

/// Removes `name`; its memory is freed once no call is using it.
pub fn remove(name: &str) -> Result<()> {
    get(name)?;
    let removed = models().remove(name);
    // Dropped after the map's lock is released: freeing a model can take the GIL (adapter
    // tensors whose Python objects torch keeps alive from C++).
    drop(removed);
    Ok(())
}

/// Names of the loaded models, sorted.
pub fn names() -> Vec<String> {
    models().keys().cloned().collect()
}

/// Locks an entry (a poisoned lock is recovered: model state changes are single calls that
/// either completed or returned an error before writing). Python bindings must not call this
/// while holding the GIL (see `with_model` in `python/hf.rs`).
pub fn lock(entry: &Entry) -> MutexGuard<'_, LoadedModel> {
    entry.lock().unwrap_or_else(|e| e.into_inner())
}
