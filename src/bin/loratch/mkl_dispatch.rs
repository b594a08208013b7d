//! Which GEMM kernels libtorch's oneMKL runs on AMD (and other non-Intel) x86 processors.
//!
//! libtorch links oneMKL statically and exports its internal symbols. oneMKL picks its AVX2/AVX-512
//! code paths only after `mkl_serv_intel_cpu()` and `mkl_serv_intel_cpu_true()` say the processor
//! is Intel's; on any other vendor it falls back to a generic path (`MKL_VERBOSE` prints "Intel(R)
//! Architecture processors" instead of "... AVX2 enabled processors"), which on this project's
//! AMD EPYC machines makes a training step about 20% slower (alternated A/B of `loratch train`).
//!
//! The executable defines both functions and exports them (see `build.rs`), so the dynamic linker
//! binds libtorch's calls to these definitions. When the CPU has AVX2 and FMA they answer "yes"
//! and oneMKL then chooses among its kernels by the CPU's feature flags, as it does on Intel
//! processors. Otherwise, or with `LORATCH_MKL_DISPATCH=mkl`, they forward to oneMKL's own answer.
//!
//! Binary only: the Python extension lives in the user's process and changes nothing there.
use std::ffi::{c_int, CStr};
use std::sync::OnceLock;

/// The environment variable that turns the override off (`mkl`) or on (`auto`, the default).
pub const ENV: &str = "LORATCH_MKL_DISPATCH";

/// Whether this process overrides oneMKL's vendor check (decided once, on first use).
pub fn forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| {
        let wanted = std::env::var(ENV).map_or(true, |v| v != "mkl");
        wanted && cpu_has_avx2_fma()
    })
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What `loratch info` reports.
pub fn describe() -> &'static str {
    if forced() {
        "oneMKL picks kernels by CPU features (AVX2/AVX-512), whatever the vendor"
    } else {
        "oneMKL's own choice"
    }
}

/// The answer to oneMKL's check `name`: "yes" when [`forced`], else oneMKL's own answer (the next
/// definition of `name`, inside libtorch), or 0 without one.
fn vendor_check(name: &CStr) -> c_int {
    if forced() {
        return 1;
    }
    // SAFETY: dlsym only looks a symbol up; RTLD_NEXT searches the objects loaded after this
    // executable, i.e. libtorch's own definition of the same `int (void)` function.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if f.is_null() {
        return 0;
    }
    // SAFETY: both symbols are oneMKL service functions taking nothing and returning an int.
    let f: extern "C" fn() -> c_int = unsafe { std::mem::transmute(f) };
    f()
}

/// oneMKL's "is this an Intel processor" check (one of two).
#[no_mangle]
pub extern "C" fn mkl_serv_intel_cpu() -> c_int {
    vendor_check(c"mkl_serv_intel_cpu")
}

/// oneMKL's "is this an Intel processor" check (the other).
#[no_mangle]
pub extern "C" fn mkl_serv_intel_cpu_true() -> c_int {
    vendor_check(c"mkl_serv_intel_cpu_true")
}
