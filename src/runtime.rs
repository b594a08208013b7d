//! What this process's libtorch offers (version, devices, threads, CPU matmul throughput), its
//! memory use (RSS), and the process-wide allocator setting the `loratch` binary applies.
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::Result;

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
        torch_version: crate::ffi::torch_version(),
        cuda_devices,
        cudnn: tch::Cuda::cudnn_is_available(),
        mps,
        threads: tch::get_num_threads(),
        devices,
    }
}

/// The fp32 matmul throughput of this process on the CPU, in GFLOP/s: the best of `reps` timed
/// `[n, n] x [n, n]` products (after one untimed), at libtorch's current thread count.
pub fn matmul_gflops(n: i64, reps: usize) -> Result<f64> {
    let opts = (Kind::Float, Device::Cpu);
    let a = Tensor::f_randn([n, n], opts)?;
    let b = Tensor::f_randn([n, n], opts)?;
    let _ = a.f_mm(&b)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = std::time::Instant::now();
        let _ = a.f_mm(&b)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// The size of a memory page in bytes, None where the system does not say.
fn page_size() -> Option<u64> {
    #[cfg(unix)]
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(unix))]
    let size = -1;
    u64::try_from(size).ok().filter(|&s| s > 0)
}

/// The resident set size of this process in bytes (Linux), else 0.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .zip(page_size())
        .map_or(0, |(pages, size)| pages * size)
}

/// The peak resident set size of this process in bytes (`VmHWM`, Linux), else 0. Unlike a
/// parent's `ru_maxrss` of the child, it never includes memory of the process that spawned it.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:").map_or(0, |kib| kib * 1024)
}

/// A `kB` field of `/proc/self/status` (Linux).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.
///
/// By default glibc serves every allocation above 32 MiB with a fresh `mmap` and unmaps it on free,
/// so a training step's large temporaries (the output head's `[rows, vocab]` chunk: up to 64 MiB)
/// are page-faulted and zeroed by the kernel again at every step. Raising the mmap threshold to
/// 1 GiB (and the trim threshold above it) keeps them in the heap, where the next step reuses the
/// same pages. Peak memory is unchanged: only memory that was already resident stays resident.
///
/// Process-wide, so only the `loratch` binary calls it (never the Python extension, which lives in
/// the user's process). A no-op where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 30);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_throughput_is_positive_and_finite() {
        let g = matmul_gflops(64, 3).unwrap();
        assert!(g.is_finite() && g > 0.0, "{g}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn rss_counts_pages_of_the_real_size() {
        // statm counts pages, status counts kB: they agree only with the right page size.
        let pages = rss_bytes();
        let kib = status_kib("VmRSS:").unwrap() * 1024;
        let peak = peak_rss_bytes();
        assert!(pages > 0 && peak >= pages.min(kib), "{pages} {kib} {peak}");
        let diff = pages.abs_diff(kib);
        assert!(diff <= kib / 10, "statm {pages} B vs status {kib} B");
    }
}
