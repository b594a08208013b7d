//! The `torch_hf_*` API's core: models addressed by name (registry), LoRA on a loaded model
//! (loaded), and adapter files in PEFT's format (peft); model ids found in the local Hugging
//! Face cache (hub_cache).
pub mod export;
pub mod generate;
pub mod hub_cache;
pub mod loaded;
pub mod peft;
pub mod registry;
pub mod verify;

pub use loaded::{LoadConfig, LoadOptions, LoadedModel};
