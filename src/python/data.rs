//! `loratch.inspect_data(config)`: the data inspector of `loratch data`, as a dict.
use crate::data::inspect::{inspect, DataReport};
use crate::data::Packing;
use crate::error::Error;
use crate::train::TrainConfig;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;

/// The report as the dict `loratch.DataReport` describes.
fn report_dict<'py>(py: Python<'py>, r: &DataReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let c = &r.counts;
    d.set_item("source", &r.source)?;
    d.set_item("max_seq_length", r.max_seq_length)?;
    d.set_item("records", c.records)?;
    d.set_item("examples", c.examples)?;
    d.set_item("tokens", c.tokens)?;
    d.set_item("target_tokens", c.target_tokens)?;
    d.set_item("truncated", c.truncated)?;
    d.set_item("no_target_after_truncation", c.no_target_after_truncation)?;
    d.set_item("without_target", c.without_target)?;
    d.set_item("eos_targets", c.eos_targets)?;
    d.set_item("doubled_bos", c.doubled_bos)?;
    d.set_item("assistant_missing", c.assistant_missing)?;
    d.set_item("train_examples", r.train_examples)?;
    d.set_item("validation_examples", r.validation_examples)?;
    let packing = match r.layout.packing {
        Packing::Off => "off",
        Packing::Rows => "rows",
        Packing::Examples => "examples",
    };
    d.set_item("packing", packing)?;
    d.set_item("batches", r.layout.batches)?;
    d.set_item("rows", r.layout.rows)?;
    d.set_item("padding_fraction", r.layout.padding_fraction)?;
    let samples = PyList::empty(py);
    for s in &r.samples {
        let sd = PyDict::new(py);
        sd.set_item("record", s.record)?;
        sd.set_item("tokens", s.tokens)?;
        sd.set_item("target_tokens", s.target_tokens)?;
        sd.set_item("truncated", s.truncated)?;
        sd.set_item("spans", s.spans.clone())?;
        sd.set_item("marked", s.marked(false))?;
        samples.append(sd)?;
    }
    d.set_item("samples", samples)?;
    let warnings = PyList::empty(py);
    for w in &r.warnings {
        let wd = PyDict::new(py);
        wd.set_item("kind", w.kind())?;
        wd.set_item("message", w.to_string())?;
        warnings.append(wd)?;
    }
    d.set_item("warnings", warnings)?;
    d.set_item("text", r.text(false))?;
    Ok(d)
}

/// Inspects the training data of a config given as JSON text (the dict of `loratch.train`) or
/// as a TOML, YAML or JSON file.
#[pyfunction]
#[pyo3(signature = (*, config_json=None, config_path=None, show=3))]
fn _inspect_data<'py>(
    py: Python<'py>,
    config_json: Option<&str>,
    config_path: Option<PathBuf>,
    show: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let parsed = match (config_json, config_path) {
        (Some(text), None) => TrainConfig::from_json(text)?,
        (None, Some(path)) => TrainConfig::read(&path, &[])?,
        _ => {
            return Err(
                Error::Config("give exactly one of config_json and config_path".into()).into(),
            )
        }
    };
    crate::python::args::warn_config_notes(py, &parsed.notes)?;
    let config = parsed.config;
    let report = py.detach(|| inspect(&config, show))?;
    report_dict(py, &report)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_inspect_data, m)?)?;
    Ok(())
}
