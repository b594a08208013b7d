//! The spec's "Optimizer and Scheduler" and "Memory Management" functions: AdamW with fp32
//! state, LR schedules that set the optimizer's LR, gradient control and device sync.
use super::args::from_dict;
use super::tensor::PyTensor;
use crate::error::Error;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::schedule::{Schedule, ScheduleConfig, ScheduleKind};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

/// AdamW over live tensors, state and updates in float32 (fp32 masters for bf16/fp16 params).
#[pyclass(name = "Optimizer", module = "loratch")]
pub struct PyOptimizer {
    inner: Arc<Mutex<AdamW>>,
}

impl PyOptimizer {
    fn lock(&self) -> MutexGuard<'_, AdamW> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The optimizers created from Python that are still alive (weakly held), so that a model's
/// memory report can count the state of those that train its adapters.
static LIVE: LazyLock<Mutex<Vec<Weak<Mutex<AdamW>>>>> = LazyLock::new(Default::default);

/// Makes `opt` visible to [`live_state_bytes`] while it lives.
fn track(opt: &Arc<Mutex<AdamW>>) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(opt));
}

/// Bytes of optimizer state, over every live optimizer created from Python, of the parameters
/// whose data pointer is in `data_ptrs` (what [`LoadedModel::memory_report`] asks for).
///
/// [`LoadedModel::memory_report`]: crate::hf::LoadedModel::memory_report
pub(crate) fn live_state_bytes(data_ptrs: &HashSet<usize>) -> i64 {
    let live: Vec<_> = LIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|w| w.upgrade())
        .collect();
    live.iter()
        .map(|o| {
            o.lock()
                .unwrap_or_else(|e| e.into_inner())
                .state_bytes_where(|p| data_ptrs.contains(&(p.data_ptr() as usize)))
        })
        .sum()
}

#[pymethods]
impl PyOptimizer {
    /// The current learning rate.
    #[getter]
    fn lr(&self) -> f64 {
        self.lock().lr()
    }

    /// Number of optimizer steps taken.
    #[getter]
    fn step_count(&self) -> u64 {
        self.lock().step_count()
    }

    /// The parameters (live tensors).
    #[getter]
    fn params(&self) -> Vec<PyTensor> {
        self.lock()
            .params()
            .iter()
            .map(|t| PyTensor(t.shallow_clone()))
            .collect()
    }

    /// Bytes of optimizer state (moments and fp32 masters).
    #[getter]
    fn state_bytes(&self) -> i64 {
        self.lock().state_bytes()
    }

    fn __repr__(&self) -> String {
        let o = self.lock();
        format!(
            "Optimizer(AdamW, params={}, lr={:?}, steps={})",
            o.params().len(),
            o.lr(),
            o.step_count()
        )
    }
}

/// A learning-rate schedule driving an optimizer's LR.
#[pyclass(name = "Scheduler", module = "loratch")]
pub struct PyScheduler {
    schedule: Schedule,
    optimizer: Py<PyOptimizer>,
    step: Mutex<u64>,
}

#[pymethods]
impl PyScheduler {
    /// Scheduler steps taken.
    #[getter]
    fn step_count(&self) -> u64 {
        *self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn __repr__(&self) -> String {
        format!(
            "Scheduler({}, step={})",
            self.schedule.kind().name(),
            self.step_count()
        )
    }
}

/// Creates AdamW (torch.optim.AdamW's algorithm) over `params`.
// `betas` and `eps` default to `AdamWConfig::default()`'s; text_signature spells those values
// out for Python's `inspect` (stubtest checks them against the stub).
#[pyfunction]
#[pyo3(
    signature = (
        params,
        learning_rate,
        weight_decay,
        *,
        betas = None,
        eps = AdamWConfig::default().eps,
    ),
    text_signature = "(params, learning_rate, weight_decay, *, betas=(0.9, 0.999), eps=1e-08)"
)]
fn torch_optimizer_add_params(
    params: Vec<PyTensor>,
    learning_rate: f64,
    weight_decay: f64,
    betas: Option<&Bound<'_, PyAny>>,
    eps: f64,
) -> PyResult<PyOptimizer> {
    let betas = match betas {
        Some(b) => super::args::float_pair(b, "betas")?,
        None => AdamWConfig::default().betas,
    };
    let params = params.into_iter().map(|p| p.0).collect();
    let config = AdamWConfig {
        lr: learning_rate,
        betas,
        eps,
        weight_decay,
    };
    let inner = Arc::new(Mutex::new(AdamW::new(params, config)?));
    track(&inner);
    Ok(PyOptimizer { inner })
}

/// Clears the parameters' gradients (sets `.grad` to None, as `torch.optim`'s default).
#[pyfunction]
fn torch_optimizer_zero_grad(py: Python<'_>, optimizer: &PyOptimizer) -> PyResult<()> {
    Ok(py.detach(|| optimizer.lock().zero_grad())?)
}

/// One AdamW step (parameters without a gradient are skipped).
#[pyfunction]
fn torch_optimizer_step(py: Python<'_>, optimizer: &PyOptimizer) -> PyResult<()> {
    Ok(py.detach(|| optimizer.lock().step())?)
}

/// Clips the gradients' total 2-norm to `max_norm` in place; returns the norm before clipping
/// (as `torch.nn.utils.clip_grad_norm_`).
#[pyfunction]
fn torch_clip_grad_norm(py: Python<'_>, optimizer: &PyOptimizer, max_norm: f64) -> PyResult<f64> {
    Ok(py.detach(|| optimizer.lock().clip_grad_norm(max_norm))?)
}

/// `loss.backward(retain_graph=...)`.
#[pyfunction]
#[pyo3(signature = (loss, retain_graph=false))]
fn torch_backward(loss: &Bound<'_, PyAny>, retain_graph: bool) -> PyResult<()> {
    let t: PyTensor = loss.extract()?;
    let t = &t.0;
    if t.numel() != 1 {
        return Err(Error::Shape(format!(
            "torch_backward: the loss must be a scalar (one element), got shape {:?}",
            t.size()
        ))
        .into());
    }
    if !t.requires_grad() {
        return Err(Error::State(
            "torch_backward: the loss does not require grad: it was not computed from tensors \
             that require grad (LoRA parameters, or grad mode was off)"
                .into(),
        )
        .into());
    }
    let kwargs = PyDict::new(loss.py());
    kwargs.set_item("retain_graph", retain_graph)?;
    loss.call_method("backward", (), Some(&kwargs))
        .map_err(|e| backward_error(loss.py(), e))?;
    Ok(())
}

/// torch's untyped `RuntimeError` from `backward()` as a loratch error: a second backward through
/// a freed graph is a [`Error::State`], anything else a [`Error::Torch`].
fn backward_error(py: Python<'_>, e: PyErr) -> PyErr {
    if !e.is_instance_of::<pyo3::exceptions::PyRuntimeError>(py) {
        return e;
    }
    let msg = e.value(py).to_string();
    if msg.contains("second time") {
        Error::State(format!(
            "torch_backward: the graph of this loss was already freed by an earlier backward \
             (pass retain_graph=True to the first one): {msg}"
        ))
        .into()
    } else {
        Error::Torch(tch::TchError::Torch(format!("backward: {msg}"))).into()
    }
}

/// Creates a schedule (`linear_warmup_cosine`, `cosine`, `linear`, `linear_warmup_linear`,
/// `exponential`, `step`, `constant`) and sets the optimizer's LR for step 0. Config keys:
/// `initial_lr` (default: the optimizer's LR), `min_lr` (0), `total_steps` (1000),
/// `warmup_steps` (0), `gamma` (0.1), `step_size` (100); unknown keys raise.
#[pyfunction]
#[pyo3(signature = (optimizer, scheduler_type, config=None))]
fn torch_lr_scheduler(
    optimizer: Bound<'_, PyOptimizer>,
    scheduler_type: &str,
    config: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyScheduler> {
    let parsed: ScheduleConfig = from_dict(config, "scheduler config")?;
    let kind = ScheduleKind::from_name(scheduler_type)?;
    let current = optimizer.borrow().lock().lr();
    // An absent initial_lr is the optimizer's current one (the guide's default).
    let has_initial_lr = match config {
        Some(c) => c.contains("initial_lr")?,
        None => false,
    };
    let schedule = Schedule::new(ScheduleConfig {
        kind,
        initial_lr: if has_initial_lr {
            parsed.initial_lr
        } else {
            current
        },
        ..parsed
    })?;
    optimizer.borrow().lock().set_lr(schedule.lr(0))?;
    Ok(PyScheduler {
        schedule,
        optimizer: optimizer.unbind(),
        step: Mutex::new(0),
    })
}

/// Advances the schedule one step and sets the optimizer's LR.
#[pyfunction]
fn torch_scheduler_step(py: Python<'_>, scheduler: &PyScheduler) -> PyResult<()> {
    let mut step = scheduler.step.lock().unwrap_or_else(|e| e.into_inner());
    *step += 1;
    let lr = scheduler.schedule.lr(*step);
    scheduler.optimizer.bind(py).borrow().lock().set_lr(lr)?;
    Ok(())
}

/// The learning rate of the schedule's current step.
#[pyfunction]
fn torch_scheduler_get_lr(scheduler: &PyScheduler) -> f64 {
    scheduler.schedule.lr(scheduler.step_count())
}

/// Turns autograd recording on or off for this thread (as `torch.set_grad_enabled`); returns
/// the previous setting.
#[pyfunction]
fn torch_set_grad_enabled(flag: bool) -> bool {
    // SAFETY: sets libtorch's thread-local GradMode; no pointers involved.
    unsafe { torch_sys::at_grad_set_enabled(i32::from(flag)) != 0 }
}

/// Waits for the accelerator to finish queued work, as the guide's name says: MPS where present
/// (through `torch.mps.synchronize`, the libtorch this process shares with torch), else every
/// CUDA device. Returns True if something was synchronised, False on a CPU-only machine.
#[pyfunction]
fn torch_mps_synchronize(py: Python<'_>) -> PyResult<bool> {
    let torch = py.import("torch")?;
    let mps = torch.getattr("backends")?.getattr("mps")?;
    if mps.call_method0("is_available")?.extract::<bool>()? {
        torch.getattr("mps")?.call_method0("synchronize")?;
        return Ok(true);
    }
    let n = tch::Cuda::device_count();
    py.detach(|| {
        for i in 0..n {
            tch::Cuda::synchronize(i);
        }
    });
    Ok(n > 0)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyOptimizer>()?;
    m.add_class::<PyScheduler>()?;
    m.add_function(wrap_pyfunction!(torch_optimizer_add_params, m)?)?;
    m.add_function(wrap_pyfunction!(torch_optimizer_zero_grad, m)?)?;
    m.add_function(wrap_pyfunction!(torch_optimizer_step, m)?)?;
    m.add_function(wrap_pyfunction!(torch_clip_grad_norm, m)?)?;
    m.add_function(wrap_pyfunction!(torch_backward, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lr_scheduler, m)?)?;
    m.add_function(wrap_pyfunction!(torch_scheduler_step, m)?)?;
    m.add_function(wrap_pyfunction!(torch_scheduler_get_lr, m)?)?;
    m.add_function(wrap_pyfunction!(torch_set_grad_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(torch_mps_synchronize, m)?)?;
    Ok(())
}
