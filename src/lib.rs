//! loratch: LoRA fine-tuning of language models on libtorch.
//!
//! The core (everything outside `python`) knows nothing of Python: the `loratch` binary, the Rust
//! tests and benches use it directly; the PyO3 bindings (feature `python`) are a thin layer over it.
pub mod advice;
pub mod data;
pub mod device;
pub mod error;
pub(crate) mod ffi;
pub mod gguf;
pub mod hf;
pub mod io;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod runtime;
pub mod tokenizer;
pub mod train;

#[cfg(test)]
mod testing;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
