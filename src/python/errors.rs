//! Core [`Error`]s become typed Python exceptions: the classes live in `loratch/errors.py`
//! (so they can also subclass the matching built-ins) and are reached through typed handles;
//! I/O errors become `FileNotFoundError`, `PermissionError` or `OSError`, a Hub id missing from
//! the local cache `FileNotFoundError`.
use crate::error::Error;
use pyo3::exceptions::{PyFileExistsError, PyFileNotFoundError, PyOSError, PyPermissionError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Declares a typed handle per class of `loratch/errors.py`, and [`resolve`] over them all.
macro_rules! handles {
    ($($name:ident),* $(,)?) => {
        $(pyo3::import_exception!(loratch.errors, $name);)*

        /// Resolves every handle once, when the extension is imported. pyo3 panics where a
        /// handle's class cannot be imported, so each is looked up with errors first: a broken
        /// `loratch.errors` fails the import, never a later raise.
        pub fn resolve(py: Python<'_>) -> PyResult<()> {
            let module = py.import("loratch.errors")?;
            $(module.getattr(stringify!($name))?.downcast_into::<PyType>()?;)*
            $(py.get_type::<$name>();)*
            Ok(())
        }
    };
}

handles!(
    ShapeError,
    DTypeError,
    ConfigError,
    DeviceError,
    AdapterFormatError,
    InputError,
    CheckpointError,
    ModelNotFoundError,
    StateError,
    NonFiniteError,
    TorchError,
    TokenizerError,
    MergeCheckError,
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::Shape(_) => ShapeError::new_err(msg),
            Error::Dtype(_) => DTypeError::new_err(msg),
            Error::Config(_) => ConfigError::new_err(msg),
            Error::Device(_) => DeviceError::new_err(msg),
            Error::AdapterFormat { .. } => AdapterFormatError::new_err(msg),
            Error::Input(_) => InputError::new_err(msg),
            Error::Checkpoint { .. } => CheckpointError::new_err(msg),
            Error::UnknownModel { .. } => ModelNotFoundError::new_err(msg),
            Error::State(_) => StateError::new_err(msg),
            Error::NonFinite(_) => NonFiniteError::new_err(msg),
            Error::Torch(_) => TorchError::new_err(msg),
            Error::Tokenizer(_) => TokenizerError::new_err(msg),
            // A model that is not there, like a missing model directory.
            Error::HubCache { .. } => PyFileNotFoundError::new_err(msg),
            Error::MergeCheck(_) => MergeCheckError::new_err(msg),
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
                _ => PyOSError::new_err(msg),
            },
        }
    }
}
