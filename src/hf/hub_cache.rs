//! Models named by Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`, optionally
//! `@revision`) found in the local Hugging Face cache, with no network: the cache directory as
//! `huggingface_hub` chooses it (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), then
//! `models--owner--name/refs/<revision>` (a commit hash) → `snapshots/<hash>/`, as
//! `huggingface_hub`'s cache layout documents it. A revision may also be a commit hash itself.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The cache directory and the setting that chose it (for error messages).
pub fn cache_dir() -> (PathBuf, &'static str) {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("HF_HUB_CACHE") {
        return (d, "HF_HUB_CACHE");
    }
    if let Some(d) = var("HF_HOME") {
        return (d.join("hub"), "HF_HOME/hub");
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return (
            d.join("huggingface").join("hub"),
            "XDG_CACHE_HOME/huggingface/hub",
        );
    }
    let home = var("HOME").unwrap_or_default();
    (
        home.join(".cache").join("huggingface").join("hub"),
        "the default, ~/.cache/huggingface/hub",
    )
}

/// `owner/name` and the revision of `owner/name@rev`, when `spec` has a Hub id's shape.
fn parse_id(spec: &str) -> Option<(&str, Option<&str>)> {
    let (id, rev) = match spec.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev)),
        Some(_) => return None,
        None => (spec, None),
    };
    let (owner, name) = id.split_once('/')?;
    let part_ok = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.contains("..")
    };
    (part_ok(owner) && part_ok(name)).then_some((id, rev))
}

/// The model directory (or file) `spec` names: itself when it exists; else, when it is a Hub
/// id (`owner/name` or `owner/name@revision`), its snapshot in the local cache. Anything else
/// is returned unchanged (its loader reports it missing).
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    resolve_revision(spec, None)
}

/// As [`resolve`], with `revision` (a ref name such as `main`, or a commit hash) for a Hub id;
/// a `revision` with a local path, or one that disagrees with `@rev` in `spec`, is an error.
pub fn resolve_revision(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let id = spec.to_str().and_then(parse_id);
    if spec.exists() || id.is_none() {
        if let Some(rev) = revision {
            return Err(Error::Config(format!(
                "revision {rev:?} applies to Hub ids (owner/name) only; {} is a path",
                spec.display()
            )));
        }
        return Ok(spec.to_path_buf());
    }
    let (id, at_rev) = id.unwrap_or_default();
    let rev = match (at_rev, revision) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::Config(format!(
                "{}: the id says revision {a:?}, the revision argument {b:?}",
                spec.display()
            )))
        }
        (a, b) => a.or(b).unwrap_or("main"),
    };
    let (cache, chosen_by) = cache_dir();
    resolve_in(&cache, chosen_by, spec, id, rev)
}

/// `id` at `rev` in `cache` (chosen by the setting `chosen_by`), or the error for `spec`.
fn resolve_in(cache: &Path, chosen_by: &str, spec: &Path, id: &str, rev: &str) -> Result<PathBuf> {
    snapshot(cache, id, rev).map_err(|looked| {
        let download = if rev == "main" {
            format!("`hf download {id}` (or `huggingface-cli download {id}`)")
        } else {
            format!("`hf download {id} --revision {rev}` (or `huggingface-cli download {id} --revision {rev}`)")
        };
        Error::HubCache {
            id: format!("{id}@{rev}"),
            msg: format!(
                "not a local path ({} does not exist), and not in the Hugging Face cache \
                 {} (chosen by {chosen_by}): {looked}; fill the cache with {download} on a \
                 machine with network access (loratch never downloads), or give the model's \
                 directory",
                spec.display(),
                cache.display(),
            ),
        }
    })
}

/// `cache/models--owner--name/snapshots/<hash>` for `rev`, or what was looked for.
fn snapshot(cache: &Path, id: &str, rev: &str) -> std::result::Result<PathBuf, String> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(format!("no {}", repo.display()));
    }
    let snapshots = repo.join("snapshots");
    let reference = repo.join("refs").join(rev);
    let hash = match std::fs::read_to_string(&reference) {
        Ok(h) => h.trim().to_string(),
        // Not a ref name: a commit hash names its snapshot directly.
        Err(_) => rev.to_string(),
    };
    let dir = snapshots.join(&hash);
    if !hash.is_empty() && !hash.contains(['/', '\\']) && dir.is_dir() {
        return Ok(dir);
    }
    let listed = |d: &Path| -> String {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    };
    Err(format!(
        "revision {rev:?} is neither a ref in {} (refs there: {}) nor a snapshot in {} \
         (snapshots there: {})",
        repo.join("refs").display(),
        listed(&repo.join("refs")),
        snapshots.display(),
        listed(&snapshots)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_told_from_paths() {
        assert_eq!(
            parse_id("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(("HuggingFaceTB/SmolLM2-135M-Instruct", None))
        );
        assert_eq!(parse_id("a/b@v1.0"), Some(("a/b", Some("v1.0"))));
        for not_id in [
            "model",
            "/abs/path",
            "./a/b",
            "a/b/c",
            "a/",
            "../x",
            "a/b@",
            "a/..",
        ] {
            assert_eq!(parse_id(not_id), None, "{not_id}");
        }
    }
}
