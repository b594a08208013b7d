//! Writing GGUF v3 files (ggml's `docs/gguf.md`, the layout `parse` reads): typed metadata, then
//! tensor infos, then each tensor's data at an offset aligned to `general.alignment` (32 unless
//! the metadata sets it). Tensors are given as bytes already in their block format
//! ([`crate::quant::quantize`] makes them) or as a function that makes them when the file is
//! written, so a large model is encoded one tensor at a time. The file is written atomically: a
//! failure at any point (a tensor whose bytes disagree with its shape, a full disk) leaves no
//! file and no partial file behind.
use super::{parse, TensorInfo, Value};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic_with;
use crate::quant::QType;
use std::io::Write;
use std::path::Path;

/// GGML's `GGML_MAX_NAME`: tensor names (with their terminating NUL) must fit 64 bytes.
const MAX_NAME_BYTES: usize = 63;
/// GGML's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor's data: bytes now, or a function that makes them when the file is written.
enum Data<'a> {
    Bytes(Vec<u8>),
    Later(Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>),
}

struct Pending<'a> {
    info: TensorInfo,
    data: Data<'a>,
}

/// A GGUF file being assembled: metadata in insertion order, tensors in the order added.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Pending<'a>>,
}

impl<'a> GgufWriter<'a> {
    /// An empty file (no metadata, no tensors).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets metadata `key` to `value`, replacing an earlier value of the key in place. An array
    /// must hold elements of one type (nested arrays count as one type); an empty array is
    /// written with element type u32. Invalid values are [`Error::Config`].
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        check_value(&value).map_err(|m| Error::Config(format!("GGUF metadata {key:?}: {m}")))?;
        if key == "general.alignment"
            && !value
                .as_u64()
                .is_some_and(|a| a.is_power_of_two() && matches!(value, Value::U32(_)))
        {
            return Err(Error::Config(format!(
                "GGUF metadata \"general.alignment\" must be a u32 power of two, got {value:?}"
            )));
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        Ok(())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Adds tensor `name` of `shape` (PyTorch order, outermost first) and type `ty`, its data
    /// `bytes` in `ty`'s block format (row-major). The bytes must be exactly what the shape
    /// takes; names are unique and at most 63 bytes; at most 4 dimensions.
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[i64],
        ty: QType,
        bytes: Vec<u8>,
    ) -> Result<()> {
        let info = self.info(name, shape, ty)?;
        check_len(&info, bytes.len())?;
        self.tensors.push(Pending {
            info,
            data: Data::Bytes(bytes),
        });
        Ok(())
    }

    /// As [`add_tensor`](Self::add_tensor), the bytes made by `make` while the file is written
    /// (checked then against the shape; an error from `make` aborts the write).
    pub fn add_tensor_with(
        &mut self,
        name: &str,
        shape: &[i64],
        ty: QType,
        make: impl FnOnce() -> Result<Vec<u8>> + 'a,
    ) -> Result<()> {
        let info = self.info(name, shape, ty)?;
        self.tensors.push(Pending {
            info,
            data: Data::Later(Box::new(make)),
        });
        Ok(())
    }

    /// The checked info of a new tensor (its offset filled in when the file is laid out).
    fn info(&self, name: &str, shape: &[i64], ty: QType) -> Result<TensorInfo> {
        let bad = |m: String| Error::Shape(format!("GGUF tensor {name:?}: {m}"));
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(bad(format!(
                "a name must have 1 to {MAX_NAME_BYTES} bytes, this one has {}",
                name.len()
            )));
        }
        if self.tensors.iter().any(|t| t.info.name == name) {
            return Err(bad("added twice".into()));
        }
        if shape.len() > MAX_DIMS || shape.iter().any(|&d| d <= 0) {
            return Err(bad(format!(
                "shape {shape:?}: 1 to {MAX_DIMS} dimensions, each > 0"
            )));
        }
        if ty.ggml_id().is_none() {
            return Err(bad(format!("{ty} is not a GGML type")));
        }
        let info = TensorInfo {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            offset: 0,
        };
        let cols = info.dims.first().copied().unwrap_or(1);
        if cols % ty.block_elems() as u64 != 0 {
            return Err(bad(format!(
                "rows of {cols} elements are not a whole number of {ty} blocks ({} elements)",
                ty.block_elems()
            )));
        }
        parse::checked_n_bytes(&info).ok_or_else(|| bad(format!("shape {shape:?} too large")))?;
        Ok(info)
    }

    fn alignment(&self) -> u64 {
        self.get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Writes the file to `path` atomically (nothing is left at `path` on failure, and an
    /// existing file there is only replaced by a complete one).
    pub fn write(self, path: &Path) -> Result<()> {
        write_atomic_with(path, |w| self.write_to(w, path))
    }

    /// The file as bytes (for tests and small files).
    pub fn to_bytes(self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out, Path::new("<memory>"))?;
        Ok(out)
    }

    /// Streams the file into `w`; `path` names it in I/O errors.
    fn write_to(self, w: &mut dyn Write, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| Error::io(path, e);
        let align = self.alignment();
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut head, &t.info.name);
            head.extend_from_slice(&(t.info.dims.len() as u32).to_le_bytes());
            for d in &t.info.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            let id = t.info.ty.ggml_id().unwrap_or_default();
            head.extend_from_slice(&id.to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.info.n_bytes()).next_multiple_of(align);
        }
        pad(&mut head, align);
        w.write_all(&head).map_err(io)?;
        for t in self.tensors {
            let bytes = match t.data {
                Data::Bytes(b) => b,
                Data::Later(make) => make()?,
            };
            check_len(&t.info, bytes.len())?;
            w.write_all(&bytes).map_err(io)?;
            let padding = (bytes.len() as u64).next_multiple_of(align) - bytes.len() as u64;
            w.write_all(&vec![0u8; padding as usize]).map_err(io)?;
        }
        Ok(())
    }
}

fn check_len(info: &TensorInfo, got: usize) -> Result<()> {
    let want = info.n_bytes();
    if got as u64 != want {
        return Err(Error::Shape(format!(
            "GGUF tensor {:?}: {:?} of {} take {want} bytes, got {got}",
            info.name,
            info.shape(),
            info.ty
        )));
    }
    Ok(())
}

fn pad(buf: &mut Vec<u8>, align: u64) {
    let len = buf.len() as u64;
    buf.resize(len.next_multiple_of(align) as usize, 0);
}

/// GGUF's value type id of `v`.
pub(super) fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// An array's element type: its first element's (u32 for an empty array).
fn elem_type(items: &[Value]) -> u32 {
    items.first().map_or(4, type_id)
}

/// Arrays hold one element type, nested no deeper than the reader accepts.
fn check_value(v: &Value) -> std::result::Result<(), String> {
    fn walk(v: &Value, depth: usize) -> std::result::Result<(), String> {
        let Value::Array(items) = v else {
            return Ok(());
        };
        if depth >= parse::MAX_DEPTH {
            return Err(format!(
                "arrays nested deeper than {} levels",
                parse::MAX_DEPTH
            ));
        }
        let t = elem_type(items);
        if let Some(other) = items.iter().find(|x| type_id(x) != t) {
            return Err(format!(
                "an array mixes {} and {} elements",
                items[0].type_name(),
                other.type_name()
            ));
        }
        items.iter().try_for_each(|x| walk(x, depth + 1))
    }
    walk(v, 0)
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A value's bytes after its type id (an array: element type, count, elements).
fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::Array(items) => {
            buf.extend_from_slice(&elem_type(items).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(buf, x);
            }
        }
    }
}
