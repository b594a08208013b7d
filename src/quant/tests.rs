//! Tests of the quantization formats against gguf-py 0.19 (the test Python, `LORATCH_TEST_PYTHON`,
//! must import `gguf` and numpy): dequantization of random blocks of every GGML type and
//! quantization to Q8_0/Q4_0/F16/BF16 compared bit for bit; NF4 against bitsandbytes when it
//! imports (from `LORATCH_TEST_BNB_PATH`, default /tmp/bnb) and always against a numpy reference
//! of its definition; round-trip bounds; the typed errors.
use super::*;
use crate::testing::run_py;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;

/// Byte offsets of a block's f16 scales, forced finite in the random blocks (a NaN or infinite
/// scale would only test NaN propagation through numpy's SIMD loops).
fn scale_offsets(ty: QType) -> &'static [usize] {
    match ty {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
        QType::Q2K => &[80, 82],
        QType::Q3K => &[108],
        QType::Q6K => &[208],
        _ => &[],
    }
}

/// A random finite f16 (bits) with a magnitude between 2^-24 (subnormal) and 2^15.
fn finite_f16(rng: &mut StdRng) -> u16 {
    loop {
        let h: u16 = rng.gen();
        if (h >> 10) & 0x1f != 0x1f {
            return h;
        }
    }
}

/// `n_blocks` random blocks of `ty` with finite scales.
pub(crate) fn random_blocks(ty: QType, n_blocks: usize, rng: &mut StdRng) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut bytes: Vec<u8> = (0..n_blocks * bb).map(|_| rng.gen()).collect();
    for block in bytes.chunks_exact_mut(bb) {
        for &o in scale_offsets(ty) {
            block[o..o + 2].copy_from_slice(&finite_f16(rng).to_le_bytes());
        }
    }
    bytes
}

/// gguf-py's name of a GGML type ("Q4_K", "BF16").
fn py_name(ty: QType) -> String {
    ty.name().to_uppercase()
}

const PY_DEQUANT: &str = r#"
import sys, numpy as np
from gguf import GGMLQuantizationType as T, quants
name, src, dst, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = np.fromfile(src, dtype=np.uint8).reshape(4, -1)
out = quants.dequantize(data, T[name]).astype(np.float32, copy=False)
assert out.size == n, (out.shape, n)
out.tofile(dst)
"#;

const PY_QUANT: &str = r#"
import sys, numpy as np
from gguf import GGMLQuantizationType as T, quants
name, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.fromfile(src, dtype=np.float32).reshape(4, -1)
with np.errstate(all="ignore"):
    q = quants.quantize(x, T[name])
np.ascontiguousarray(q).view(np.uint8).tofile(dst)
"#;

fn read_f32s(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// First index where two f32 slices differ in their bits, with both values.
fn first_bit_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, a[i], b[i]))
}

#[test]
fn dequantize_equals_gguf_py_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    for ty in ALL_QTYPES.into_iter().filter(|t| *t != QType::Nf4) {
        // 4 rows of 24 blocks (plus odd element counts for the float types).
        let n_blocks = 4 * 24;
        let src = random_blocks(ty, n_blocks, &mut rng);
        let n = n_blocks * ty.block_elems();
        let mut ours = vec![0f32; n];
        dequantize(ty, &src, &mut ours).unwrap();
        let (i, o) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::write(&i, &src).unwrap();
        let args = [&py_name(ty), i.to_str().unwrap(), o.to_str().unwrap()];
        run_py(PY_DEQUANT, &[args[0], args[1], args[2], &n.to_string()], "");
        let theirs = read_f32s(&o);
        if let Some((k, a, b)) = first_bit_difference(&ours, &theirs) {
            panic!(
                "{ty}: element {k}: ours {a:e} ({:#x}), gguf-py {b:e} ({:#x})",
                a.to_bits(),
                b.to_bits()
            );
        }
    }
}

/// Normal-ish values with outliers, zero blocks, sign ties and values on rounding boundaries.
fn awkward_values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let v: f32 = rng.gen_range(-1.0..1.0) * rng.gen_range(0.0f32..1.0).powi(3);
            if rng.gen_ratio(1, 50) {
                v * 1e4
            } else {
                v
            }
        })
        .collect();
    x[..32].fill(0.0);
    x[32..64].fill(-0.0);
    // A block whose largest magnitude occurs with both signs (Q4_0 takes the first).
    x[64] = -3.0;
    x[70] = 3.0;
    // Multiples of d/2 for d = 127 / 127: on the round-half-away boundaries of Q8_0.
    for (k, v) in x[96..128].iter_mut().enumerate() {
        *v = (k as f32 - 16.0) + 0.5;
    }
    x[127] = 127.0;
    // Tiny values: subnormal f16 scales.
    for v in &mut x[128..160] {
        *v *= 1e-6;
    }
    x
}

#[test]
fn quantize_equals_gguf_py_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut x = awkward_values(&mut rng, 4 * 32 * 40);
    // The float formats: specials and values halfway between representable ones.
    let specials = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc1_2345),
        65504.0,
        65520.0,
        65519.99,
        1e-8,
        -3e-5,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x7f7f_ffff),
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
    ];
    let mut floats = x.clone();
    floats[200..200 + specials.len()].copy_from_slice(&specials);
    for ty in [
        QType::Q8_0,
        QType::Q4_0,
        QType::F16,
        QType::BF16,
        QType::F32,
    ] {
        let input = if ty.block_elems() == 1 { &floats } else { &x };
        let ours = quantize(ty, input).unwrap();
        let (i, o) = (dir.path().join("in"), dir.path().join("out"));
        let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&i, bytes).unwrap();
        run_py(
            PY_QUANT,
            &[&py_name(ty), i.to_str().unwrap(), o.to_str().unwrap()],
            "",
        );
        let theirs = std::fs::read(&o).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ty}");
        if let Some(k) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            let bb = ty.block_bytes();
            panic!(
                "{ty}: byte {k} (block {}): ours {:?}, gguf-py {:?}",
                k / bb,
                &ours[k / bb * bb..][..bb],
                &theirs[k / bb * bb..][..bb]
            );
        }
    }
    x[5] = f32::NAN;
    assert!(matches!(
        quantize(QType::Q8_0, &x),
        Err(Error::NonFinite(_))
    ));
}

/// bitsandbytes' CPU NF4 when it imports (a `bitsandbytes` package under LORATCH_TEST_BNB_PATH,
/// default /tmp/bnb: `pip install --no-deps --target /tmp/bnb bitsandbytes`), and always a numpy
/// transcription of the definition in `nf4.rs`. Prints packed codes, absmax, dequantized values
/// of both as hex u8/f32 arrays, one JSON object per line.
const PY_NF4: &str = r#"
import sys, os, json, numpy as np
src = sys.argv[1]
x = np.fromfile(src, dtype=np.float32)
code = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534,
    0.16093020141124725, 0.24611230194568634, 0.33791524171829224, 0.44070982933044434,
    0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
mid = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
b = x.reshape(-1, 64)
absmax = np.abs(b).max(axis=1)
s = np.clip(b * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None], -1, 1).reshape(-1)
q = (s[:, None] > mid[None, :]).sum(axis=1).astype(np.uint8)
packed = (q[::2] << 4) | q[1::2]
deq = (code[q].reshape(-1, 64) * absmax[:, None]).astype(np.float32)
print(json.dumps({"who": "numpy", "packed": packed.tobytes().hex(), "absmax": absmax.astype(np.float32).tobytes().hex(), "deq": deq.tobytes().hex()}))
sys.path.insert(0, os.environ.get("LORATCH_TEST_BNB_PATH", "/tmp/bnb"))
try:
    import torch, bitsandbytes.functional as F
except Exception as e:
    print(json.dumps({"who": "skip", "why": repr(e)}))
    sys.exit(0)
t = torch.from_numpy(x.copy())
packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
deq = F.dequantize_4bit(packed, state, quant_type="nf4", blocksize=64).float()
print(json.dumps({"who": "bitsandbytes", "packed": packed.numpy().tobytes().hex(), "absmax": state.absmax.float().numpy().tobytes().hex(), "deq": deq.numpy().tobytes().hex()}))
"#;

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn nf4_equals_its_reference_and_bitsandbytes() {
    let mut rng = StdRng::seed_from_u64(4);
    let mut x = awkward_values(&mut rng, 64 * 64);
    // Values exactly on midpoints between codes (absmax 1): a tie takes the lower code.
    let mid: Vec<f32> = (0..15)
        .map(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
        .collect();
    x[192..256].fill(0.0);
    x[192..192 + 15].copy_from_slice(&mid);
    x[192 + 15] = 1.0;
    let q = quantize(QType::Nf4, &x).unwrap();
    let mut deq = vec![0f32; x.len()];
    dequantize(QType::Nf4, &q, &mut deq).unwrap();
    assert_eq!(q[3 * 36 + 4] >> 4, 0, "midpoint -> lower code");
    let dir = tempfile::tempdir().unwrap();
    let i = dir.path().join("x");
    std::fs::write(
        &i,
        x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = run_py(PY_NF4, &[i.to_str().unwrap()], "");
    let ours_packed: Vec<u8> = q.chunks_exact(36).flat_map(|b| b[4..].to_vec()).collect();
    let ours_absmax: Vec<u8> = q.chunks_exact(36).flat_map(|b| b[..4].to_vec()).collect();
    let ours_deq: Vec<u8> = deq.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut compared = Vec::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let who = v["who"].as_str().unwrap().to_string();
        if who == "skip" {
            eprintln!(
                "bitsandbytes not importable, compared with the numpy reference only: {}",
                v["why"]
            );
            continue;
        }
        assert_eq!(
            hex_bytes(v["absmax"].as_str().unwrap()),
            ours_absmax,
            "{who}: absmax"
        );
        assert_eq!(
            hex_bytes(v["packed"].as_str().unwrap()),
            ours_packed,
            "{who}: codes"
        );
        assert_eq!(
            hex_bytes(v["deq"].as_str().unwrap()),
            ours_deq,
            "{who}: values"
        );
        compared.push(who);
    }
    eprintln!("NF4 compared with: {compared:?}");
    assert!(compared.contains(&"numpy".to_string()));
}

#[test]
fn nf4_code_book_is_bitsandbytes() {
    // The f32 bits of bitsandbytes' table (torch.float32 of its Python floats).
    let bits = [
        0xbf800000u32,
        0xbf3239b1,
        0xbf066b30,
        0xbeca32a0,
        0xbe91a24d,
        0xbe3d353f,
        0xbdba7871,
        0,
        0x3da2faff,
        0x3e24cae3,
        0x3e7c04dd,
        0x3ead033a,
        0x3ee1a4b8,
        0x3f1007ab,
        0x3f3913b3,
        0x3f800000,
    ];
    assert_eq!(NF4_CODE.map(f32::to_bits), bits);
}

#[test]
fn wrong_sizes_and_types_are_typed_errors() {
    let mut out = vec![0f32; 256];
    for ty in ALL_QTYPES {
        let n = ty.row_bytes(256).unwrap();
        let src = vec![0u8; n + 1];
        assert!(
            matches!(dequantize(ty, &src, &mut out), Err(Error::Shape(_))),
            "{ty}"
        );
        assert!(
            matches!(
                dequantize(ty, &src[..n - 1], &mut out),
                Err(Error::Shape(_))
            ),
            "{ty}"
        );
        dequantize(ty, &src[..n], &mut out).unwrap();
    }
    let mut odd = vec![0f32; 33];
    assert!(matches!(
        dequantize(QType::Q8_0, &[0; 34], &mut odd),
        Err(Error::Shape(_))
    ));
    assert!(matches!(QType::Q4K.row_bytes(100), Err(Error::Shape(_))));
    assert!(matches!(
        QType::F32.row_bytes(usize::MAX),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        quantize(QType::Q8_0, &[0.0; 31]),
        Err(Error::Shape(_))
    ));
    let e = quantize(QType::Q4K, &[0.0; 256]).unwrap_err();
    assert!(matches!(&e, Error::Config(m) if m.contains("q4_k")), "{e}");
}

#[test]
fn ids_names_and_sizes() {
    for ty in ALL_QTYPES {
        if let Some(id) = ty.ggml_id() {
            assert_eq!(QType::from_ggml(id), Some(ty));
        }
        assert_eq!(QType::from_name(&ty.name().to_uppercase()), Some(ty));
        assert_eq!(ty.row_bytes(0).unwrap(), 0);
    }
    assert_eq!(QType::Nf4.ggml_id(), None);
    assert_eq!(QType::from_ggml(9), None, "Q8_1");
    assert_eq!(QType::from_ggml(u32::MAX), None);
    assert_eq!(QType::Q6K.row_bytes(512).unwrap(), 420);
    assert_eq!(QType::Nf4.row_bytes(128).unwrap(), 72);
}

#[test]
fn f16_conversion_is_exact_for_every_half() {
    for h in 0..=u16::MAX {
        let ours = f16_to_f32(h);
        let reference = half::f16::from_bits(h).to_f32();
        if reference.is_nan() {
            assert!(ours.is_nan() && ours.is_sign_negative() == reference.is_sign_negative());
            assert_eq!(
                ours.to_bits() & 0x003f_ffff,
                ((h as u32) & 0x1ff) << 13,
                "{h:#x}"
            );
        } else {
            assert_eq!(ours.to_bits(), reference.to_bits(), "{h:#x}");
        }
    }
}

/// Output throughput of each kernel (`cargo test --release --lib quant::tests::throughput --
/// --ignored --nocapture`).
#[test]
#[ignore]
fn throughput() {
    let mut rng = StdRng::seed_from_u64(1);
    let n = 1 << 22;
    let mut out = vec![0f32; n];
    for ty in ALL_QTYPES {
        let src = random_blocks(ty, n / ty.block_elems(), &mut rng);
        let t = std::time::Instant::now();
        for _ in 0..10 {
            dequantize(ty, &src, &mut out).unwrap();
        }
        let gbs = 10.0 * (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9;
        eprintln!("{ty}: {gbs:.2} GB/s of f32 output");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_bytes_dequantize_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        for ty in ALL_QTYPES {
            let n_blocks = bytes.len() / ty.block_bytes();
            let mut out = vec![0f32; n_blocks * ty.block_elems()];
            dequantize(ty, &bytes[..n_blocks * ty.block_bytes()], &mut out).unwrap();
        }
    }

    #[test]
    fn round_trips_stay_within_their_bounds(
        x in proptest::collection::vec(-1000f32..1000.0, 64..=64),
        scale in 0.01f32..100.0,
    ) {
        let x: Vec<f32> = x.iter().map(|v| v * scale / 1000.0).collect();
        let max_gap = NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
        for (ty, halfstep) in [(QType::Q8_0, 0.5 / 127.0), (QType::Q4_0, 0.5 / 8.0), (QType::Nf4, 0.5)] {
            let q = quantize(ty, &x).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize(ty, &q, &mut y).unwrap();
            let be = ty.block_elems();
            for (xb, yb) in x.chunks(be).zip(y.chunks(be)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Q8_0/Q4_0: half a step plus the f16 rounding of the scale (2^-11 relative, times
                // the largest code); Q4_0 may clip the far end to code 15 (a full step off).
                // NF4: half the widest gap between codes (-1 to -0.696) of absmax.
                let bound = match ty {
                    QType::Q8_0 => amax * (halfstep + 127.0 / 127.0 / 2048.0) * 1.0001,
                    QType::Q4_0 => amax * (2.0 * halfstep + 8.0 / 8.0 / 2048.0) * 1.0001,
                    _ => amax * max_gap * halfstep * 1.0001,
                };
                for (a, b) in xb.iter().zip(yb) {
                    prop_assert!((a - b).abs() <= bound, "{}: {} -> {} (bound {})", ty, a, b, bound);
                }
            }
        }
    }
}
