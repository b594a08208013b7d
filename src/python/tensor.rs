//! `PyTensor`: a `torch.Tensor` argument or return value backed by the same `TensorImpl` as a tch
//! [`Tensor`] (zero-copy; autograd graph, `.grad` and in-place changes are shared).
use super::handover;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use tch::Tensor;

/// A tensor crossing the Python boundary.
pub struct PyTensor(pub Tensor);

/// Whether `ob` is a `torch.Tensor` (or subclass, e.g. `nn.Parameter`).
pub fn is_tensor(ob: &Bound<'_, PyAny>) -> PyResult<bool> {
    let cls = ob.py().import("torch")?.getattr("Tensor")?;
    ob.is_instance(&cls)
}

impl<'py> FromPyObject<'py> for PyTensor {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        if !is_tensor(ob)? {
            let name = ob.get_type().name()?;
            return Err(PyTypeError::new_err(format!(
                "expected a torch.Tensor, got {name}"
            )));
        }
        if ob.getattr("is_meta")?.is_truthy()? {
            return Err(crate::error::Error::Device(
                "a meta-device tensor has no data; move it to a real device (cpu, cuda) first"
                    .into(),
            )
            .into());
        }
        let impl_ptr: usize = ob.getattr("_cdata")?.extract()?;
        // SAFETY: `ob` is a live torch.Tensor for the duration of this call, so its TensorImpl
        // is alive; the new handle takes its own reference.
        unsafe { handover::tensor_from_impl(impl_ptr) }
            .map(PyTensor)
            .ok_or_else(|| PyValueError::new_err("the tensor is undefined"))
    }
}

impl<'py> IntoPyObject<'py> for PyTensor {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let Some(impl_ptr) = handover::tensor_impl(&self.0) else {
            return Ok(py.None().into_bound(py));
        };
        // torch._C._wrap_tensor_impl takes a capsule holding the TensorImpl*, takes its own
        // reference, and returns the tensor's existing Python object when it has one.
        // SAFETY: a capsule without destructor over a pointer kept alive by `self` for this call.
        let capsule = unsafe {
            let raw =
                pyo3::ffi::PyCapsule_New(impl_ptr as *mut std::ffi::c_void, std::ptr::null(), None);
            Bound::from_owned_ptr_or_err(py, raw)?
        };
        let wrapped = py
            .import("torch")?
            .getattr("_C")?
            .call_method1("_wrap_tensor_impl", (capsule,))?;
        drop(self);
        Ok(wrapped)
    }
}
