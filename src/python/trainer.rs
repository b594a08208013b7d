//! `loratch.train(config)`: the Rust trainer run with the GIL released. Python is called back
//! between steps to deliver signals (Ctrl-C saves a checkpoint, then `KeyboardInterrupt` is
//! raised) and, under `torch.distributed`, to all-reduce gradients and loss sums.
use super::tensor::PyTensor;
use crate::advice::Caller;
use crate::error::{Error, Result};
use crate::train::{train, Hooks, TrainConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use tch::Tensor;

/// Hooks that call into Python. A Python exception raised in a hook stops training; it is kept
/// and re-raised as is once the trainer has returned.
struct PyHooks {
    /// The Python object with `rank`, `world_size`, `all_reduce_sum(list[float]) -> list[float]`
    /// and `all_reduce_grads(list[Tensor]) -> None` (see `loratch/trainer.py`); None = one process.
    dist: Option<Py<PyAny>>,
    rank: usize,
    world: usize,
    /// The first Python exception (KeyboardInterrupt included).
    raised: Option<PyErr>,
}

impl PyHooks {
    fn call(
        &mut self,
        f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>) -> PyResult<()>,
    ) -> Result<()> {
        let Some(dist) = &self.dist else {
            return Ok(());
        };
        let result = Python::attach(|py| f(py, dist.bind(py)));
        result.map_err(|e| {
            let msg = format!("the distributed hook raised: {e}");
            self.raised.get_or_insert(e);
            Error::State(msg)
        })
    }
}

impl Hooks for PyHooks {
    fn world(&self) -> (usize, usize) {
        (self.rank, self.world)
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        let input = values.to_vec();
        let mut out: Vec<f64> = Vec::new();
        self.call(|_, d| {
            out = d.call_method1("all_reduce_sum", (input,))?.extract()?;
            Ok(())
        })?;
        if self.dist.is_some() {
            if out.len() != values.len() {
                return Err(Error::State(format!(
                    "all_reduce_sum returned {} values for {}",
                    out.len(),
                    values.len()
                )));
            }
            values.copy_from_slice(&out);
        }
        Ok(())
    }

    fn all_reduce_grads(&mut self, grads: &[Tensor]) -> Result<()> {
        let handles: Vec<PyTensor> = grads.iter().map(|g| PyTensor(g.shallow_clone())).collect();
        self.call(|_, d| d.call_method1("all_reduce_grads", (handles,)).map(|_| ()))
    }

    fn caller(&self) -> Caller {
        Caller::Python
    }

    fn should_stop(&mut self) -> bool {
        if self.raised.is_some() {
            return true;
        }
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(e) => {
                self.raised = Some(e);
                true
            }
        }
    }
}

/// Runs the trainer on a JSON configuration (what `loratch.train` builds from its dict).
#[pyfunction]
#[pyo3(signature = (config_json, resume=None, dist=None))]
fn _train(
    py: Python<'_>,
    config_json: &str,
    resume: Option<PathBuf>,
    dist: Option<Py<PyAny>>,
) -> PyResult<Py<PyDict>> {
    let parsed = TrainConfig::from_json(config_json)?;
    crate::python::args::warn_config_notes(py, &parsed.notes)?;
    let config = parsed.config;
    let (rank, world) = match &dist {
        Some(d) => {
            let d = d.bind(py);
            (
                d.getattr("rank")?.extract::<usize>()?,
                d.getattr("world_size")?.extract::<usize>()?,
            )
        }
        None => (0, 1),
    };
    let mut hooks = PyHooks {
        dist,
        rank,
        world,
        raised: None,
    };
    let result = py.detach(|| train(&config, resume.as_deref(), &mut hooks));
    if let Some(e) = hooks.raised.take() {
        return Err(e);
    }
    let out = result?;
    let d = PyDict::new(py);
    d.set_item("global_step", out.global_step)?;
    d.set_item("total_steps", out.total_steps)?;
    d.set_item("interrupted", out.interrupted)?;
    d.set_item("initial_eval_loss", out.initial_eval_loss)?;
    d.set_item("final_eval_loss", out.final_eval_loss)?;
    d.set_item("last_train_loss", out.last_train_loss)?;
    let text = |p: Option<PathBuf>| p.map(|p| p.to_string_lossy().into_owned());
    d.set_item("adapter_dir", text(out.adapter_dir))?;
    d.set_item("last_checkpoint", text(out.last_checkpoint))?;
    d.set_item("best_checkpoint", text(out.best_checkpoint))?;
    d.set_item("tensorboard_dir", text(out.tensorboard_dir))?;
    d.set_item("metrics_file", text(Some(out.metrics_file)))?;
    d.set_item("plot_file", text(out.plot_file))?;
    d.set_item("adapter_fingerprint", out.adapter_fingerprint)?;
    Ok(d.unbind())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_train, m)?)?;
    Ok(())
}
