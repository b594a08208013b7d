//! `torch_hf_tokenizer_load` and the `Tokenizer` class: Hugging Face `tokenizer.json` through the
//! `tokenizers` crate, with the model's Jinja chat template.
use super::args::{token_id, token_ids};
use crate::tokenizer::{chat::Message, Tokenizer};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// A model's tokenizer (encode, decode, special tokens, chat template).
#[pyclass(name = "Tokenizer", module = "loratch", frozen)]
pub struct PyTokenizer {
    inner: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    /// Token ids of `text` (with the tokenizer's special tokens, e.g. BOS, when asked).
    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.inner.encode(text, add_special_tokens))?)
    }

    /// The text of `ids`.
    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, ids: &Bound<'_, PyAny>, skip_special_tokens: bool) -> PyResult<String> {
        let ids: Vec<u32> = token_ids(ids, "argument 'ids'")?;
        Ok(self.inner.decode(&ids, skip_special_tokens)?)
    }

    /// The id of a token string, or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, or None.
    fn id_to_token(&self, id: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        Ok(self.inner.id_to_token(token_id(id, "argument 'id'")?))
    }

    /// Size of the vocabulary including added tokens.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.inner.bos_token().map(str::to_owned)
    }

    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.inner.eos_token().map(str::to_owned)
    }

    #[getter]
    fn pad_token(&self) -> Option<String> {
        self.inner.pad_token().map(str::to_owned)
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id()
    }

    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id()
    }

    #[getter]
    fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token_id()
    }

    /// Renders `messages` (dicts with "role" and "content") with the model's chat template,
    /// exactly as transformers' `apply_chat_template(..., tokenize=False)`.
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages: Vec<Bound<'_, PyDict>>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let mut msgs = Vec::with_capacity(messages.len());
        for m in &messages {
            let field = |k: &str| -> PyResult<String> {
                let v = m.get_item(k)?.ok_or_else(|| {
                    PyTypeError::new_err(format!("each message needs a {k:?} key"))
                })?;
                v.extract().map_err(|_| {
                    let got = v.get_type().name().map(|n| n.to_string());
                    PyTypeError::new_err(format!(
                        "message {k:?} must be a string, got {}",
                        got.unwrap_or_else(|_| "?".into())
                    ))
                })
            };
            msgs.push(Message::new(field("role")?, field("content")?));
        }
        Ok(self
            .inner
            .apply_chat_template(&msgs, add_generation_prompt)?)
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, bos={:?}, eos={:?}, chat_template={})",
            self.inner.vocab_size(),
            self.inner.bos_token(),
            self.inner.eos_token(),
            if self.inner.chat_template().is_some() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// Loads `tokenizer.json` (and `tokenizer_config.json`, chat template) from a model directory,
/// a `tokenizer.json` path, the metadata of a GGUF file, or a Hub id (`owner/name`, at
/// `revision`) in the local Hugging Face cache.
#[pyfunction]
#[pyo3(signature = (path, *, revision=None))]
fn torch_hf_tokenizer_load(
    py: Python<'_>,
    path: PathBuf,
    revision: Option<String>,
) -> PyResult<PyTokenizer> {
    let path = crate::hf::hub_cache::resolve_revision(&path, revision.as_deref())?;
    let inner = py.detach(|| Tokenizer::for_model(&path))?;
    Ok(PyTokenizer { inner })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(torch_hf_tokenizer_load, m)?)?;
    Ok(())
}
