//! Core [`Error`]s become typed Python exceptions: the classes live in `loratch/errors.py`
//! (so they can also subclass the matching built-ins); I/O errors become `FileNotFoundError`,
//! `PermissionError` or `OSError`.
use crate::error::Error;
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError,
};
use pyo3::prelude::*;
use pyo3::types::PyType;

fn typed(class: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let cls = py
            .import("loratch.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.downcast_into::<PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, msg),
            Err(e) => PyRuntimeError::new_err(format!("{msg} (loratch.errors unavailable: {e})")),
        }
    })
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::Shape(_) => typed("ShapeError", msg),
            Error::Dtype(_) => typed("DTypeError", msg),
            Error::Config(_) => typed("ConfigError", msg),
            Error::Device(_) => typed("DeviceError", msg),
            Error::AdapterFormat { .. } => typed("AdapterFormatError", msg),
            Error::Input(_) => typed("InputError", msg),
            Error::Checkpoint { .. } => typed("CheckpointError", msg),
            Error::UnknownModel { .. } => typed("ModelNotFoundError", msg),
            Error::State(_) => typed("StateError", msg),
            Error::NonFinite(_) => typed("NonFiniteError", msg),
            Error::Torch(_) => typed("TorchError", msg),
            Error::Tokenizer(_) => typed("TokenizerError", msg),
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
                _ => PyOSError::new_err(msg),
            },
        }
    }
}
