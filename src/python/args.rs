//! Python argument conversion whose errors name the argument and the accepted types, instead of
//! pyo3's generic "Can't extract `str` to `Vec`" or an `OverflowError` for a negative int; config
//! dicts read through the core's serde structs.
use crate::error::Error;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

/// A Python int in the range of `T` (e.g. a `u32` count); a non-int is a `TypeError`, an int out
/// of range a `ConfigError` (a `ValueError`), both naming `what`.
pub fn int_in_range<T>(ob: &Bound<'_, PyAny>, what: &str) -> PyResult<T>
where
    T: TryFrom<i128> + num_bounds::Bounds,
{
    in_range(ob, what, Error::Config)
}

/// A token id: as [`int_in_range`], but an id out of range is an `InputError`, as a model's
/// forward reports ids outside its vocabulary.
pub fn token_id(ob: &Bound<'_, PyAny>, what: &str) -> PyResult<u32> {
    in_range(ob, what, Error::Input)
}

/// A list of token ids, each as [`token_id`].
pub fn token_ids(ob: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    sequence(ob, what, "a list of token ids (ints)")?
        .iter()
        .enumerate()
        .map(|(i, item)| token_id(item, &format!("{what}[{i}]")))
        .collect()
}

/// An int of `T`'s range, the error for one outside it made by `error`.
fn in_range<T>(ob: &Bound<'_, PyAny>, what: &str, error: fn(String) -> Error) -> PyResult<T>
where
    T: TryFrom<i128> + num_bounds::Bounds,
{
    let v: i128 = ob.extract().map_err(|_| not_an_int(ob, what))?;
    T::try_from(v).map_err(|_| {
        error(format!(
            "{what} must be in [{}, {}], got {v}",
            T::MIN_I128,
            T::MAX_I128
        ))
        .into()
    })
}

/// The items of a list or other sequence (not a string or bytes), naming `what` in errors.
fn sequence<'py>(
    ob: &Bound<'py, PyAny>,
    what: &str,
    accepted: &str,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if ob.is_instance_of::<pyo3::types::PyString>() || ob.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(type_error(ob, what, accepted));
    }
    ob.extract().map_err(|_| type_error(ob, what, accepted))
}

/// A pair of floats such as `betas`: a sequence that is not of numbers is a `TypeError`, one of
/// another length a `ConfigError`, both naming `what`.
pub fn float_pair(ob: &Bound<'_, PyAny>, what: &str) -> PyResult<(f64, f64)> {
    let items = sequence(ob, what, "a pair of floats")?;
    let values = items
        .iter()
        .map(|v| v.extract::<f64>())
        .collect::<PyResult<Vec<f64>>>()
        .map_err(|_| type_error(ob, what, "a pair of floats"))?;
    match values[..] {
        [a, b] => Ok((a, b)),
        _ => Err(Error::Config(format!(
            "{what} must be a pair of floats, got {} values",
            values.len()
        ))
        .into()),
    }
}

/// A list (or other sequence) of ints in the range of `T`, naming `what` in errors.
pub fn int_list<T>(ob: &Bound<'_, PyAny>, what: &str, accepted: &str) -> PyResult<Vec<T>>
where
    T: TryFrom<i128> + num_bounds::Bounds,
{
    sequence(ob, what, accepted)?
        .iter()
        .enumerate()
        .map(|(i, item)| int_in_range(item, &format!("{what}[{i}]")))
        .collect()
}

fn not_an_int(ob: &Bound<'_, PyAny>, what: &str) -> PyErr {
    type_error(ob, what, "an int")
}

fn type_error(ob: &Bound<'_, PyAny>, what: &str, accepted: &str) -> PyErr {
    let got = ob
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!("{what} must be {accepted}, got {got}"))
}

/// The bounds of the integer types used in arguments, for error messages.
pub mod num_bounds {
    pub trait Bounds {
        const MIN_I128: i128;
        const MAX_I128: i128;
    }
    macro_rules! bounds {
        ($($t:ty),*) => {$(
            impl Bounds for $t {
                const MIN_I128: i128 = <$t>::MIN as i128;
                const MAX_I128: i128 = <$t>::MAX as i128;
            }
        )*};
    }
    bounds!(u32, u64, usize, i64);
}

/// A config dict read through the core's serde struct `T` (its keys, defaults and types, so
/// none is restated here); None is `T::default()`. An unknown key, a value of the wrong type or
/// out of range is an [`Error::Config`] naming `what`, the key and its value.
pub fn from_dict<T>(dict: Option<&Bound<'_, PyDict>>, what: &str) -> PyResult<T>
where
    T: DeserializeOwned + Default,
{
    let Some(dict) = dict else {
        return Ok(T::default());
    };
    let mut de = pythonize::Depythonizer::from_object(dict.as_any());
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut at = String::new();
        if let [Segment::Map { key }] = e.path().iter().collect::<Vec<_>>()[..] {
            at = format!("{key}: ");
            if let Some(repr) = dict
                .get_item(key)
                .ok()
                .flatten()
                .and_then(|v| v.repr().ok())
            {
                let repr = repr.to_string();
                let repr = match repr.char_indices().nth(80) {
                    Some((i, _)) => format!("{}...", &repr[..i]),
                    None => repr,
                };
                at = format!("{key} = {repr}: ");
            }
        }
        Error::Config(format!("{what}: {at}{}", e.inner())).into()
    })
}

/// Issues each note of a parsed training config (other tools' key names read as loratch's) as a
/// `UserWarning`, as the CLI prints its `note:` lines.
pub fn warn_config_notes(py: Python<'_>, notes: &[String]) -> PyResult<()> {
    let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
    for note in notes {
        PyErr::warn(
            py,
            &category,
            &std::ffi::CString::new(format!("note: {note}"))?,
            1,
        )?;
    }
    Ok(())
}
