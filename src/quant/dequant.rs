//! The dequantization kernels, one per type, each a transcription of gguf-py's numpy
//! `dequantize_blocks` (gguf 0.19, `gguf/quants.py`): the same float32 products and sums in the
//! same order (Rust never fuses `a * b + c` into an FMA), so the outputs are equal bit for bit.
//! Each kernel decodes one block from a fixed-size array into a fixed-size array; the group loops
//! keep one scale per inner loop so the compiler vectorizes them.
use super::{f16_to_f32, nf4, QType, QK_K};

/// Decodes whole blocks; the caller has checked that `src` and `dst` hold the same number of them.
pub(super) fn dequantize_unchecked(ty: QType, src: &[u8], dst: &mut [f32]) {
    match ty {
        QType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QType::F16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        QType::BF16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        QType::Q4_0 => blocks(src, dst, q4_0),
        QType::Q4_1 => blocks(src, dst, q4_1),
        QType::Q5_0 => blocks(src, dst, q5_0),
        QType::Q5_1 => blocks(src, dst, q5_1),
        QType::Q8_0 => blocks(src, dst, q8_0),
        QType::Q2K => blocks(src, dst, q2_k),
        QType::Q3K => blocks(src, dst, q3_k),
        QType::Q4K => blocks(src, dst, q4_k),
        QType::Q5K => blocks(src, dst, q5_k),
        QType::Q6K => blocks(src, dst, q6_k),
        QType::Nf4 => blocks(src, dst, nf4::dequantize_block),
    }
}

/// Applies `f` to each `B`-byte block of `src` and its `E` elements of `dst`.
#[inline(always)]
fn blocks<const B: usize, const E: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; E]),
) {
    for (s, d) in src.chunks_exact(B).zip(dst.chunks_exact_mut(E)) {
        // Both conversions succeed (the chunks have exactly these lengths); written this way the
        // compiler knows the array bounds and drops every index check inside `f`.
        if let (Ok(s), Ok(d)) = (s.try_into(), d.try_into()) {
            f(s, d);
        }
    }
}

/// The f16 at byte `i` of a block, as f32.
#[inline(always)]
fn half(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// `d * (q - 8)` with q the low nibbles (elements 0..16) then the high nibbles (16..32).
fn q4_0(b: &[u8; 18], out: &mut [f32; 32]) {
    let d = half(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
        *l = d * ((q & 0x0f) as i8 - 8) as f32;
        *h = d * ((q >> 4) as i8 - 8) as f32;
    }
}

/// `d * q + m`, nibbles as Q4_0.
fn q4_1(b: &[u8; 20], out: &mut [f32; 32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
        *l = d * (q & 0x0f) as f32 + m;
        *h = d * (q >> 4) as f32 + m;
    }
}

/// Element `i`'s fifth bit is bit `i` of the little-endian u32 `qh`.
fn q5_0(b: &[u8; 22], out: &mut [f32; 32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (i, o) in out.iter_mut().enumerate() {
        let ql = (b[6 + (i & 15)] >> (4 * (i >> 4))) & 0x0f;
        let q = ql | ((((qh >> i) & 1) as u8) << 4);
        *o = d * (q as i8 - 16) as f32;
    }
}

fn q5_1(b: &[u8; 24], out: &mut [f32; 32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (i, o) in out.iter_mut().enumerate() {
        let ql = (b[8 + (i & 15)] >> (4 * (i >> 4))) & 0x0f;
        let q = ql | ((((qh >> i) & 1) as u8) << 4);
        *o = d * q as f32 + m;
    }
}

fn q8_0(b: &[u8; 34], out: &mut [f32; 32]) {
    let d = half(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..]) {
        *o = q as i8 as f32 * d;
    }
}

/// Layout: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit codes, d, dmin.
/// Element `128h + 32j + l` is bits `2j..2j+2` of code byte `32h + l`; 16 elements per scale.
fn q2_k(b: &[u8; 84], out: &mut [f32; QK_K]) {
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (g, o) in out.chunks_exact_mut(16).enumerate() {
        let sc = b[g];
        let dl = d * (sc & 0x0f) as f32;
        let ml = dmin * (sc >> 4) as f32;
        let (h, j, l0) = (g / 8, (g / 2) % 4, (g % 2) * 16);
        let qs = &b[16 + 32 * h + l0..16 + 32 * h + l0 + 16];
        for (o, &q) in o.iter_mut().zip(qs) {
            *o = dl * ((q >> (2 * j)) & 3) as f32 - ml;
        }
    }
}

/// Layout: 32 bytes of high-bit mask, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, d.
/// Element `e = 128h + 32j + l` takes its low bits as Q2_K and bit `e / 32` of mask byte `l`,
/// which when *clear* subtracts 4.
fn q3_k(b: &[u8; 110], out: &mut [f32; QK_K]) {
    let d = half(b, 108);
    let sc = &b[96..108];
    for (g, o) in out.chunks_exact_mut(16).enumerate() {
        let low = (sc[g % 8] >> (4 * (g / 8))) & 0x0f;
        let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        let dl = d * ((low | (high << 4)) as i8 - 32) as f32;
        let (h, j, l0) = (g / 8, (g / 2) % 4, (g % 2) * 16);
        let qs = &b[32 + 32 * h + l0..32 + 32 * h + l0 + 16];
        let hm = &b[l0..l0 + 16];
        let bit = g / 2;
        for ((o, &q), &m) in o.iter_mut().zip(qs).zip(hm) {
            let ql = ((q >> (2 * j)) & 3) as i8;
            let qh = (((m >> bit) & 1) ^ 1) as i8;
            *o = dl * (ql - (qh << 2)) as f32;
        }
    }
}

/// The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K block's 12 scale bytes (gguf-py's
/// `Q4_K.get_scale_min`).
#[inline(always)]
fn scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for i in 0..4 {
        sc[i] = s[i] & 0x3f;
        mn[i] = s[4 + i] & 0x3f;
        sc[4 + i] = (s[8 + i] & 0x0f) | ((s[i] >> 2) & 0x30);
        mn[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Layout: d, dmin, 12 scale bytes, 128 bytes of nibbles. Sub-block `2c + s` (32 elements) is
/// nibble `s` of code bytes `32c..32c+32`.
fn q4_k(b: &[u8; 144], out: &mut [f32; QK_K]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (sc, mn) = scale_min(&b[4..16]);
    for (g, o) in out.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[g] as f32;
        let ml = dmin * mn[g] as f32;
        let qs = &b[16 + 32 * (g / 2)..16 + 32 * (g / 2) + 32];
        let shift = 4 * (g % 2);
        for (o, &q) in o.iter_mut().zip(qs) {
            *o = dl * ((q >> shift) & 0x0f) as f32 - ml;
        }
    }
}

/// Q4_K plus 32 bytes of fifth bits (after the scales): sub-block `g` takes bit `g` of byte `l`.
fn q5_k(b: &[u8; 176], out: &mut [f32; QK_K]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (sc, mn) = scale_min(&b[4..16]);
    let qh = &b[16..48];
    for (g, o) in out.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[g] as f32;
        let ml = dmin * mn[g] as f32;
        let qs = &b[48 + 32 * (g / 2)..48 + 32 * (g / 2) + 32];
        let shift = 4 * (g % 2);
        for ((o, &q), &h) in o.iter_mut().zip(qs).zip(qh) {
            let q = ((q >> shift) & 0x0f) | (((h >> g) & 1) << 4);
            *o = dl * q as f32 - ml;
        }
    }
}

/// Layout: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, d. Element
/// `128h + 32j + l` takes nibble `j / 2` of low byte `64h + 32(j % 2) + l` and bits `2j..2j+2` of
/// high byte `32h + l`; 16 elements per scale.
fn q6_k(b: &[u8; 210], out: &mut [f32; QK_K]) {
    let d = half(b, 208);
    for (g, o) in out.chunks_exact_mut(16).enumerate() {
        let dl = d * (b[192 + g] as i8) as f32;
        let (h, j, l0) = (g / 8, (g / 2) % 4, (g % 2) * 16);
        let lo = &b[64 * h + 32 * (j % 2) + l0..][..16];
        let hi = &b[128 + 32 * h + l0..][..16];
        let lshift = 4 * (j / 2);
        for ((o, &ql), &qh) in o.iter_mut().zip(lo).zip(hi) {
            let q = ((ql >> lshift) & 0x0f) | (((qh >> (2 * j)) & 3) << 4);
            *o = dl * (q as i8 - 32) as f32;
        }
    }
}
