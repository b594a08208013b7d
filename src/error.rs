//! The crate's one error type. Every fallible core function returns [`Result`]; the Python
//! bindings map each variant to its own exception class (see `python/errors.rs`).
use std::path::PathBuf;

/// What can go wrong in loratch, by kind.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong shape, or two shapes disagree.
    #[error("shape error: {0}")]
    Shape(String),
    /// A tensor has the wrong dtype, or a dtype name is unknown.
    #[error("dtype error: {0}")]
    Dtype(String),
    /// An invalid argument or configuration value (rank <= 0, unknown option, ...).
    #[error("config error: {0}")]
    Config(String),
    /// A device string is malformed or names a device that is not available.
    #[error("device error: {0}")]
    Device(String),
    /// An adapter file is corrupt, truncated, or does not fit the layer/model it is loaded into.
    #[error("adapter format error: {path}: {msg}")]
    AdapterFormat { path: PathBuf, msg: String },
    /// An input value is out of range (token id >= vocab size, negative id, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// A model checkpoint (config.json, weight files) is missing pieces, corrupt or inconsistent.
    #[error("checkpoint error: {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// No model is loaded under this name.
    #[error("no model named {name:?} is loaded (loaded: {loaded})")]
    UnknownModel { name: String, loaded: String },
    /// The operation is not valid in the object's current state (merging twice, ...).
    #[error("state error: {0}")]
    State(String),
    /// A value is not finite where a finite one is required (a merge delta with NaN/Inf, ...).
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// `loratch merge --verify` found the merged model wrong (its logits differ from base +
    /// adapter beyond float rounding) or unchanged (equal to the base's); nothing was written.
    #[error("merge verification failed: {0}")]
    MergeCheck(String),
    /// A tokenizer file (tokenizer.json, tokenizer_config.json, ...) is malformed, or a chat
    /// template failed to compile or render.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A model named by Hub id (`owner/name`) is not a local path and not in the local Hugging
    /// Face cache; the message says where it looked and how to fill the cache.
    #[error("model {id}: {msg}")]
    HubCache { id: String, msg: String },
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// libtorch raised an error that none of the checks above anticipated.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::AdapterFormat`] for `path`.
    pub fn adapter(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::AdapterFormat {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
