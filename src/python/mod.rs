//! The PyO3 extension module `loratch._loratch`: thin wrappers over the core, one concern per
//! file. Tensors cross as real `torch.Tensor`s (tensor.rs); errors as typed exceptions (errors.rs).
use pyo3::prelude::*;

mod args;
mod data;
mod errors;
mod handover;
mod hf;
mod linear;
mod tensor;
mod tokenizer;
mod train;
mod trainer;

/// The native module. `loratch/__init__.py` imports torch first, then re-exports this.
#[pymodule]
#[pyo3(name = "_loratch")]
fn loratch_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::resolve(m.py())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION", crate::ffi::torch_version())?;
    linear::register(m)?;
    data::register(m)?;
    hf::register(m)?;
    tokenizer::register(m)?;
    train::register(m)?;
    trainer::register(m)?;
    Ok(())
}
