//! Fuzz target: a model's `config.json` through `ModelConfig::from_json`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = ModelConfig::from_json(text) {
        // What the model code relies on.
        assert!(c.head_dim > 0 && c.head_dim % 2 == 0);
        assert!(c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0);
    }
});
