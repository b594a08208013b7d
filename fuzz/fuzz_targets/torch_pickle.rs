//! Fuzz target: `torch.save` zip files (legacy `.pt`/`.bin` adapters) through the pickle reader.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loratch::io::torch_pickle::parse_state_dict;
use std::path::Path;

/// Views with more elements than this are not materialised (a stride-0 view of one element may
/// legally describe a huge tensor; allocating it is not what this target tests).
const MAX_NUMEL: i64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = parse_state_dict(data, Path::new("fuzz.pt")) else {
        return;
    };
    for (_, t) in tensors {
        let numel = t.size().iter().try_fold(1i64, |a, &d| a.checked_mul(d));
        if numel.is_some_and(|n| n <= MAX_NUMEL) {
            // Reads every element of the view: it must lie inside its storage.
            let c = t.f_contiguous().expect("a checked view is readable");
            assert_eq!(c.size(), t.size());
        }
    }
});
