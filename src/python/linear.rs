//! The spec's "Basic LoRA API": `LoraLinear` and the `torch_lora_*` functions.
use super::tensor::{is_tensor, PyTensor};
use crate::device::{device_name, dtype_name, parse_device, parse_dtype};
use crate::lora::file::{load_linear_adapter, save_linear_adapter};
use crate::lora::{LoraConfig, LoraLinear};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// A linear layer `y = x W^T + b` with a LoRA adapter `scaling * B(A(dropout(x)))`.
#[pyclass(name = "LoraLinear", module = "loratch", weakref)]
pub struct PyLoraLinear {
    inner: Mutex<LoraLinear>,
}

impl PyLoraLinear {
    fn lock(&self) -> MutexGuard<'_, LoraLinear> {
        // A poisoned lock only means another thread panicked mid-call; the layer's tensors are
        // still consistent (every mutation is a single libtorch call), so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyLoraLinear {
    /// The frozen base weight `[out_features, in_features]` (live).
    #[getter]
    fn weight(&self) -> PyTensor {
        PyTensor(self.lock().weight().shallow_clone())
    }

    /// The frozen bias `[out_features]` (live), or None.
    #[getter]
    fn bias(&self) -> Option<PyTensor> {
        self.lock().bias().map(|b| PyTensor(b.shallow_clone()))
    }

    /// LoRA A `[rank, in_features]` (live, requires grad).
    #[getter(lora_A)]
    fn lora_a(&self) -> PyTensor {
        PyTensor(self.lock().adapter().a.shallow_clone())
    }

    /// LoRA B `[out_features, rank]` (live, requires grad).
    #[getter(lora_B)]
    fn lora_b(&self) -> PyTensor {
        PyTensor(self.lock().adapter().b.shallow_clone())
    }

    #[getter]
    fn rank(&self) -> i64 {
        self.lock().config().rank
    }

    #[getter]
    fn alpha(&self) -> f64 {
        self.lock().config().alpha
    }

    #[getter]
    fn dropout(&self) -> f64 {
        self.lock().config().dropout
    }

    #[getter]
    fn use_rslora(&self) -> bool {
        self.lock().config().use_rslora
    }

    #[getter]
    fn scaling(&self) -> f64 {
        self.lock().config().scaling()
    }

    #[getter]
    fn merged(&self) -> bool {
        self.lock().merged()
    }

    #[getter]
    fn training(&self) -> bool {
        self.lock().training()
    }

    #[getter]
    fn in_features(&self) -> i64 {
        self.lock().in_features()
    }

    #[getter]
    fn out_features(&self) -> i64 {
        self.lock().out_features()
    }

    /// The dtype name, e.g. "float32".
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.lock().weight().kind())
    }

    /// The device name, e.g. "cpu" or "cuda:0".
    #[getter]
    fn device(&self) -> String {
        device_name(self.lock().weight().device())
    }

    /// Training mode: dropout active. Returns the layer.
    fn train(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf.borrow().lock().set_training(true);
        slf
    }

    /// Evaluation mode: dropout off. Returns the layer.
    fn eval(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf.borrow().lock().set_training(false);
        slf
    }

    fn __repr__(&self) -> String {
        let l = self.lock();
        let c = l.config();
        format!(
            "LoraLinear(in_features={}, out_features={}, rank={}, alpha={:?}, scaling={:?}, dropout={:?}, \
             use_rslora={}, bias={}, dtype={}, device={}, merged={}, training={})",
            l.in_features(),
            l.out_features(),
            c.rank,
            c.alpha,
            c.scaling(),
            c.dropout,
            if c.use_rslora { "True" } else { "False" },
            if l.bias().is_some() { "True" } else { "False" },
            dtype_name(l.weight().kind()),
            device_name(l.weight().device()),
            if l.merged() { "True" } else { "False" },
            if l.training() { "True" } else { "False" },
        )
    }
}

/// Creates a LoRA linear layer (base weight and bias initialised like `torch.nn.Linear`, frozen).
#[pyfunction]
#[pyo3(signature = (in_features, out_features, rank, alpha, *, bias=true, dropout=0.0, use_rslora=false, dtype="float32", device="cpu"))]
#[allow(clippy::too_many_arguments)]
fn torch_lora_linear(
    py: Python<'_>,
    in_features: i64,
    out_features: i64,
    rank: i64,
    alpha: f64,
    bias: bool,
    dropout: f64,
    use_rslora: bool,
    dtype: &str,
    device: &str,
) -> PyResult<PyLoraLinear> {
    let config = LoraConfig::new(rank, alpha, dropout, use_rslora)?;
    let kind = parse_dtype(dtype)?;
    let device = parse_device(device)?;
    let layer =
        py.detach(|| LoraLinear::new(in_features, out_features, config, bias, kind, device))?;
    Ok(PyLoraLinear {
        inner: Mutex::new(layer),
    })
}

/// Wraps a `torch.nn.Linear`: its weight and bias are shared (not copied) and frozen.
#[pyfunction]
#[pyo3(signature = (linear, rank, alpha, *, dropout=0.0, use_rslora=false))]
fn torch_lora_apply_to_linear(
    linear: &Bound<'_, PyAny>,
    rank: i64,
    alpha: f64,
    dropout: f64,
    use_rslora: bool,
) -> PyResult<PyLoraLinear> {
    let nn_linear = linear.py().import("torch.nn")?.getattr("Linear")?;
    if !linear.is_instance(&nn_linear)? {
        let name = linear.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "expected a torch.nn.Linear, got {name}"
        )));
    }
    let weight: PyTensor = linear.getattr("weight")?.extract()?;
    let bias_obj = linear.getattr("bias")?;
    let bias = if bias_obj.is_none() {
        None
    } else if is_tensor(&bias_obj)? {
        Some(bias_obj.extract::<PyTensor>()?.0)
    } else {
        return Err(PyTypeError::new_err("linear.bias must be a tensor or None"));
    };
    let config = LoraConfig::new(rank, alpha, dropout, use_rslora)?;
    let layer = LoraLinear::from_weight(weight.0, bias, config)?;
    Ok(PyLoraLinear {
        inner: Mutex::new(layer),
    })
}

/// `y = x W^T + b + scaling * B(A(dropout(x)))` for `x` of shape `[..., in_features]`.
#[pyfunction]
fn torch_lora_forward(py: Python<'_>, layer: &PyLoraLinear, x: PyTensor) -> PyResult<PyTensor> {
    let x = x.0;
    let y = py.detach(move || layer.lock().forward(&x))?;
    Ok(PyTensor(y))
}

/// The forward with autograd recording forced on (even inside `torch.no_grad()`).
/// With `retain_graph=True` the output also keeps its own `.grad` after backward
/// (`Tensor.retain_grad()`).
#[pyfunction]
#[pyo3(signature = (layer, x, retain_graph=false))]
fn torch_lora_forward_with_gradients<'py>(
    py: Python<'py>,
    layer: &PyLoraLinear,
    x: PyTensor,
    retain_graph: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let x = x.0;
    let y = py.detach(move || tch::with_grad(|| layer.lock().forward(&x)))?;
    let requires_grad = y.requires_grad();
    let y = PyTensor(y).into_pyobject(py)?;
    if retain_graph && requires_grad {
        y.call_method0("retain_grad")?;
    }
    Ok(y)
}

/// Folds the adapter into the weight (`W += scaling * B @ A`, float32 math).
#[pyfunction]
fn torch_lora_merge_weights(py: Python<'_>, layer: &PyLoraLinear) -> PyResult<()> {
    Ok(py.detach(|| layer.lock().merge())?)
}

/// Undoes `torch_lora_merge_weights` (`W -= scaling * B @ A`).
#[pyfunction]
fn torch_lora_unmerge_weights(py: Python<'_>, layer: &PyLoraLinear) -> PyResult<()> {
    Ok(py.detach(|| layer.lock().unmerge())?)
}

/// How deep [`collect_layers`] looks into containers and attributes (a `torch.nn.Module`'s
/// children sit two levels down, in `__dict__["_modules"]`).
const MAX_DEPTH: usize = 8;

/// Appends the `LoraLinear` layers in `obj`: itself, or those in its list, tuple or dict items
/// or its attributes (`__dict__`, so a `torch.nn.Module` holding them), each layer once.
fn collect_layers<'py>(
    obj: &Bound<'py, PyAny>,
    depth: usize,
    out: &mut Vec<Bound<'py, PyLoraLinear>>,
) -> PyResult<()> {
    if let Ok(layer) = obj.downcast::<PyLoraLinear>() {
        if !out.iter().any(|l| l.is(layer)) {
            out.push(layer.clone());
        }
        return Ok(());
    }
    if depth == 0 || obj.is_instance_of::<pyo3::types::PyString>() {
        return Ok(());
    }
    let items: Vec<Bound<'py, PyAny>> = if let Ok(d) = obj.downcast::<PyDict>() {
        d.values().iter().collect()
    } else if let Ok(l) = obj.downcast::<PyList>() {
        l.iter().collect()
    } else if let Ok(t) = obj.downcast::<PyTuple>() {
        t.iter().collect()
    } else if let Ok(d) = obj.getattr("__dict__") {
        match d.downcast::<PyDict>() {
            Ok(d) => d.values().iter().collect(),
            Err(_) => Vec::new(),
        }
    } else {
        Vec::new()
    };
    for item in items {
        collect_layers(&item, depth - 1, out)?;
    }
    Ok(())
}

/// The live trainable tensors `[lora_A, lora_B]` of a `LoraLinear`; of every LoRA layer held by
/// `model` (a list, tuple or dict of layers, or an object such as a `torch.nn.Module` holding
/// them as attributes), in order; or, for a string, of the loaded model of that name (as
/// `torch_hf_lora_get_parameters`).
#[pyfunction]
fn torch_lora_trainable_params(
    py: Python<'_>,
    model: &Bound<'_, PyAny>,
) -> PyResult<Vec<PyTensor>> {
    if let Ok(name) = model.extract::<String>() {
        let entry = crate::hf::registry::get(&name)?;
        let params = py.detach(|| crate::hf::registry::lock(&entry).parameters())?;
        return Ok(params.into_iter().map(PyTensor).collect());
    }
    let mut layers = Vec::new();
    collect_layers(model, MAX_DEPTH, &mut layers)?;
    if layers.is_empty() {
        let name = model.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "expected a LoraLinear, a container or module holding LoraLinear layers, or a \
             loaded model's name; got {name} without any LoraLinear"
        )));
    }
    Ok(layers
        .iter()
        .flat_map(|l| l.borrow().lock().trainable_params())
        .map(PyTensor)
        .collect())
}

/// Saves A, B and the adapter's metadata to a safetensors file, atomically.
#[pyfunction]
fn torch_lora_save_adapters(py: Python<'_>, layer: &PyLoraLinear, path: PathBuf) -> PyResult<()> {
    Ok(py.detach(|| save_linear_adapter(&layer.lock(), &path))?)
}

/// Loads A and B saved by `torch_lora_save_adapters` into the layer, in place, after checking
/// that the file fits the layer.
#[pyfunction]
fn torch_lora_load_adapters(py: Python<'_>, layer: &PyLoraLinear, path: PathBuf) -> PyResult<()> {
    Ok(py.detach(|| load_linear_adapter(&mut layer.lock(), &path))?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLoraLinear>()?;
    m.add_function(wrap_pyfunction!(torch_lora_linear, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_apply_to_linear, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_forward, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_forward_with_gradients, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_merge_weights, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_unmerge_weights, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_trainable_params, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_save_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(torch_lora_load_adapters, m)?)?;
    Ok(())
}
