//! Reading and writing files: atomic replacement, safetensors <-> tch tensors, JSON error wording.
pub mod atomic;
pub mod json;
pub mod safetensors;
pub mod torch_pickle;
