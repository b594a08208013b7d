//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with the
//! conventions of Hugging Face PEFT: `y = base(x) + scaling * B(A(dropout(x)))`.
pub mod adapter;
pub mod config;
pub mod coverage;
pub mod file;
pub mod linear;
pub mod peft_config;
pub mod peft_keys;
pub mod spec;
pub mod targets;

pub use adapter::Adapter;
pub use config::LoraConfig;
pub use linear::LoraLinear;
pub use spec::LoraSpec;
