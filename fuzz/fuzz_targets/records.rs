//! Fuzz target: training records (JSONL or a JSON array) through `parse_records`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::data::parse_records;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_records(text, "fuzz.jsonl");
});
