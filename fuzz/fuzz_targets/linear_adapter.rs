//! Fuzz target: single-layer adapter files (`LoraLinear` save format) loaded into a layer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::io::safetensors::MappedSafetensors;
use loratch::lora::file::load_linear_adapter_from;
use loratch::lora::{LoraConfig, LoraLinear};
use std::path::Path;
use tch::{Device, Kind};

fuzz_target!(|data: &[u8]| {
    let Ok(f) = MappedSafetensors::from_bytes(data, Path::new("fuzz.safetensors")) else {
        return;
    };
    // The layer the seeds were written for: 6 -> 5, rank 2, alpha 4.
    let cfg = LoraConfig::new(2, 4.0, 0.0, false).expect("a valid config");
    let mut layer = LoraLinear::new(6, 5, cfg, true, Kind::Float, Device::Cpu).expect("a layer");
    let before = layer.adapter().a.copy();
    if load_linear_adapter_from(&mut layer, &f).is_err() {
        // A failed load changes nothing.
        assert!(layer.adapter().a.equal(&before));
    }
});
