//! Fuzz target: PEFT `adapter_config.json` through its schema (`AdapterConfig`) into a spec, then
//! module selection.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::lora::peft_config::AdapterConfig;
use std::path::Path;

/// The linear layers of a two-layer Llama.
fn paths() -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..2 {
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            v.push(format!("model.layers.{i}.self_attn.{m}"));
        }
        for m in ["gate_proj", "up_proj", "down_proj"] {
            v.push(format!("model.layers.{i}.mlp.{m}"));
        }
    }
    v.push("lm_head".into());
    v
}

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let fallback = vec!["q_proj".to_string(), "v_proj".to_string()];
    let source = Path::new("adapter_config.json");
    let Ok(config) = AdapterConfig::from_json(&cfg, source) else {
        return;
    };
    let Ok(spec) = config.to_spec(fallback, source) else {
        return;
    };
    let Ok(chosen) = spec.select(&paths()) else {
        return;
    };
    for p in &chosen {
        // Every value was checked when the config was read: no error may surface later
        // (where it would not name the file).
        if let Err(e) = spec.config_for(p) {
            panic!("config accepted, but the config of {p} fails: {e}");
        }
    }
});
