//! GGUF files (llama.cpp's model format): metadata and tensor infos, read from a memory map;
//! tensors as their raw blocks (zero-copy) or dequantized to f32 (`crate::quant`); and written
//! ([`GgufWriter`], `write`).
//!
//! The parser (`parse`) is loratch's own, on memmap2. The crates compared (2026-12): candle-core's
//! `quantized::gguf_file` reads through `Read + Seek` into owned buffers, returns candle's error
//! type and brings candle's tensor stack (gemm, rayon, safetensors, zip); rlx-gguf is GPL-3.0
//! (loratch is Apache-2.0); ggus 0.5 reads from a slice but panics on corrupt lengths
//! (`Layout::array(len).unwrap()`) and its errors carry no position; gguf-rs returns `anyhow`
//! errors and pulls its CLI's dependencies. The format is small (one header, typed key/values,
//! tensor infos), and this parser must survive fuzzing with typed errors that name the file and
//! the key or tensor, so owning its ~300 lines is cheaper than wrapping any of them.
//!
//! Every problem is an [`Error::Checkpoint`] naming the file and the key or tensor; nothing
//! panics on any input (see `fuzz/fuzz_targets/gguf.rs`).
use crate::error::{Error, Result};
use crate::quant::{self, QType};
use memmap2::{Mmap, MmapOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod parse;
#[cfg(test)]
mod tests;
mod write;
#[cfg(test)]
mod write_tests;

pub use write::GgufWriter;

/// A metadata value, as GGUF types it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as i128 when it is an integer of any width.
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// An integer of any width that is non-negative and fits u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// An integer of any width that fits i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }

    /// A float (f64 rounded to f32) or an integer (rounded to the nearest f32).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_int().map(|v| v as f32),
        }
    }

    /// The string, for [`Value::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// GGUF's name of the value's type ("u32", "string", "array"), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A tensor's entry in the file's index.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (contiguous) dimension, the columns of a PyTorch
    /// weight; [`TensorInfo::shape`] is the PyTorch order.
    pub dims: Vec<u64>,
    pub ty: QType,
    /// Byte offset of the data from the start of the file's data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a tensor without dimensions; saturating, though an opened
    /// file's tensors were checked not to overflow).
    pub fn numel(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// The shape outermost first (PyTorch's order): `dims` reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Bytes of data (checked against the file when it was opened).
    pub fn n_bytes(&self) -> u64 {
        parse::checked_n_bytes(self).unwrap_or(u64::MAX)
    }
}

/// An open GGUF file: its parsed index over a memory map of the whole file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps `path` and validates it: header, every key/value, every tensor's type, shape against
    /// its block size, alignment and byte range inside the file. A missing file is an
    /// [`Error::Io`]; anything wrong with its contents an [`Error::Checkpoint`].
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let e = std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, expected a GGUF file",
            );
            return Err(Error::io(path, e));
        }
        // SAFETY: a read-only mapping; loratch never writes a file it has mapped (saves go to a
        // new file renamed into place). Another process truncating the file while it is mapped
        // would fault on access, as with every memory-mapped reader.
        let mmap = unsafe { MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(mmap, path)
    }

    /// As [`open`](Self::open), for bytes already in memory (copied into an anonymous mapping);
    /// `path` only names the data in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut m = MmapOptions::new()
            .len(bytes.len().max(1))
            .map_anon()
            .map_err(|e| Error::io(path, e))?;
        m[..bytes.len()].copy_from_slice(bytes);
        let mmap = m.make_read_only().map_err(|e| Error::io(path, e))?;
        let mut me = Self::from_mmap_len(mmap, path, bytes.len())?;
        me.path = path.to_path_buf();
        Ok(me)
    }

    fn from_mmap(mmap: Mmap, path: &Path) -> Result<Self> {
        let len = mmap.len();
        Self::from_mmap_len(mmap, path, len)
    }

    /// Parses the first `len` bytes of `mmap` (an anonymous map is never empty).
    fn from_mmap_len(mmap: Mmap, path: &Path, len: usize) -> Result<Self> {
        let p = parse::parse(&mmap[..len]).map_err(|msg| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        })?;
        let index = p
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            version: p.version,
            alignment: p.alignment,
            data_offset: p.data_offset,
            metadata: p.metadata,
            tensors: p.tensors,
            index,
        })
    }

    /// The file's path (as given to `open`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata key/value, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn err(&self, msg: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            msg,
        }
    }

    /// `key`'s value converted by `f`, `None` when absent; a value `f` refuses is an
    /// [`Error::Checkpoint`] naming the key, the expected and the found type.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.metadata.get(key) else {
            return Ok(None);
        };
        match f(v) {
            Some(t) => Ok(Some(t)),
            None => Err(self.err(format!(
                "metadata key {key:?}: expected {expected}, found {} {}",
                v.type_name(),
                short(v)
            ))),
        }
    }

    /// An integer of any width, non-negative.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// An integer of any width that fits i64.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.typed(key, "an integer", Value::as_i64)
    }

    /// A float (f32, or f64 rounded) or an integer.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "a number", Value::as_f32)
    }

    /// A string.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// A bool.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    /// An array of strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.typed(key, "an array of strings", |v| {
            array(v)?.iter().map(Value::as_str).collect()
        })
    }

    /// An array of integers of any width that fit i32 (`tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        self.typed(key, "an array of 32-bit integers", |v| {
            array(v)?
                .iter()
                .map(|x| x.as_i64().and_then(|i| i32::try_from(i).ok()))
                .collect()
        })
    }

    /// An array of numbers (`tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.typed(key, "an array of numbers", |v| {
            array(v)?.iter().map(Value::as_f32).collect()
        })
    }

    /// Every tensor's info, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn tensor_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| self.err(format!("no tensor named {name:?}")))
    }

    /// Tensor `name`'s raw blocks, zero-copy from the map (ranges were checked on open).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_or_err(name)?;
        let start = (self.data_offset + t.offset) as usize;
        self.mmap
            .get(start..start + t.n_bytes() as usize)
            .ok_or_else(|| self.err(format!("tensor {name:?}: data outside the file")))
    }

    /// Tensor `name` dequantized to f32, row-major (`numel` elements, `dims[0]` contiguous),
    /// equal bit for bit to gguf-py's `dequantize`. Large tensors are split over the machine's
    /// threads.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_or_err(name)?;
        let src = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.numel() as usize];
        dequantize_parallel(t.ty, src, &mut out)
            .map_err(|e| self.err(format!("tensor {name:?}: {e}")))?;
        Ok(out)
    }

    /// The mapping, for zero-copy users that must keep it alive.
    pub fn mapping(&self) -> Arc<Mmap> {
        Arc::clone(&self.mmap)
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

/// A value for an error message, cut short.
fn short(v: &Value) -> String {
    let s = match v {
        Value::Array(a) => format!("of {} elements", a.len()),
        v => format!("{v:?}"),
    };
    s.chars().take(80).collect()
}

/// [`quant::dequantize`] over block-aligned chunks on up to `available_parallelism` threads
/// (one thread below ~1M elements, where spawning costs more than it saves).
pub fn dequantize_parallel(ty: QType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    const MIN_CHUNK: usize = 1 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let be = ty.block_elems();
    let per = dst
        .len()
        .div_ceil(threads)
        .max(MIN_CHUNK)
        .next_multiple_of(be);
    if threads == 1 || dst.len() <= per || ty.row_bytes(dst.len()).ok() != Some(src.len()) {
        return quant::dequantize(ty, src, dst);
    }
    let per_bytes = per / be * ty.block_bytes();
    std::thread::scope(|s| {
        let handles: Vec<_> = dst
            .chunks_mut(per)
            .zip(src.chunks(per_bytes))
            .map(|(d, b)| s.spawn(move || quant::dequantize(ty, b, d)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}
