//! Fuzz target: safetensors files (adapter and model weights) through `MappedSafetensors`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::io::safetensors::MappedSafetensors;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = MappedSafetensors::from_bytes(data, Path::new("fuzz.safetensors")) else {
        return;
    };
    let _ = f.metadata();
    let Ok(names) = f.names() else { return };
    for name in &names {
        if let (Ok(t), Ok(shape)) = (f.tensor(name), f.shape(name)) {
            // A tensor read must have the shape the header declares.
            assert_eq!(t.size(), shape);
        }
        // A zero-copy view reads the mapping: sum it so every byte is touched.
        if let Ok(Some(v)) = f.tensor_view(name) {
            let _ = v
                .f_to_kind(tch::Kind::Double)
                .and_then(|d| d.f_sum(tch::Kind::Double));
        }
    }
});
