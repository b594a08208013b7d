//! What this process's libtorch offers: version, devices, threads.
use serde::Serialize;

/// A snapshot of the runtime, printed by `loratch info`.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeInfo {
    /// loratch's version.
    pub loratch_version: &'static str,
    /// The libtorch version loratch was compiled against.
    pub torch_version: String,
    /// Number of visible CUDA devices (0 without a GPU or driver).
    pub cuda_devices: i64,
    /// Whether cuDNN is available.
    pub cudnn: bool,
    /// Whether Apple's MPS backend is available.
    pub mps: bool,
    /// Intra-op threads libtorch uses on CPU.
    pub threads: i32,
    /// Usable device strings, "cpu" first.
    pub devices: Vec<String>,
}

/// Reads the runtime facts.
pub fn info() -> RuntimeInfo {
    let cuda_devices = tch::Cuda::device_count();
    let mps = tch::utils::has_mps();
    let mut devices = vec!["cpu".to_string()];
    devices.extend((0..cuda_devices).map(|i| format!("cuda:{i}")));
    if mps {
        devices.push("mps".into());
    }
    RuntimeInfo {
        loratch_version: env!("CARGO_PKG_VERSION"),
        torch_version: crate::bridge::torch_version(),
        cuda_devices,
        cudnn: tch::Cuda::cudnn_is_available(),
        mps,
        threads: tch::get_num_threads(),
        devices,
    }
}
