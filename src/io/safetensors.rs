//! safetensors files <-> named tch tensors (+ the string metadata of the header), through the
//! `safetensors` crate. Reads are memory-mapped; writes are atomic.
use crate::error::{Error, Result};
use memmap2::{MmapMut, MmapOptions};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn kind_to_dtype(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(Error::Dtype(format!(
                "cannot store {other:?} in safetensors"
            )))
        }
    })
}

fn dtype_to_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The raw little-endian bytes of `t` (copied to a contiguous CPU buffer).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.f_kind()?.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut buf, numel)?;
    Ok(buf)
}

/// Serialises named tensors and header metadata to safetensors bytes.
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        raw.push((
            name.clone(),
            kind_to_dtype(t.f_kind()?)?,
            t.size(),
            tensor_bytes(t)?,
        ));
    }
    let mut views = Vec::with_capacity(raw.len());
    for (name, dtype, shape, bytes) in &raw {
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let view = TensorView::new(*dtype, shape, bytes)
            .map_err(|e| Error::Config(format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    safetensors::tensor::serialize(views, Some(metadata.clone()))
        .map_err(|e| Error::Config(format!("safetensors serialisation failed: {e}")))
}

/// Writes named tensors + metadata to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    super::atomic::write_atomic(path, &serialize(tensors, metadata)?)
}

/// A safetensors file opened by memory map; tensors are materialised on request.
pub struct MappedSafetensors {
    path: std::path::PathBuf,
    /// A private copy-on-write mapping: tensors viewing it may be written (merging LoRA into
    /// base weights) without touching the file.
    mmap: Arc<MmapMut>,
    checkpoint: bool,
}

impl MappedSafetensors {
    /// Maps `path` and validates its header. A missing file is an [`Error::Io`] (NotFound);
    /// a corrupt or truncated one an [`Error::AdapterFormat`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, false)
    }

    /// As [`open`](Self::open), for model weights: format problems are [`Error::Checkpoint`].
    pub fn open_checkpoint(path: &Path) -> Result<Self> {
        Self::open_as(path, true)
    }

    /// As [`open`](Self::open), for bytes already in memory (copied into an anonymous private
    /// mapping); `path` only names the data in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut mmap = MmapOptions::new()
            .len(bytes.len())
            .map_anon()
            .map_err(|e| Error::io(path, e))?;
        mmap.copy_from_slice(bytes);
        let me = Self {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            checkpoint: false,
        };
        me.parse()?;
        Ok(me)
    }

    fn open_as(path: &Path, checkpoint: bool) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Opening a directory succeeds on Linux; mapping it then fails with ENODEV ("No such
        // device"), which says nothing useful.
        if file.metadata().map_err(|e| Error::io(path, e))?.is_dir() {
            let e = std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, expected a safetensors file",
            );
            return Err(Error::io(path, e));
        }
        // SAFETY: a private (copy-on-write) mapping; loratch never writes a file it has mapped
        // (saves go to a new file renamed into place), so the mapping stays consistent.
        let mmap = Arc::new(
            unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?,
        );
        let me = Self {
            path: path.to_path_buf(),
            mmap,
            checkpoint,
        };
        me.parse()?;
        Ok(me)
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| self.err(format!("not a valid safetensors file: {e}")))
    }

    /// The header's `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| self.err(format!("not a valid safetensors file: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Tensor names in the file, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .parse()?
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        let st = self.parse()?;
        let view = st
            .tensor(name)
            .map_err(|e| self.err(format!("{name}: {e}")))?;
        Ok(view.shape().iter().map(|&d| d as i64).collect())
    }

    /// Tensor `name` copied into a new CPU tensor of the file's dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.parse()?;
        let view = st
            .tensor(name)
            .map_err(|e| self.err(format!("{name}: {e}")))?;
        let kind = dtype_to_kind(view.dtype()).ok_or_else(|| {
            Error::adapter(
                &self.path,
                format!("{name}: unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    }

    /// Tensor `name` as a zero-copy view of the mapping, or `None` when its data is not aligned
    /// for its dtype. The view is only valid while the mapping lives: keep
    /// [`mapping`](Self::mapping) alive at least as long as the tensor and every handle on it.
    pub fn tensor_view(&self, name: &str) -> Result<Option<Tensor>> {
        let st = self.parse()?;
        let view = st
            .tensor(name)
            .map_err(|e| self.err(format!("{name}: {e}")))?;
        let kind = dtype_to_kind(view.dtype())
            .ok_or_else(|| self.err(format!("{name}: unsupported dtype {:?}", view.dtype())))?;
        let data = view.data();
        let elt = kind.elt_size_in_bytes();
        if data.is_empty() || (data.as_ptr() as usize) % elt != 0 {
            return Ok(None);
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let mut strides = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        // SAFETY: `data` lies inside the writable private mapping owned by `self.mmap`, whose
        // lifetime the caller extends over the tensor's (documented above); size and strides
        // describe exactly `data.len()` bytes of `kind`.
        let t = unsafe { Tensor::f_from_blob(data.as_ptr(), &shape, &strides, kind, Device::Cpu)? };
        Ok(Some(t))
    }

    /// The mapping, to keep zero-copy views alive.
    pub fn mapping(&self) -> Arc<MmapMut> {
        Arc::clone(&self.mmap)
    }

    fn err(&self, msg: String) -> Error {
        if self.checkpoint {
            Error::Checkpoint {
                path: self.path.clone(),
                msg,
            }
        } else {
            Error::adapter(&self.path, msg)
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_preserves_values_dtypes_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([2], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        save(
            &p,
            &[
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            &meta,
        )
        .unwrap();
        let f = MappedSafetensors::open(&p).unwrap();
        assert_eq!(f.names().unwrap(), vec!["a", "b"]);
        assert_eq!(f.metadata().unwrap(), meta);
        assert!(f.tensor("a").unwrap().equal(&a));
        let b2 = f.tensor("b").unwrap();
        assert_eq!(b2.kind(), Kind::BFloat16);
        assert!(b2.equal(&b));
    }

    #[test]
    fn from_bytes_reads_what_open_reads() {
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let bytes = serialize(&[("a".into(), a.shallow_clone())], &meta).unwrap();
        let f = MappedSafetensors::from_bytes(&bytes, Path::new("mem.safetensors")).unwrap();
        assert_eq!(f.names().unwrap(), vec!["a"]);
        assert_eq!(f.metadata().unwrap(), meta);
        assert!(f.tensor("a").unwrap().equal(&a));
        match MappedSafetensors::from_bytes(&bytes[..bytes.len() - 1], Path::new("mem")) {
            Err(Error::AdapterFormat { path, .. }) => assert_eq!(path, Path::new("mem")),
            Err(e) => panic!("expected AdapterFormat, got {e:?}"),
            Ok(_) => panic!("a truncated file parsed"),
        }
        assert!(matches!(
            MappedSafetensors::from_bytes(b"", Path::new("empty")),
            Err(Error::AdapterFormat { .. })
        ));
    }

    #[test]
    fn a_directory_is_an_io_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        std::fs::create_dir(&p).unwrap();
        match MappedSafetensors::open(&p) {
            Err(Error::Io { path, source }) => {
                assert_eq!(path, p);
                assert_eq!(source.kind(), std::io::ErrorKind::IsADirectory);
                assert!(source.to_string().contains("directory"), "{source}");
            }
            Err(e) => panic!("expected Error::Io, got {e:?}"),
            Ok(_) => panic!("a directory opened as a safetensors file"),
        }
    }

    #[test]
    fn truncated_file_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a = Tensor::randn([16, 16], (Kind::Float, Device::Cpu));
        save(&p, &[("a".into(), a)], &HashMap::new()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(
                matches!(
                    MappedSafetensors::open(&p),
                    Err(Error::AdapterFormat { .. })
                ),
                "cut {cut}"
            );
        }
    }
}
