//! Block quantization formats: GGML's (the tensor types of a GGUF file) and loratch's NF4.
//!
//! A quantized tensor is a sequence of blocks; each block holds `block_elems` consecutive elements
//! of a row in `block_bytes` bytes (scales first or last, then packed codes, as each format says).
//! [`dequantize`] reproduces gguf-py's `gguf.quants.dequantize` (gguf 0.19, the reference that
//! transformers uses) bit for bit: every kernel in `dequant` performs the same float32 operations
//! in the same order as gguf-py's numpy code, so the results are the same floats, not merely close.
//! [`quantize`] writes F32, F16, BF16, Q8_0 and Q4_0 as gguf-py's `gguf.quants.quantize` does (bit
//! for bit), and NF4 (QLoRA's 4-bit NormalFloat, see `nf4`).
use crate::error::{Error, Result};

mod dequant;
mod nf4;
mod quantize;
#[cfg(test)]
pub(crate) mod tests;

pub use nf4::NF4_CODE;

/// A tensor element type: a float format or a block quantization format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// loratch's NF4 block (no GGML id): 64 elements as an f32 absmax (little-endian) followed by
    /// 32 bytes of 4-bit codes into [`NF4_CODE`]; byte `i` holds element `2i` in its high nibble
    /// and element `2i + 1` in its low nibble (bitsandbytes' packing). Value = code × absmax.
    Nf4,
}

/// Every type, in GGML id order (then Nf4).
pub const ALL_QTYPES: [QType; 14] = [
    QType::F32,
    QType::F16,
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::Q2K,
    QType::Q3K,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
    QType::BF16,
    QType::Nf4,
];

/// K-quant super-block size (GGML's `QK_K`).
const QK_K: usize = 256;

impl QType {
    /// The type of GGML type id `id` (`ggml_type` in ggml.h; GGUF tensor infos store it), or
    /// `None` for ids loratch does not read (Q8_1, Q8_K, the IQ and TQ types, ...).
    pub fn from_ggml(id: u32) -> Option<QType> {
        ALL_QTYPES.into_iter().find(|t| t.ggml_id() == Some(id))
    }

    /// The GGML type id, `None` for [`QType::Nf4`] (not a GGML type).
    pub fn ggml_id(self) -> Option<u32> {
        Some(match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::Q2K => 10,
            QType::Q3K => 11,
            QType::Q4K => 12,
            QType::Q5K => 13,
            QType::Q6K => 14,
            QType::BF16 => 30,
            QType::Nf4 => return None,
        })
    }

    /// The lower-case name ("f32", "q4_0", "q6_k", "nf4"), as GGUF tools and loratch's configs
    /// spell it.
    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "f32",
            QType::F16 => "f16",
            QType::BF16 => "bf16",
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
            QType::Q5_0 => "q5_0",
            QType::Q5_1 => "q5_1",
            QType::Q8_0 => "q8_0",
            QType::Q2K => "q2_k",
            QType::Q3K => "q3_k",
            QType::Q4K => "q4_k",
            QType::Q5K => "q5_k",
            QType::Q6K => "q6_k",
            QType::Nf4 => "nf4",
        }
    }

    /// The type named `name` (case-insensitive, as [`QType::name`] spells it).
    pub fn from_name(name: &str) -> Option<QType> {
        ALL_QTYPES
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block: 1 for the float types.
    pub fn block_elems(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 => 32,
            QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
            QType::Nf4 => nf4::BLOCK,
        }
    }

    /// Bytes per block (GGML's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q4_0 => 2 + 16,
            QType::Q4_1 => 2 + 2 + 16,
            QType::Q5_0 => 2 + 4 + 16,
            QType::Q5_1 => 2 + 2 + 4 + 16,
            QType::Q8_0 => 2 + 32,
            QType::Q2K => QK_K / 16 + QK_K / 4 + 2 + 2,
            QType::Q3K => QK_K / 8 + QK_K / 4 + 12 + 2,
            QType::Q4K => 2 + 2 + 12 + QK_K / 2,
            QType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            QType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            QType::Nf4 => 4 + nf4::BLOCK / 2,
        }
    }

    /// Bytes that `n` elements take; [`Error::Shape`] unless `n` is a multiple of
    /// [`QType::block_elems`] (or when the byte count overflows `usize`).
    pub fn row_bytes(self, n: usize) -> Result<usize> {
        let be = self.block_elems();
        if n % be != 0 {
            return Err(Error::Shape(format!(
                "{n} elements are not a whole number of {} blocks ({be} elements each)",
                self.name()
            )));
        }
        (n / be).checked_mul(self.block_bytes()).ok_or_else(|| {
            Error::Shape(format!(
                "{n} elements of {} overflow usize bytes",
                self.name()
            ))
        })
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes `dst.len()` elements of type `ty` from `src`, which must hold exactly
/// `dst.len() / block_elems * block_bytes` bytes ([`Error::Shape`] otherwise, or when `dst.len()`
/// is not a whole number of blocks). Equal bit for bit to gguf-py's `dequantize` (for
/// [`QType::Nf4`]: `code × absmax` in float32). Pure and thread-safe: callers may split a tensor
/// into block-aligned chunks and decode them on several threads.
pub fn dequantize(ty: QType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let want = ty.row_bytes(dst.len())?;
    if src.len() != want {
        return Err(Error::Shape(format!(
            "{} elements of {ty} take {want} bytes, got {}",
            dst.len(),
            src.len()
        )));
    }
    dequant::dequantize_unchecked(ty, src, dst);
    Ok(())
}

/// Encodes `src` (a whole number of blocks, else [`Error::Shape`]) as `ty`, for `ty` in F32, F16,
/// BF16, Q8_0, Q4_0 (each equal bit for bit to gguf-py's `quantize`) and Nf4; other types are
/// [`Error::Config`]. The block formats need finite input ([`Error::NonFinite`] otherwise); the
/// float formats round as gguf-py does (F16: numpy's round to nearest even, overflow to ±inf;
/// BF16: round to nearest even, NaN kept quiet).
pub fn quantize(ty: QType, src: &[f32]) -> Result<Vec<u8>> {
    let n_bytes = ty.row_bytes(src.len())?;
    let mut out = vec![0u8; n_bytes];
    match ty {
        QType::F32 => quantize::f32s(src, &mut out),
        QType::F16 => quantize::f16s(src, &mut out),
        QType::BF16 => quantize::bf16s(src, &mut out),
        QType::Q8_0 | QType::Q4_0 | QType::Nf4 => {
            if let Some(i) = src.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "element {i} ({}) cannot be quantized to {ty}",
                    src[i]
                )));
            }
            match ty {
                QType::Q8_0 => quantize::q8_0(src, &mut out),
                QType::Q4_0 => quantize::q4_0(src, &mut out),
                _ => nf4::quantize(src, &mut out),
            }
        }
        _ => {
            return Err(Error::Config(format!(
                "quantizing to {ty} is not supported (supported: f32, f16, bf16, q8_0, q4_0, nf4)"
            )))
        }
    }
    Ok(out)
}

/// An IEEE half (little-endian bits) as f32, exactly (numpy's `astype(np.float32)`, NaN payloads
/// included). Branch-free so the kernels around it vectorize; subnormals go through an exact
/// int-to-float product, so it also holds under flush-to-zero modes.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let exp = em >> 10;
    let normal = (em << 13) + ((127 - 15) << 23);
    let inf_nan = (em << 13) | 0x7f80_0000;
    // A subnormal half is mantissa × 2^-24: both factors and the product are normal f32s.
    let sub = ((em & 0x3ff) as f32 * (1.0 / 16_777_216.0)).to_bits();
    let bits = if exp == 0 {
        sub
    } else if exp == 31 {
        inf_nan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}
