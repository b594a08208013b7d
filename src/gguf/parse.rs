//! The GGUF byte layout (v2 and v3, little-endian; ggml's `docs/gguf.md`): header, metadata
//! key/value pairs, tensor infos, then the aligned tensor data. Every read is bounds-checked and
//! every count is checked against the bytes left before anything is allocated for it, so a
//! corrupt file yields a message, never a panic or a huge allocation.
use super::{TensorInfo, Value};
use crate::quant::QType;
use std::collections::{BTreeMap, HashMap};

/// A parse failure's message (the caller adds the file's path).
pub(super) type PResult<T> = std::result::Result<T, String>;

/// GGML's limit on tensor dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Nested metadata arrays deeper than this are refused (each level costs only 12 bytes, so a
/// small file could otherwise exhaust the stack).
pub(super) const MAX_DEPTH: usize = 8;
/// `general.alignment` when absent (`GGUF_DEFAULT_ALIGNMENT`).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Smallest encodings, to bound counts by the bytes left: a key/value pair (empty key, u32
/// type, one byte of value) and a tensor info (empty name, n_dims, type, offset).
const MIN_KV_BYTES: usize = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// What a file holds, with every tensor's data range checked to lie inside it.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

/// A cursor over the file's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> PResult<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "truncated: {what} at byte {} needs {n} bytes, the file has {} left",
                self.pos,
                self.left()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> PResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in the bytes left at `min_each` bytes per item.
    fn count(&mut self, min_each: usize, what: &str) -> PResult<usize> {
        let n = self.u64(what)?;
        let fits = self.left() / min_each.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= fits => Ok(n),
            _ => Err(format!(
                "{what} is {n}, more than the {} bytes left can hold (truncated or corrupt)",
                self.left()
            )),
        }
    }

    fn string(&mut self, what: &str) -> PResult<String> {
        let n = self.count(1, &format!("{what}'s length"))?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("{what} at byte {at} is not UTF-8 ({e})"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> PResult<Value> {
        let v = match ty {
            0 => Value::U8(self.array::<1>("u8")?[0]),
            1 => Value::I8(self.array::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => match self.array::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(format!(
                        "bool value {b} at byte {} (not 0 or 1)",
                        self.pos - 1
                    ))
                }
            },
            8 => Value::String(self.string("string")?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_DEPTH} levels"));
                }
                let elem = self.u32("array element type")?;
                let min = min_value_bytes(elem)
                    .ok_or_else(|| format!("unknown array element type {elem}"))?;
                let n = self.count(min, "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            _ => return Err(format!("unknown value type {ty}")),
        };
        Ok(v)
    }
}

/// The fewest bytes a value of GGUF value type `ty` takes, `None` for unknown types.
fn min_value_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}

/// GGML's name of a tensor type id loratch does not read, for the error message.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => "unknown",
    }
}

/// Parses and validates a whole file.
pub(super) fn parse(buf: &[u8]) -> PResult<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.array::<4>("the magic")?;
    if &magic != b"GGUF" {
        return Err(format!(
            "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        ));
    }
    let version = r.u32("the version")?;
    if matches!(version.swap_bytes(), 1..=3) {
        return Err("big-endian GGUF files are not supported".into());
    }
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    let kv_fit = (r.left() / MIN_KV_BYTES) as u64;
    if n_kv > kv_fit {
        return Err(format!(
            "the metadata count {n_kv} is more than the file's {} bytes can hold (truncated or \
             corrupt)",
            buf.len()
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let ty = r
            .u32("a value type")
            .map_err(|e| format!("metadata key {key:?}: {e}"))?;
        let value = r
            .value(ty, 0)
            .map_err(|e| format!("metadata key {key:?}: {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key:?} appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(format!(
                    "metadata key \"general.alignment\": {v:?} is not a power of two"
                ))
            }
        },
    };
    if n_tensors > (r.left() / MIN_TENSOR_INFO_BYTES) as u64 {
        return Err(format!(
            "the tensor count {n_tensors} is more than the file's {} bytes can hold (truncated or \
             corrupt)",
            buf.len()
        ));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashMap::new();
    for i in 0..n_tensors as usize {
        let name = r.string(&format!("tensor {i}'s name"))?;
        let info =
            tensor_info(&mut r, name.clone()).map_err(|e| format!("tensor {name:?}: {e}"))?;
        if seen.insert(name.clone(), i).is_some() {
            return Err(format!("tensor {name:?} appears twice"));
        }
        tensors.push(info);
    }
    let data_offset = (r.pos as u64).next_multiple_of(alignment);
    check_ranges(&tensors, data_offset, alignment, buf.len() as u64)?;
    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

/// One tensor info after its name: dims, type, offset; checks the dims against the type.
fn tensor_info(r: &mut Reader, name: String) -> PResult<TensorInfo> {
    let n_dims = r.u32("the dimension count")?;
    if n_dims > MAX_DIMS {
        return Err(format!("{n_dims} dimensions (at most {MAX_DIMS})"));
    }
    let dims = (0..n_dims)
        .map(|_| r.u64("a dimension"))
        .collect::<PResult<Vec<u64>>>()?;
    let id = r.u32("the type")?;
    let ty = QType::from_ggml(id).ok_or_else(|| {
        format!(
            "tensor type id {id} ({}) is not supported (supported: f32, f16, bf16, q4_0, q4_1, \
             q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)",
            ggml_type_name(id)
        )
    })?;
    let offset = r.u64("the data offset")?;
    let info = TensorInfo {
        name,
        dims,
        ty,
        offset,
    };
    let be = ty.block_elems() as u64;
    let cols = info.dims.first().copied().unwrap_or(1);
    if cols % be != 0 {
        return Err(format!(
            "rows of {cols} elements are not a whole number of {ty} blocks ({be} elements each)"
        ));
    }
    checked_n_bytes(&info).ok_or_else(|| format!("shape {:?} is too large", info.dims))?;
    Ok(info)
}

/// The tensor's byte size, `None` on overflow.
pub(super) fn checked_n_bytes(t: &TensorInfo) -> Option<u64> {
    let numel = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    (numel / t.ty.block_elems() as u64).checked_mul(t.ty.block_bytes() as u64)
}

/// Each tensor's data is aligned, inside the file, and overlaps no other tensor's.
fn check_ranges(tensors: &[TensorInfo], data_offset: u64, alignment: u64, len: u64) -> PResult<()> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let name = &t.name;
        if t.offset % alignment != 0 {
            return Err(format!(
                "tensor {name:?}: data offset {} is not a multiple of the alignment {alignment}",
                t.offset
            ));
        }
        let size = checked_n_bytes(t).unwrap_or(u64::MAX);
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(size));
        match end {
            Some(end) if end <= len => ranges.push((data_offset + t.offset, end, name)),
            _ => {
                return Err(format!(
                    "tensor {name:?}: its {size} bytes ({:?} of {}) at data offset {} run past the \
                     end of the file ({len} bytes, data from byte {data_offset})",
                    t.dims, t.ty, t.offset
                ))
            }
        }
    }
    ranges.sort();
    // The furthest end so far, and whose: a non-empty range starting before it overlaps.
    let mut reach: Option<(u64, u64, &String)> = None;
    for (s, e, n) in ranges.into_iter().filter(|(s, e, _)| s < e) {
        if let Some((s0, e0, n0)) = reach {
            if s < e0 {
                return Err(format!(
                    "tensor {n0:?} (bytes {s0}..{e0}) overlaps tensor {n:?} (bytes {s}..{e}): a \
                     size disagrees with its shape"
                ));
            }
        }
        if reach.is_none_or(|(_, e0, _)| e > e0) {
            reach = Some((s, e, n));
        }
    }
    Ok(())
}
