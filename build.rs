//! Build script: link libtorch so CUDA stays visible, give every artifact an rpath to the torch
//! libraries, and compile the small C++ bridge (csrc/: tensor hand-over, the optimizer's helpers,
//! fused LoRA linear, blocked causal attention, fused RMSNorm, rotary embedding, SwiGLU, GeGLU,
//! cross-entropy, the quantized linear with its AVX2 block kernels and the activation-checkpointing
//! node).
use std::path::PathBuf;

fn main() {
    for file in [
        "csrc/bridge.h",
        "csrc/blas.h",
        "csrc/blas.cpp",
        "csrc/tensor_bridge.cpp",
        "csrc/optim.cpp",
        "csrc/lora_linear.cpp",
        "csrc/causal_attention.cpp",
        "csrc/vectorize.h",
        "csrc/rms_norm.cpp",
        "csrc/rotary.cpp",
        "csrc/swiglu.cpp",
        "csrc/gelu_glu.cpp",
        "csrc/cross_entropy.cpp",
        "csrc/quant_linear.cpp",
        "csrc/quant_simd.h",
        "csrc/quant_simd.cpp",
        "csrc/checkpoint.cpp",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    // torch-sys (links = "tch") exports the libtorch lib dir as DEP_TCH_LIBTORCH_LIB.
    let lib_dir = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB; is torch==2.11.0 installed?"),
    );
    let torch_root = lib_dir
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();

    // Without --no-as-needed the linker drops libtorch_cuda.so (no symbol is referenced
    // directly) and CUDA then looks unavailable at run time.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    for lib in ["torch", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-arg=-l{lib}");
    }
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    // The fused elementwise ops split their loops with at::parallel_for, which libtorch implements
    // inline with `#pragma omp parallel` (compiled with -fopenmp below). They must join libtorch's
    // own OpenMP runtime, the libgomp shipped beside it (libgomp.so.1 in PyPI's torch, a hashed
    // name in some libtorch archives), not a second one.
    let gomp = std::fs::read_dir(&lib_dir)
        .expect("libtorch lib dir is readable")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libgomp") && name.contains(".so"))
        .min()
        .expect("no libgomp*.so* beside libtorch: this libtorch is not built with OpenMP");
    println!("cargo:rustc-link-arg=-l:{gomp}");
    // The binary and tests find libtorch where it was built against; the installed Python
    // extension finds it beside itself in site-packages (and torch is imported first anyway).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    // The binary answers oneMKL's vendor check itself (src/bin/loratch/mkl_dispatch.rs); the
    // dynamic linker binds libtorch's calls to these definitions only if the executable exports them.
    for sym in ["mkl_serv_intel_cpu", "mkl_serv_intel_cpu_true"] {
        println!("cargo:rustc-link-arg-bin=loratch=-Wl,--export-dynamic-symbol={sym}");
    }

    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch_root.join("include"))
        .include(torch_root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-fopenmp")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .file("csrc/tensor_bridge.cpp")
        .file("csrc/optim.cpp")
        .file("csrc/blas.cpp")
        .file("csrc/lora_linear.cpp")
        .file("csrc/causal_attention.cpp")
        .file("csrc/rms_norm.cpp")
        .file("csrc/rotary.cpp")
        .file("csrc/swiglu.cpp")
        .file("csrc/gelu_glu.cpp")
        .file("csrc/cross_entropy.cpp")
        .file("csrc/quant_linear.cpp")
        .file("csrc/quant_simd.cpp")
        .file("csrc/checkpoint.cpp")
        .compile("loratch_bridge");
}
