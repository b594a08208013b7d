//! Reading and writing files: atomic replacement and safetensors <-> tch tensors.
pub mod atomic;
pub mod safetensors;
pub mod torch_pickle;
