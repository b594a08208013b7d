//! Quantization to the float formats, Q8_0 and Q4_0, transcribing gguf-py's `quantize` (gguf
//! 0.19): the same float32 operations in the same order, so the bytes are equal.
//! The callers give whole blocks of finite values (block formats) and an `out` of the exact size.
use half::f16;

/// Little-endian f32s.
pub(super) fn f32s(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

/// numpy's `astype(np.float16)`: round to nearest even, overflow to ±inf, subnormals kept.
pub(super) fn f16s(src: &[f32], out: &mut [u8]) {
    for (&x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_f16(x).to_le_bytes());
    }
}

/// An f32 as the bits of the nearest f16 (ties to even), as numpy rounds it. A NaN keeps its sign
/// and the top 10 bits of its payload, quiet or not (a payload that would vanish becomes 1), as
/// numpy's `npy_floatbits_to_halfbits` does; `half` would make it quiet.
pub(super) fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        let n = x.to_bits();
        let sign = ((n >> 16) & 0x8000) as u16;
        let h = 0x7c00 + ((n & 0x007f_ffff) >> 13) as u16;
        return sign | if h == 0x7c00 { h + 1 } else { h };
    }
    f16::from_f32(x).to_bits()
}

/// gguf-py's `BF16.quantize_blocks` (ggml's `ggml_compute_fp32_to_bf16`): NaN forced quiet,
/// otherwise round to nearest even on the upper 16 bits.
pub(super) fn bf16s(src: &[f32], out: &mut [u8]) {
    for (&x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        let n = x.to_bits();
        let b = if n & 0x7fff_ffff > 0x7f80_0000 {
            ((n & 0xffff_0000) | (64 << 16)) >> 16
        } else {
            ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u32
        };
        o.copy_from_slice(&(b as u16).to_le_bytes());
    }
}

/// gguf-py's `np_roundf`: round half away from zero, computed as `floor(a) + floor(2(a - floor(a)))`.
#[inline(always)]
fn roundf(n: f32) -> f32 {
    let a = n.abs();
    let fl = a.floor();
    let b = fl + (2.0 * (a - fl)).floor();
    if n < 0.0 {
        -b
    } else {
        b
    }
}

/// The reciprocal of a block scale, 0 for a zero scale (gguf-py's `np.where(d == 0, 0, 1 / d)`).
#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// Q8_0: `d = max|x| / 127` (stored as f16), codes `roundf(x / d)` computed with the f32 `d`.
pub(super) fn q8_0(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse(d);
        o[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        for (q, &v) in o[2..].iter_mut().zip(x) {
            *q = roundf(v * id) as i8 as u8;
        }
    }
}

/// Q4_0: the element of largest magnitude (the first one on ties) sets `d = max / -8`; codes
/// `trunc(x / d + 8.5)` clipped to 0..=15, element `i` in the low nibble of byte `i` and element
/// `i + 16` in its high nibble.
pub(super) fn q4_0(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.chunks_exact(32).zip(out.chunks_exact_mut(18)) {
        // Starting from x[0] keeps its sign when every element is zero, as numpy's argmax does.
        let mut max = x[0];
        for &v in &x[1..] {
            if v.abs() > max.abs() {
                max = v;
            }
        }
        let d = max / -8.0;
        let id = inverse(d);
        o[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
        let code = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
        for (i, q) in o[2..].iter_mut().enumerate() {
            *q = code(x[i]) | (code(x[i + 16]) << 4);
        }
    }
}
