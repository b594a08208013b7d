//! Build script of the fuzz targets: an rpath to the libtorch they link (loratch's own build.rs
//! gives one to its own binaries only; link args do not pass to dependents).
fn main() {
    // torch-sys (links = "tch") exports the libtorch lib dir as DEP_TCH_LIBTORCH_LIB.
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB; is torch==2.11.0 installed?");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
}
