//! NF4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
//! Quantized LLMs"), in loratch's own block layout (no GGML type has it).
//!
//! A block is 64 elements: the f32 absmax (little-endian), then 32 bytes of 4-bit indices into
//! [`NF4_CODE`], element `2i` in the high nibble of byte `i` and element `2i + 1` in its low nibble
//! (bitsandbytes' packing). Quantization follows bitsandbytes 0.50's CPU `quantize_4bit`
//! (`blocksize=64`): `s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)` in float32, and the index
//! is the number of midpoints between neighbouring codes (float32 `(c[i] + c[i+1]) / 2`) that are
//! strictly below `s` (torch's `bucketize`), so a value exactly on a midpoint takes the lower code.
//! An all-zero block stores absmax 0 and the zero code. Dequantization is `NF4_CODE[q] * absmax`.

/// Elements per NF4 block.
pub(super) const BLOCK: usize = 64;

/// The 16 NF4 values (bitsandbytes' table, ascending): quantiles of N(0, 1) scaled to [-1, 1]
/// with an exact zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The midpoints between neighbouring codes, rounded to f32 as bitsandbytes computes them.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// Encodes finite `src` (a whole number of blocks) into `out` (its exact byte size).
pub(super) fn quantize(src: &[f32], out: &mut [u8]) {
    let mid = midpoints();
    for (x, o) in src
        .chunks_exact(BLOCK)
        .zip(out.chunks_exact_mut(4 + BLOCK / 2))
    {
        let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / absmax.max(1e-38);
        o[..4].copy_from_slice(&absmax.to_le_bytes());
        for (pair, byte) in x.chunks_exact(2).zip(&mut o[4..]) {
            let code = |v: f32| {
                let s = (v * inv).clamp(-1.0, 1.0);
                mid.iter().map(|&m| u8::from(m < s)).sum::<u8>()
            };
            *byte = (code(pair[0]) << 4) | code(pair[1]);
        }
    }
}

/// Decodes one block.
pub(super) fn dequantize_block(b: &[u8; 4 + BLOCK / 2], out: &mut [f32; BLOCK]) {
    let absmax = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (pair, &q) in out.chunks_exact_mut(2).zip(&b[4..]) {
        pair[0] = NF4_CODE[(q >> 4) as usize] * absmax;
        pair[1] = NF4_CODE[(q & 0x0f) as usize] * absmax;
    }
}
