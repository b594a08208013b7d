//! Advice in messages in the caller's words: the `loratch` binary's users type flags and config
//! keys, Python's call functions with arguments and dicts. Code that can be reached from both
//! takes a [`Caller`] and asks it how to say "resume" or "set this key".
use std::path::Path;

/// Who called: the command line or Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Caller {
    /// The `loratch` binary (and Rust callers).
    #[default]
    Cli,
    /// The Python package.
    Python,
}

impl Caller {
    /// How to resume a run from `dir`.
    pub fn resume(self, dir: &Path) -> String {
        match self {
            Caller::Cli => format!("--resume {}", dir.display()),
            Caller::Python => format!(
                "loratch.train(config, resume={:?})",
                dir.display().to_string()
            ),
        }
    }

    /// How to set the config key `section.key`; `toml` and `python` are the value as each
    /// writes it (`true` / `True`).
    pub fn setting(self, section: &str, key: &str, toml: &str, python: &str) -> String {
        match self {
            Caller::Cli => format!(
                "{section}.{key} = {toml} in the config (or {section}.{key}={toml} on the \
                 command line)"
            ),
            Caller::Python => format!("config[\"{section}\"][\"{key}\"] = {python}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_gets_its_own_words() {
        let dir = Path::new("runs/a");
        assert_eq!(Caller::Cli.resume(dir), "--resume runs/a");
        assert_eq!(
            Caller::Python.resume(dir),
            "loratch.train(config, resume=\"runs/a\")"
        );
        assert_eq!(
            Caller::Python.setting("lora", "rank", "8", "8"),
            "config[\"lora\"][\"rank\"] = 8"
        );
        assert!(Caller::Cli
            .setting("training", "overwrite_output_dir", "true", "True")
            .starts_with("training.overwrite_output_dir = true in the config"));
    }
}
