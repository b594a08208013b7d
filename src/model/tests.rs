//! Tests of the decoder families across their forward paths: packed rows (per-segment attention
//! and block-diagonal masks) against each example run alone, for models that transformers makes
//! (tests/python/tiny_models.py, whose families' logits the Python tests compare with
//! transformers bit for bit), with sequences longer than the sliding window.
use super::{CausalLm, Checkpoint, LoraMode, ModelConfig, Quantize};
use crate::data::block_diagonal_mask;
use crate::testing::{max_diff, run_py};
use tch::{Device, Kind, Tensor};

const MAKE: &str = r#"
import sys, pathlib
sys.path.insert(0, "tests/python")
from tiny_models import make_model
make_model(sys.argv[1], pathlib.Path(sys.argv[2]), seed=3)
"#;

const PLAIN: LoraMode = LoraMode {
    enabled: true,
    training: false,
};

/// `tiny_models.make_model(family)` saved to a temp dir.
fn model_dir(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_py(MAKE, &[family, dir.path().to_str().unwrap()], "");
    dir
}

fn load(dir: &std::path::Path, kind: Kind) -> CausalLm {
    let config = ModelConfig::from_dir(dir).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    tch::no_grad(|| CausalLm::load(&ck, config, kind, Device::Cpu, Quantize::Stored)).unwrap()
}

/// Hidden states of three examples (two longer than the window of 6) packed in one row, by
/// segments and by a block-diagonal mask, and of each example alone; in `kind`.
fn packed_and_alone(lm: &CausalLm, seqs: &[Vec<i64>]) -> (Tensor, Tensor, Vec<Tensor>) {
    tch::no_grad(|| {
        let flat: Vec<i64> = seqs.concat();
        let ids = Tensor::from_slice(&flat).unsqueeze(0);
        let positions: Vec<i64> = seqs.iter().flat_map(|s| 0..s.len() as i64).collect();
        let positions = Tensor::from_slice(&positions).unsqueeze(0);
        let lengths: Vec<i64> = seqs.iter().map(|s| s.len() as i64).collect();
        let segments = lm
            .hidden_states_segments(&ids, &positions, &lengths, PLAIN)
            .unwrap();
        let seg_ids: Vec<i64> = seqs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| std::iter::repeat_n(i as i64 + 1, s.len()))
            .collect();
        let mask = block_diagonal_mask(&Tensor::from_slice(&seg_ids).unsqueeze(0)).unwrap();
        let masked = lm
            .hidden_states_packed(&ids, &positions, Some(&mask), PLAIN)
            .unwrap();
        let alone = seqs
            .iter()
            .map(|s| {
                lm.hidden_states(&Tensor::from_slice(s).unsqueeze(0), None, None, PLAIN)
                    .unwrap()
            })
            .collect();
        (segments, masked, alone)
    })
}

/// Packed rows equal each example alone to float32 rounding: `|packed32 - alone32|` is at most
/// `|packed32 - packed64| + |alone32 - alone64|` (plus float64's own rounding), the triangle
/// inequality through the float64 runs, which agree with each other to ~1e-15.
#[test]
fn packed_rows_equal_examples_alone_in_every_family() {
    let seqs: Vec<Vec<i64>> = vec![
        (0..9).map(|i| (i * 7 + 3) % 97).collect(),
        vec![5, 60, 2, 91],
        (0..8).map(|i| (i * 13 + 1) % 97).collect(),
    ];
    for family in ["llama", "gemma2", "gemma3", "phi3", "phi3-longrope"] {
        let dir = model_dir(family);
        let (s32, m32, a32) = packed_and_alone(&load(dir.path(), Kind::Float), &seqs);
        let (s64, m64, a64) = packed_and_alone(&load(dir.path(), Kind::Double), &seqs);
        let mut at = 0;
        for (i, s) in seqs.iter().enumerate() {
            let n = s.len() as i64;
            let part = |t: &Tensor| t.narrow(1, at, n).to_kind(Kind::Double);
            let alone_err = max_diff(&a32[i].to_kind(Kind::Double), &a64[i]);
            for (name, p32, p64) in [("segments", &s32, &s64), ("mask", &m32, &m64)] {
                let bound = max_diff(&part(p32), &part(p64)) + alone_err + 1e-12;
                let diff = max_diff(&part(p32), &a32[i].to_kind(Kind::Double));
                assert!(
                    diff <= bound,
                    "{family} {name} example {i}: {diff:.3e} > {bound:.3e}"
                );
                // The float64 runs agree to float64 rounding: the math is the same.
                let exact = max_diff(&part(p64), &a64[i]);
                assert!(
                    exact < 1e-10,
                    "{family} {name} example {i} in f64: {exact:.3e}"
                );
            }
            at += n;
        }
    }
}
