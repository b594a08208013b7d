//! The spec's "HuggingFace LoRA API": `torch_hf_*` functions over the model registry.
use super::args::from_dict;
use super::tensor::PyTensor;
use crate::device::parse_dtype;
use crate::error::Error;
use crate::hf::hub_cache;
use crate::hf::registry::{self, lock};
use crate::hf::{LoadConfig, LoadOptions, LoadedModel};
use crate::lora::targets::Targets;
use crate::lora::LoraSpec;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use std::path::PathBuf;

/// Runs `f` on the model called `name` with the GIL released. A model's lock must never be
/// waited for while holding the GIL: a call holding that lock with the GIL released can need the
/// GIL (dropping an adapter tensor whose Python object torch keeps alive from C++, as
/// `torch_hf_lora_init` does when it replaces adapters, takes the GIL), so that wait would
/// deadlock.
fn with_model<T: Send>(
    py: Python<'_>,
    name: &str,
    f: impl FnOnce(&mut LoadedModel) -> crate::error::Result<T> + Send,
) -> PyResult<T> {
    let entry = registry::get(name)?;
    Ok(py.detach(move || f(&mut lock(&entry)))?)
}

/// Loads a Hugging Face model directory, a GGUF file, or a Hub id (`owner/name`, at `revision`)
/// from the local Hugging Face cache under `model_name` (replacing a model of that name).
/// `config` keys: `device` ("cpu", "cuda[:N]", "mps"), `dtype` ("float32", "bfloat16",
/// "float16"). Returns the name.
#[pyfunction]
#[pyo3(signature = (model_name, path, config=None, *, revision=None))]
fn torch_hf_load_model_lora(
    py: Python<'_>,
    model_name: String,
    path: PathBuf,
    config: Option<&Bound<'_, PyDict>>,
    revision: Option<String>,
) -> PyResult<String> {
    let opts = LoadOptions::parse(&from_dict::<LoadConfig>(config, "config")?)?;
    let path = hub_cache::resolve_revision(&path, revision.as_deref())?;
    let model = py.detach(|| LoadedModel::load(&path, &opts))?;
    registry::insert(&model_name, model);
    Ok(model_name)
}

/// Removes a model from the registry (its memory is freed when no call uses it).
#[pyfunction]
fn torch_hf_unload(model_name: &str) -> PyResult<()> {
    Ok(registry::remove(model_name)?)
}

/// Names of the loaded models, sorted.
#[pyfunction]
fn torch_hf_list_models() -> Vec<String> {
    registry::names()
}

/// Logits `[B, T, vocab]` for `input_ids` `[B, T]` (or `[T]`, then B = 1).
#[pyfunction]
#[pyo3(signature = (model_name, input_ids, attention_mask=None))]
fn torch_hf_forward(
    py: Python<'_>,
    model_name: &str,
    input_ids: PyTensor,
    attention_mask: Option<PyTensor>,
) -> PyResult<PyTensor> {
    let entry = registry::get(model_name)?;
    let (ids, mask) = (input_ids.0, attention_mask.map(|m| m.0));
    let logits = py.detach(move || lock(&entry).forward(&ids, mask.as_ref()))?;
    Ok(PyTensor(logits))
}

/// transformers' `model(input_ids, labels=labels, attention_mask=attention_mask).loss`: the mean
/// cross-entropy over the target tokens (`labels` shifted inside, default `input_ids`, `-100` left
/// out; padding counts unless labelled -100), through the trainer's chunked head and fused
/// cross-entropy (no `[tokens, vocab]` logits). A float32 0-dim tensor; its backward reaches the
/// adapters.
#[pyfunction]
#[pyo3(signature = (model_name, input_ids, labels=None, attention_mask=None))]
fn torch_hf_loss(
    py: Python<'_>,
    model_name: &str,
    input_ids: PyTensor,
    labels: Option<PyTensor>,
    attention_mask: Option<PyTensor>,
) -> PyResult<PyTensor> {
    let entry = registry::get(model_name)?;
    let (ids, labels, mask) = (
        input_ids.0,
        labels.map(|l| l.0),
        attention_mask.map(|m| m.0),
    );
    let loss = py.detach(move || lock(&entry).loss(&ids, labels.as_ref(), mask.as_ref()))?;
    Ok(PyTensor(loss))
}

fn targets_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Targets> {
    if let Ok(s) = obj.downcast::<PyString>() {
        let s = s.to_string();
        return Ok(Targets::from_json(&serde_json::Value::String(s))?);
    }
    if let Ok(list) = obj.extract::<Vec<String>>() {
        return Ok(Targets::Names(list));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "target_modules must be a list of module names, \"all-linear\", or a regex string",
    ))
}

/// Lays fresh LoRA adapters on the target modules (a fresh adapter changes nothing).
#[pyfunction]
#[pyo3(signature = (model_name, rank, alpha, target_modules, dtype="float32", *, dropout=0.0, use_rslora=false, layers=None))]
#[allow(clippy::too_many_arguments)]
fn torch_hf_lora_init(
    py: Python<'_>,
    model_name: &str,
    rank: i64,
    alpha: f64,
    target_modules: &Bound<'_, PyAny>,
    dtype: &str,
    dropout: f64,
    use_rslora: bool,
    layers: Option<Vec<i64>>,
) -> PyResult<bool> {
    let targets = targets_from_py(target_modules)?;
    let kind = parse_dtype(dtype)?;
    crate::lora::LoraConfig::new(rank, alpha, dropout, use_rslora)?;
    let spec = LoraSpec {
        dropout,
        use_rslora,
        layers,
        ..LoraSpec::simple(rank, alpha, targets)
    };
    let entry = registry::get(model_name)?;
    let coverage = py.detach(move || -> crate::Result<_> {
        let mut model = lock(&entry);
        model.init_lora(spec, kind)?;
        Ok(model.lora_coverage())
    })?;
    if let Some((summary, warning)) = coverage {
        // The summary on sys.stderr (as the trainer prints it); a partial match as a
        // `loratch.LoraWarning`, which callers can filter or turn into an error.
        let stderr = py.import("sys")?.getattr("stderr")?;
        stderr.call_method1("write", (format!("{summary}\n"),))?;
        if let Some(w) = warning {
            let class = py.import("loratch.errors")?.getattr("LoraWarning")?;
            PyErr::warn(py, &class, &std::ffi::CString::new(w)?, 1)?;
        }
    }
    Ok(true)
}

/// The live adapter tensors: by layer, then module (q, k, v, o, gate, up, down), A then B.
#[pyfunction]
fn torch_hf_lora_get_parameters(py: Python<'_>, model_name: &str) -> PyResult<Vec<PyTensor>> {
    let params = with_model(py, model_name, |m| m.parameters())?;
    Ok(params.into_iter().map(PyTensor).collect())
}

/// The live adapter tensors keyed by PEFT key names (same order as get_parameters).
#[pyfunction]
fn torch_hf_lora_named_parameters<'py>(
    py: Python<'py>,
    model_name: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let named = with_model(py, model_name, |m| m.named_parameters())?;
    let dict = PyDict::new(py);
    for (k, t) in named {
        dict.set_item(k, PyTensor(t))?;
    }
    Ok(dict)
}

/// Enables or disables the adapters (disabled = exactly the base model).
#[pyfunction]
fn torch_hf_lora_enable(py: Python<'_>, model_name: &str, enable: bool) -> PyResult<()> {
    let entry = registry::get(model_name)?;
    Ok(py.detach(move || lock(&entry).set_enabled(enable))?)
}

/// Folds the adapters into the base weights (fp32 math; NaN/Inf deltas raise, nothing changes).
#[pyfunction]
fn torch_hf_lora_merge(py: Python<'_>, model_name: &str) -> PyResult<()> {
    let entry = registry::get(model_name)?;
    Ok(py.detach(move || lock(&entry).merge())?)
}

/// Takes the adapters back out of the base weights.
#[pyfunction]
fn torch_hf_lora_unmerge(py: Python<'_>, model_name: &str) -> PyResult<()> {
    let entry = registry::get(model_name)?;
    Ok(py.detach(move || lock(&entry).unmerge())?)
}

/// Training mode (adapter dropout active) or evaluation mode (the default after loading).
#[pyfunction]
fn torch_hf_set_training(py: Python<'_>, model_name: &str, training: bool) -> PyResult<()> {
    with_model(py, model_name, |m| {
        m.training = training;
        Ok(())
    })
}

/// Activation checkpointing on or off: forwards that record gradients keep only each decoder
/// layer's input and run the layer again in the backward (less memory, about one more forward of
/// compute; results and gradients unchanged).
#[pyfunction]
fn torch_hf_gradient_checkpointing(
    py: Python<'_>,
    model_name: &str,
    enabled: bool,
) -> PyResult<()> {
    with_model(py, model_name, |m| {
        m.set_gradient_checkpointing(enabled);
        Ok(())
    })
}

/// Bytes held by the model: base weights + adapters + adapter gradients when allocated.
#[pyfunction]
fn torch_hf_memory_usage(py: Python<'_>, model_name: &str) -> PyResult<i64> {
    let report = with_model(py, model_name, |m| {
        Ok(m.memory_report(super::train::live_state_bytes))
    })?;
    Ok(report.iter().map(|(_, b)| b).sum())
}

/// The parts of `torch_hf_memory_usage`: `{"weights", "adapters", "adapter_grads", "total"}`.
#[pyfunction]
fn torch_hf_memory_report<'py>(py: Python<'py>, model_name: &str) -> PyResult<Bound<'py, PyDict>> {
    let report = with_model(py, model_name, |m| {
        Ok(m.memory_report(super::train::live_state_bytes))
    })?;
    let dict = PyDict::new(py);
    let mut total = 0;
    for (k, v) in report {
        dict.set_item(k, v)?;
        total += v;
    }
    dict.set_item("total", total)?;
    Ok(dict)
}

/// Saves the adapters in PEFT's format: a directory (`adapter_config.json` +
/// `adapter_model.safetensors`) for a path without extension, or one `.safetensors` file with the
/// config in its metadata; or, for `.gguf`, as a llama.cpp LoRA adapter. Writes are atomic.
#[pyfunction]
fn torch_hf_lora_save(py: Python<'_>, model_name: &str, path: PathBuf) -> PyResult<()> {
    let entry = registry::get(model_name)?;
    Ok(py.detach(move || crate::hf::peft::save(&lock(&entry), &path))?)
}

/// Loads PEFT adapters (written by loratch or by PEFT) into the model, initialising LoRA from
/// the adapter's config when needed. Strict: any mismatch raises and leaves the model unchanged.
#[pyfunction]
fn torch_hf_lora_load(py: Python<'_>, model_name: &str, path: PathBuf) -> PyResult<()> {
    let entry = registry::get(model_name)?;
    Ok(py.detach(move || crate::hf::peft::load(&mut lock(&entry), &path))?)
}

/// One prompt's token ids: an int64 (or int32) tensor `[T]` or `[1, T]`, or a list of ints.
fn prompt_ids(ob: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    use super::args::int_list;
    if !super::tensor::is_tensor(ob)? {
        return int_list(ob, what, "a list of token ids (ints) or an int64 tensor");
    }
    let t = ob.extract::<PyTensor>()?.0;
    let kind = t.f_kind().map_err(Error::from)?;
    if !matches!(kind, tch::Kind::Int64 | tch::Kind::Int) {
        return Err(Error::Dtype(format!(
            "{what} must be int64 (or int32), got {}",
            crate::device::dtype_name(kind)
        ))
        .into());
    }
    if t.dim() > 2 || (t.dim() == 2 && t.size()[0] != 1) {
        return Err(Error::Shape(format!(
            "{what} must be one sequence ([T] or [1, T]; a batch is a list of prompts), got {:?}",
            t.size()
        ))
        .into());
    }
    let flat = t
        .f_flatten(0, -1)
        .and_then(|t| t.f_to_kind(tch::Kind::Int64))
        .map_err(Error::from)?;
    Ok(Vec::<i64>::try_from(&flat).map_err(Error::from)?)
}

/// Whether `input_ids` is a list of prompts (a list or tuple whose first item is itself a
/// list, tuple or tensor) rather than one prompt.
fn is_batch(ob: &Bound<'_, PyAny>) -> PyResult<bool> {
    use pyo3::types::{PyList, PyTuple};
    let seq = ob.is_instance_of::<PyList>() || ob.is_instance_of::<PyTuple>();
    if !seq || ob.len()? == 0 {
        return Ok(false);
    }
    let first = ob.get_item(0)?;
    Ok(first.is_instance_of::<PyList>()
        || first.is_instance_of::<PyTuple>()
        || super::tensor::is_tensor(&first)?)
}

/// Generates up to `max_new_tokens` after `input_ids` with a KV cache and returns the new token
/// ids (the stop token included when reached). Greedy with `greedy=True`; otherwise sampling with
/// `temperature`, `top_k`, `top_p` from a generator seeded by `seed` (torch's RNG is untouched).
/// A list of prompts runs as one left-padded batch, each row stopping on its own, and returns a
/// list of each prompt's new tokens.
#[pyfunction]
#[pyo3(signature = (model_name, input_ids, max_new_tokens, *, eos_token_id=None, temperature=1.0, top_k=None, top_p=None, greedy=false, seed=None))]
#[allow(clippy::too_many_arguments)]
fn torch_hf_generate(
    py: Python<'_>,
    model_name: &str,
    input_ids: &Bound<'_, PyAny>,
    max_new_tokens: &Bound<'_, PyAny>,
    eos_token_id: Option<&Bound<'_, PyAny>>,
    temperature: f64,
    top_k: Option<&Bound<'_, PyAny>>,
    top_p: Option<f64>,
    greedy: bool,
    seed: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    use super::args::{int_in_range, int_list};
    let max_new_tokens: usize = int_in_range(max_new_tokens, "max_new_tokens")?;
    let top_k: Option<usize> = top_k.map(|k| int_in_range(k, "top_k")).transpose()?;
    let seed: Option<u64> = seed.map(|s| int_in_range(s, "seed")).transpose()?;
    let batch = is_batch(input_ids)?;
    let prompts: Vec<Vec<i64>> = if batch {
        input_ids
            .try_iter()?
            .enumerate()
            .map(|(i, p)| prompt_ids(&p?, &format!("input_ids[{i}]")))
            .collect::<PyResult<_>>()?
    } else {
        vec![prompt_ids(input_ids, "input_ids")?]
    };
    let eos_token_ids: Vec<i64> = match eos_token_id {
        None => vec![],
        Some(e) if e.is_instance_of::<pyo3::types::PyInt>() => {
            vec![int_in_range(e, "eos_token_id")?]
        }
        Some(e) => int_list(e, "eos_token_id", "an int or a list of ints")?,
    };
    let opts = crate::hf::generate::GenerateOptions {
        max_new_tokens,
        eos_token_ids,
        greedy,
        temperature,
        top_k,
        top_p,
        seed,
    };
    let entry = registry::get(model_name)?;
    let mut rows =
        py.detach(move || crate::hf::generate::generate_batch(&lock(&entry), &prompts, &opts))?;
    Ok(match batch {
        true => rows.into_pyobject(py)?.into_any().unbind(),
        false => rows
            .pop()
            .unwrap_or_default()
            .into_pyobject(py)?
            .into_any()
            .unbind(),
    })
}

/// Writes the model with its adapters merged as a Hugging Face directory (config, weights,
/// tokenizer files) that transformers loads; the loaded model itself is left unchanged.
#[pyfunction]
fn torch_hf_save_merged(py: Python<'_>, model_name: &str, path: PathBuf) -> PyResult<()> {
    let entry = registry::get(model_name)?;
    Ok(py.detach(move || crate::hf::export::save_merged(&lock(&entry), &path))?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(torch_hf_load_model_lora, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_unload, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_list_models, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_forward, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_loss, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_init, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_get_parameters, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_named_parameters, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_enable, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_unmerge, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_set_training, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_gradient_checkpointing, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_save, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_lora_load, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_generate, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_save_merged, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_memory_usage, m)?)?;
    m.add_function(wrap_pyfunction!(torch_hf_memory_report, m)?)?;
    Ok(())
}
