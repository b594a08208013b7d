//! The zero-copy hand-over between Python's `torch.Tensor` and a tch [`Tensor`]
//! (csrc/tensor_bridge.cpp): Python exposes a tensor's `c10::TensorImpl*` as `tensor._cdata`, tch
//! holds an `at::Tensor*`; these convert between the two, so both sides share one tensor.
use std::ffi::c_void;
use tch::Tensor;

extern "C" {
    fn loratch_tensor_from_impl(tensor_impl: *mut c_void) -> *mut c_void;
    fn loratch_tensor_impl(tensor: *const c_void) -> *mut c_void;
}

/// A new [`Tensor`] handle on the tensor whose `TensorImpl*` is `tensor_impl`, or `None` for null.
///
/// # Safety
/// `tensor_impl` must point to a live `c10::TensorImpl` (e.g. `_cdata` of a live `torch.Tensor`,
/// read while that object is alive). The returned handle holds its own reference.
pub unsafe fn tensor_from_impl(tensor_impl: usize) -> Option<Tensor> {
    let ptr = loratch_tensor_from_impl(tensor_impl as *mut c_void);
    if ptr.is_null() {
        None
    } else {
        Some(Tensor::from_ptr(ptr.cast()))
    }
}

/// The `TensorImpl*` of `tensor` as an integer (borrowed: valid while `tensor` lives), or `None`
/// for an undefined tensor.
pub fn tensor_impl(tensor: &Tensor) -> Option<usize> {
    // SAFETY: `as_ptr` is a valid at::Tensor* for the lifetime of `tensor`.
    let ptr = unsafe { loratch_tensor_impl(tensor.as_ptr().cast()) };
    (!ptr.is_null()).then_some(ptr as usize)
}
