//! The training core: the AdamW optimizer, learning-rate schedules, the chunked causal-LM loss,
//! the trainer loop with its configuration, checkpoints, output-directory lock and metrics log,
//! the loss-curve plot and TensorBoard event files.
pub mod checkpoint;
pub mod config;
pub mod lock;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{train, Hooks, NoHooks, Outcome};
