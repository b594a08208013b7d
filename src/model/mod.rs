//! The decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3) loaded from Hugging Face
//! checkpoints or GGUF files, with LoRA slots on every linear.
pub mod attention;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod llamacpp;
pub mod loader;
pub mod mask;
pub mod mlp;
pub mod norm;
pub mod rope;
#[cfg(test)]
mod tests;
pub mod weights;

pub use cache::KvCache;
pub use config::{Architecture, ModelConfig};
pub use gguf::GgufCheckpoint;
pub use linear::{Linear, LoraMode, Quantize, Weight};
pub use llama::CausalLm;
pub use loader::Loader;
pub use weights::{Checkpoint, WeightSource};
