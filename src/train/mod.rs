//! The training core: the AdamW optimizer and learning-rate schedules.
pub mod optim;
pub mod schedule;
