//! Frozen weights kept in a block-quantized format ([`QWeight`]: GGUF's types as a file stores
//! them, or loratch's q8_0 / q4_0 / nf4 made on load) and the ops that decode them on use: the
//! linear (an autograd node that decodes W chunk by chunk in its forward and again in its
//! backward, csrc/quant_linear.cpp), the input gradient of a hand-run backward, and embedding rows.
use crate::error::{Error, Result};
use crate::ffi::{self, QuantRows};
use crate::quant::{self, QType};
use tch::{Device, Kind, Tensor};

/// The block formats in the order of their code across the FFI ([`decode`]): an index into
/// [`quant::ALL_QTYPES`].
const TYPES: [QType; 14] = quant::ALL_QTYPES;

fn code(ty: QType) -> i32 {
    TYPES.iter().position(|&t| t == ty).map_or(-1, |i| i as i32)
}

/// The decoder the C++ ops call back: `n` floats of `TYPES[ty]` from `src_len` bytes. Returns 0,
/// or 1 for an unknown code, 2 for a length mismatch, 3 for a panic (none is expected: decoding
/// is safe slice code; a panic must still not unwind into C++).
extern "C" fn decode(ty: i32, src: *const u8, src_len: i64, dst: *mut f32, n: i64) -> i32 {
    if n == 0 && src_len == 0 {
        return 0;
    }
    if src.is_null() || dst.is_null() || src_len < 0 || n < 0 {
        return 2;
    }
    let Some(&t) = usize::try_from(ty).ok().and_then(|i| TYPES.get(i)) else {
        return 1;
    };
    std::panic::catch_unwind(|| {
        // SAFETY: the C++ side passes `src_len` readable bytes and `n` writable floats that
        // nothing else touches during the call (each thread decodes its own rows).
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(src, src_len as usize),
                std::slice::from_raw_parts_mut(dst, n as usize),
            )
        };
        match quant::dequantize(t, src, dst) {
            Ok(()) => 0,
            Err(_) => 2,
        }
    })
    .unwrap_or(3)
}

/// A frozen `[out, in]` weight in a block format: its rows of blocks (uint8 `[out, row_bytes]`,
/// host memory) and the dtype and device its products are computed in.
#[derive(Debug)]
pub struct QWeight {
    data: Tensor,
    ty: QType,
    out_features: i64,
    in_features: i64,
    kind: Kind,
    device: Device,
}

impl QWeight {
    /// A weight from its stored blocks (`out` rows of `in` elements, row-major as GGUF stores a
    /// `[out, in]` matrix), computed in `kind` on `device`.
    pub fn from_blocks(
        blocks: &[u8],
        ty: QType,
        out: i64,
        inf: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let row = ty.row_bytes(inf as usize)? as i64;
        if out <= 0 || inf <= 0 || blocks.len() as i64 != out * row {
            return Err(Error::Shape(format!(
                "{} weight [{out}, {inf}] needs {} bytes of blocks, got {}",
                ty.name(),
                out * row,
                blocks.len()
            )));
        }
        let data = Tensor::f_from_slice(blocks)?.f_reshape([out, row])?;
        Ok(Self {
            data,
            ty,
            out_features: out,
            in_features: inf,
            kind,
            device,
        })
    }

    /// Quantizes the float weight `w` `[out, in]` into `ty` (q8_0, q4_0, nf4, or a float type);
    /// products then run in `w`'s dtype on its device.
    pub fn quantize(w: &Tensor, ty: QType) -> Result<Self> {
        let size = w.size();
        if size.len() != 2 {
            return Err(Error::Shape(format!(
                "quantizing a weight of shape {size:?}"
            )));
        }
        let (out, inf) = (size[0], size[1]);
        let row = ty.row_bytes(inf as usize)?;
        let flat = w
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_view([-1])?;
        let values = Vec::<f32>::try_from(&flat)?;
        let mut blocks = vec![0u8; out as usize * row];
        // Rows in two halves on two threads: quantizing a large model is a load-time cost.
        let rows_per = (out as usize).div_ceil(2).max(1);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = values
                .chunks(rows_per * inf as usize)
                .zip(blocks.chunks_mut(rows_per * row))
                .map(|(src, dst)| {
                    s.spawn(move || -> Result<()> {
                        dst.copy_from_slice(&quant::quantize(ty, src)?);
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::State("quantizing panicked".into())))
                })
                .collect()
        });
        results.into_iter().collect::<Result<()>>()?;
        Self::from_blocks(&blocks, ty, out, inf, w.f_kind()?, w.device())
    }

    /// The block format.
    pub fn qtype(&self) -> QType {
        self.ty
    }

    /// `[out, in]`.
    pub fn size(&self) -> [i64; 2] {
        [self.out_features, self.in_features]
    }

    /// The dtype products are computed in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device products are computed on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes held by the blocks.
    pub fn bytes(&self) -> i64 {
        self.data.numel() as i64
    }

    /// The address of the blocks (to count a shared table once).
    pub fn data_ptr(&self) -> usize {
        self.data.data_ptr() as usize
    }

    /// The same weight, sharing its blocks.
    pub fn shallow_clone(&self) -> Self {
        Self {
            data: self.data.shallow_clone(),
            ..*self
        }
    }

    fn rows(&self) -> QuantRows<'_> {
        QuantRows {
            data: &self.data,
            ty: code(self.ty),
            in_features: self.in_features,
            decode,
        }
    }

    /// The whole weight decoded, in `kind` on the weight's device.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let ids = Tensor::f_arange(self.out_features, (Kind::Int64, Device::Cpu))?;
        let like = Tensor::f_empty([0], (kind, self.device))?;
        Ok(ffi::quant_rows(&self.rows(), &ids, &like)?)
    }

    /// `x W^T + bias`, one autograd node; gradients reach `x` only.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(ffi::quant_linear(x, &self.rows(), bias)?)
    }

    /// `g W` for `g` `[rows, out]`, outside autograd.
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        Ok(ffi::quant_input_grad(g, &self.rows())?)
    }

    /// The rows `ids` (int64, any shape) decoded: `[*ids.shape, in]` in the weight's dtype and
    /// device (an embedding lookup).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let like = Tensor::f_empty([0], (self.kind, self.device))?;
        let flat = ids.f_reshape([-1])?;
        let rows = ffi::quant_rows(&self.rows(), &flat, &like)?;
        let mut shape = ids.size();
        shape.push(self.in_features);
        Ok(rows.f_reshape(shape)?)
    }
}

/// Test hook: the largest number of float elements decoded at once. Returns the previous value.
#[doc(hidden)]
pub fn set_chunk_elems(n: i64) -> i64 {
    ffi::quant_chunk_elems(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;

    fn weight(out: i64, inf: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([out, inf], (Kind::Float, Device::Cpu)) * 0.05
    }

    /// Bound on the difference of two float32 sums of `k` products of magnitudes up to `|x| |w|`
    /// taken in different orders: each partial sum rounds by at most 2^-24 of itself.
    fn sum_bound(k: i64, x: &Tensor, w: &Tensor) -> f64 {
        let mx = x.abs().max().double_value(&[]);
        let mw = w.abs().max().double_value(&[]);
        2.0 * k as f64 * k as f64 * mx * mw * f32::EPSILON as f64 / 2.0
    }

    /// Forward, input gradient and embedding rows of a quantized weight equal the dense ops on
    /// its decoded float weight: bit for bit when the weight fits one chunk (the same product),
    /// within the float32 reordering bound when it is split into chunks.
    #[test]
    fn quantized_ops_match_the_decoded_weight() {
        for ty in [QType::Q8_0, QType::Q4_0, QType::Nf4] {
            let w = weight(96, 128, 1);
            let q = QWeight::quantize(&w, ty).unwrap();
            let dense = q.dequantize(Kind::Float).unwrap();
            assert_eq!(dense.size(), vec![96, 128]);
            let x = Tensor::randn([3, 5, 128], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let bias = Tensor::randn([96], (Kind::Float, Device::Cpu));
            for chunk in [1 << 24, 40 * 128, 128] {
                let before = set_chunk_elems(chunk);
                let y = q.linear(&x, Some(&bias)).unwrap();
                let want = x.linear(&dense, Some(&bias));
                let g = Tensor::randn_like(&want);
                let gx = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &[&x], false, false);
                let gwant =
                    Tensor::run_backward(&[(&want * &g).sum(Kind::Float)], &[&x], false, false);
                let manual = q
                    .input_grad(&g.reshape([-1, 96]))
                    .unwrap()
                    .reshape([3, 5, 128]);
                set_chunk_elems(before);
                let (fwd, bwd) = (max_diff(&y, &want), max_diff(&gx[0], &gwant[0]));
                if chunk >= 96 * 128 {
                    assert_eq!((fwd, bwd), (0.0, 0.0), "{ty:?} one chunk");
                } else {
                    assert!(
                        fwd <= sum_bound(128, &x, &dense),
                        "{ty:?} chunked forward {fwd}"
                    );
                    assert!(
                        bwd <= sum_bound(96, &g, &dense),
                        "{ty:?} chunked backward {bwd}"
                    );
                }
                assert_eq!(max_diff(&manual, &gx[0]), 0.0, "{ty:?} input_grad");
            }
            let ids = Tensor::from_slice(&[5i64, 0, 95, 5]).reshape([2, 2]);
            let rows = q.embedding(&ids).unwrap();
            let want = Tensor::embedding(&dense, &ids, -1, false, false);
            assert_eq!(max_diff(&rows, &want), 0.0, "{ty:?} embedding");
        }
    }

    /// Inputs of few rows (decoding steps: each thread decodes small blocks of W and multiplies
    /// them at once) equal the product with the decoded weight within the float32 reordering
    /// bound, with and without bias, on one thread and on two; their input gradient is exact.
    #[test]
    fn few_row_products_match_the_decoded_weight() {
        let threads = tch::get_num_threads();
        for (ty, out, inf) in [
            (QType::Q8_0, 1300, 64),
            (QType::Q4_0, 7, 4096),
            (QType::Nf4, 600, 128),
            // Float32 rows of 48: not whole 32-element chunks of the AVX2 kernels.
            (QType::F32, 50, 48),
        ] {
            let w = weight(out, inf, 4);
            let q = QWeight::quantize(&w, ty).unwrap();
            let dense = q.dequantize(Kind::Float).unwrap();
            let bias = Tensor::randn([out], (Kind::Float, Device::Cpu));
            for (rows, n_threads) in [(1, 1), (1, 2), (8, 2), (3, 1)] {
                tch::set_num_threads(n_threads);
                let x = Tensor::randn([1, rows, inf], (Kind::Float, Device::Cpu))
                    .set_requires_grad(true);
                for b in [None, Some(&bias)] {
                    let y = q.linear(&x, b).unwrap();
                    let want = x.linear(&dense, b);
                    assert_eq!(y.size(), vec![1, rows, out]);
                    let diff = max_diff(&y, &want);
                    assert!(
                        diff <= sum_bound(inf, &x, &dense),
                        "{ty:?} {rows} rows: {diff}"
                    );
                }
                let g = Tensor::randn([1, rows, out], (Kind::Float, Device::Cpu));
                let y = q.linear(&x, None).unwrap();
                let gx = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &[&x], false, false);
                let want = g.reshape([-1, out]).mm(&dense).reshape([1, rows, inf]);
                assert_eq!(max_diff(&gx[0], &want), 0.0, "{ty:?} input gradient");
            }
        }
        tch::set_num_threads(threads);
    }

    /// The AVX2 kernels (csrc/quant_simd.cpp, which names the formats by these codes) decode
    /// random blocks of each of their formats to Rust's floats bit for bit, and their few-row
    /// products (1 to 8 rows, one thread and two) are within the float32 reordering bound of the
    /// product with the decoded weight, their tiled products (16 rows or more) equal to it. On a
    /// CPU without AVX2 the same checks cover the fallback.
    #[test]
    fn block_kernels_decode_as_rust_and_multiply_within_the_bound() {
        use rand::{rngs::StdRng, SeedableRng};
        let simd = [
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
            QType::Q8_0,
            QType::Q4K,
            QType::Q5K,
            QType::Q6K,
        ];
        assert_eq!(simd.map(code), [2, 3, 4, 5, 6, 9, 10, 11]);
        let threads = tch::get_num_threads();
        let mut rng = StdRng::seed_from_u64(7);
        for ty in simd {
            let (out, inf) = (70, 512);
            let n_blocks = out as usize * inf as usize / ty.block_elems();
            let blocks = crate::quant::tests::random_blocks(ty, n_blocks, &mut rng);
            let mut want = vec![0f32; out as usize * inf as usize];
            quant::dequantize(ty, &blocks, &mut want).unwrap();
            let q = QWeight::from_blocks(&blocks, ty, out, inf, Kind::Float, Device::Cpu).unwrap();
            let dense = q.dequantize(Kind::Float).unwrap();
            let got = Vec::<f32>::try_from(dense.reshape([-1])).unwrap();
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty:?}: decoded floats differ from Rust's");
            for (rows, n_threads) in [(1, 1), (2, 2), (3, 1), (5, 2), (8, 2)] {
                tch::set_num_threads(n_threads);
                let x = Tensor::randn([rows, inf], (Kind::Float, Device::Cpu));
                let y = q.linear(&x, None).unwrap();
                let diff = max_diff(&y, &x.mm(&dense.tr()));
                assert!(
                    diff <= sum_bound(inf, &x, &dense),
                    "{ty:?} {rows} rows: {diff}"
                );
            }
            // 16 rows or more and `out` a multiple of 64: tiles of 64k decoded rows, each one
            // product over all of `in`, equal to `linear` on the whole decoded weight bit for bit,
            // a bias added as `addmm` adds it; on one thread and two, with tiles of 64 and more.
            for (out, inf) in [(320, 512), (192, 256), (128, 2048), (1024, 256)] {
                let n_blocks = out as usize * inf as usize / ty.block_elems();
                let blocks = crate::quant::tests::random_blocks(ty, n_blocks, &mut rng);
                let q =
                    QWeight::from_blocks(&blocks, ty, out, inf, Kind::Float, Device::Cpu).unwrap();
                let dense = q.dequantize(Kind::Float).unwrap();
                let bias = Tensor::randn([out], (Kind::Float, Device::Cpu));
                for (rows, n_threads) in [(16, 2), (40, 1), (129, 2)] {
                    tch::set_num_threads(n_threads);
                    let x = Tensor::randn([1, rows, inf], (Kind::Float, Device::Cpu));
                    for b in [None, Some(&bias)] {
                        let y = q.linear(&x, b).unwrap();
                        let diff = max_diff(&y, &x.linear(&dense, b));
                        assert_eq!(diff, 0.0, "{ty:?} [{out}, {inf}] {rows} rows tiled");
                    }
                }
            }
        }
        tch::set_num_threads(threads);
    }

    /// The blocks (not a float copy) are what the weight holds, and a bfloat16 model computes
    /// its products in bfloat16 from the decoded rows.
    #[test]
    fn holds_blocks_and_computes_in_the_models_dtype() {
        let w = weight(64, 256, 2);
        let q8 = QWeight::quantize(&w, QType::Q8_0).unwrap();
        assert_eq!(q8.bytes(), 64 * 256 / 32 * 34);
        let q4 = QWeight::quantize(&w, QType::Q4_0).unwrap();
        assert_eq!(q4.bytes(), 64 * 256 / 32 * 18);
        let bf = QWeight::quantize(&w.to_kind(Kind::BFloat16), QType::Q4_0).unwrap();
        assert_eq!(bf.kind(), Kind::BFloat16);
        let x = Tensor::randn([4, 256], (Kind::BFloat16, Device::Cpu));
        let y = bf.linear(&x, None).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        let want = x.linear::<&Tensor>(&bf.dequantize(Kind::BFloat16).unwrap(), None);
        assert_eq!(max_diff(&y, &want), 0.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = weight(4, 48, 3);
        assert!(matches!(
            QWeight::quantize(&w, QType::Q4_0),
            Err(Error::Shape(_))
        ));
        let q = QWeight::quantize(&weight(4, 64, 3), QType::Q4_0).unwrap();
        let err = q.linear(&Tensor::zeros([2, 63], (Kind::Float, Device::Cpu)), None);
        assert!(err.unwrap_err().to_string().contains("in_features"));
        assert!(
            QWeight::from_blocks(&[0u8; 10], QType::Q4_0, 1, 32, Kind::Float, Device::Cpu).is_err()
        );
    }
}
