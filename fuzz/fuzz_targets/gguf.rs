//! Fuzz target: GGUF files (models) through `GgufFile`: the index, every typed getter, every
//! tensor's bytes and its dequantization.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::gguf::GgufFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data, Path::new("fuzz.gguf")) else {
        return;
    };
    for key in f.metadata().keys() {
        let _ = (f.get_u64(key), f.get_i64(key), f.get_f32(key), f.get_str(key));
        let _ = (f.get_bool(key), f.get_str_array(key), f.get_i32_array(key));
        let _ = f.get_f32_array(key);
    }
    for t in f.tensors() {
        // An opened file's tensors lie inside it with the size their shape and type give.
        let bytes = f.tensor_bytes(&t.name).expect("a listed tensor's bytes");
        assert_eq!(bytes.len() as u64, t.n_bytes());
        let values = f.dequantize(&t.name).expect("a validated tensor dequantizes");
        assert_eq!(values.len() as u64, t.numel());
    }
});
