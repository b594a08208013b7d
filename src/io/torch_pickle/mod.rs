//! `torch.save` files holding a flat `dict[str, Tensor]` (the legacy PEFT `adapter_model.bin`),
//! in PyTorch's zip serialization format (torch >= 1.6, `_use_new_zipfile_serialization=True`:
//! `<archive>/data.pkl`, `<archive>/data/<key>`, `byteorder`, `version`). Reading runs a small
//! pickle interpreter that only understands the opcodes and the handful of allow-listed globals
//! a state dict needs; nothing from the file is ever imported or executed.
mod encode;
mod pickle;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use encode::Entry;
use pickle::StateDict;
use std::io::{Cursor, Read, Write};
use std::path::Path;
use tch::{Kind, Tensor};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipArchive, ZipWriter};

/// Writes `tensors` to `path` as `torch.save` would (loadable with `torch.load(path,
/// weights_only=True)`, also with `mmap=True`). Each tensor gets its own storage (a contiguous
/// CPU copy); records are 64-byte aligned. The file is replaced atomically.
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_state_dict_with(path, tensors, &[])
}

/// [`write_state_dict`] with `extra` records (`<archive>/<name>`, e.g. an adapter's config as
/// JSON) beside the tensors: `torch.load` reads only the records the pickle names and ignores
/// them; [`read_extra_record`] reads them back.
pub fn write_state_dict_with(
    path: &Path,
    tensors: &[(String, Tensor)],
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut records: Vec<(String, Vec<u8>)> = Vec::with_capacity(tensors.len() + 3);
    let mut seen = std::collections::HashSet::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        if !seen.insert(name.as_str()) {
            return Err(Error::Config(format!("duplicate tensor name {name:?}")));
        }
        let kind = t.f_kind()?;
        let class = pickle::storage_class(kind).ok_or_else(|| {
            Error::Dtype(format!(
                "tensor {name}: cannot save {kind:?} in a torch.save file"
            ))
        })?;
        let size = t.size();
        // Row-major strides as torch computes them (a 0-sized dim counts as 1).
        let mut stride = Vec::with_capacity(size.len());
        let mut acc = Some(1i64);
        for &n in size.iter().rev() {
            stride.push(acc.ok_or_else(|| Error::Shape(format!("tensor {name}: too large")))?);
            acc = acc.and_then(|a| a.checked_mul(n.max(1)));
        }
        stride.reverse();
        let bytes = crate::io::safetensors::tensor_bytes(t)?;
        let numel = (bytes.len() / kind.elt_size_in_bytes()) as i64;
        let key = i.to_string();
        records.push((format!("data/{key}"), bytes));
        entries.push(Entry {
            name,
            class,
            key,
            numel,
            size,
            stride,
        });
    }
    records.insert(0, ("data.pkl".into(), encode::encode(&entries)));
    records.insert(1, ("byteorder".into(), b"little".to_vec()));
    for (name, data) in extra {
        if matches!(*name, "data.pkl" | "byteorder" | "version") || name.starts_with("data/") {
            return Err(Error::Config(format!(
                "extra record name {name:?} is reserved"
            )));
        }
        records.push(((*name).to_owned(), data.clone()));
    }
    records.push(("version".into(), b"3\n".to_vec()));
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("archive");
    let bytes = zip_records(archive, &records)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    crate::io::atomic::write_atomic(path, &bytes)
}

/// A STORED zip of `<archive>/<name>` records, each record's data 64-byte aligned.
fn zip_records(archive: &str, records: &[(String, Vec<u8>)]) -> zip::result::ZipResult<Vec<u8>> {
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data) in records {
        let opts = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .last_modified_time(DateTime::default())
            .with_alignment(64)
            .large_file(data.len() as u64 >= u64::from(u32::MAX));
        w.start_file(format!("{archive}/{name}"), opts)?;
        w.write_all(data)?;
    }
    Ok(w.finish()?.into_inner())
}

/// Reads a `torch.save` file holding a flat dict of tensors, in file order. Tensors are CPU
/// views of their storages (offsets, strides and shared storages are kept, as `torch.load`
/// does); `requires_grad` is dropped.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_state_dict(&bytes, path)
}

/// As [`read_state_dict`], for the bytes of a file; `path` only names them in errors.
pub fn parse_state_dict(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_bytes(bytes).map_err(|e| match e {
        ReadError::Msg(msg) => Error::adapter(path, msg),
        ReadError::Torch(e) => Error::Torch(e),
    })
}

/// The extra record `name` of a `torch.save` file written by [`write_state_dict_with`], if it
/// has one (at most `max` bytes).
pub fn read_extra_record(path: &Path, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let Ok(mut zip) = ZipArchive::new(Cursor::new(bytes.as_slice())) else {
        return Ok(None);
    };
    let Some(prefix) = zip
        .name_for_index(0)
        .and_then(|n| n.split_once('/'))
        .map(|(p, _)| p.to_owned())
    else {
        return Ok(None);
    };
    let full = format!("{prefix}/{name}");
    if zip.index_for_name(&full).is_none() {
        return Ok(None);
    }
    read_record(&mut zip, &full, max)
        .map(Some)
        .map_err(|m| Error::adapter(path, m))
}

/// A read failure: a format problem (-> [`Error::AdapterFormat`]) or a libtorch error.
enum ReadError {
    Msg(String),
    Torch(tch::TchError),
}

impl From<String> for ReadError {
    fn from(s: String) -> Self {
        ReadError::Msg(s)
    }
}

impl From<&str> for ReadError {
    fn from(s: &str) -> Self {
        ReadError::Msg(s.into())
    }
}

impl From<tch::TchError> for ReadError {
    fn from(e: tch::TchError) -> Self {
        ReadError::Torch(e)
    }
}

type Archive<'a> = ZipArchive<Cursor<&'a [u8]>>;

/// Reads record `name`, failing if it holds more than `max` bytes.
fn read_record(zip: &mut Archive, name: &str, max: u64) -> std::result::Result<Vec<u8>, String> {
    let f = zip
        .by_name(name)
        .map_err(|e| format!("record {name}: {e}"))?;
    let mut buf = Vec::new();
    f.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| format!("record {name}: {e}"))?;
    if buf.len() as u64 > max {
        return Err(format!(
            "record {name} is larger than expected ({max} bytes)"
        ));
    }
    Ok(buf)
}

fn read_bytes(bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, ReadError> {
    if bytes.starts_with(b"\x80\x02\x8a\x0a") {
        return Err("legacy (pre-zip) torch.save format is not supported".into());
    }
    let mut zip = ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a torch.save zip archive: {e}"))?;
    // Like torch: every record lives in the folder of the first entry.
    let first = zip.name_for_index(0).ok_or("empty zip archive")?;
    let prefix = match first.split_once('/') {
        Some((p, _)) if !p.is_empty() => p.to_string(),
        _ => return Err(format!("zip entry {first:?} is not inside an archive folder").into()),
    };
    if zip.index_for_name(&format!("{prefix}/byteorder")).is_some() {
        let order = read_record(&mut zip, &format!("{prefix}/byteorder"), 16)?;
        if order != b"little" {
            let order = String::from_utf8_lossy(&order).into_owned();
            return Err(format!("byteorder {order:?} is not supported").into());
        }
    }
    // Deflate expands at most ~1032x, so this only bounds malicious records.
    let cap = (bytes.len() as u64).saturating_mul(1100);
    let pkl = read_record(&mut zip, &format!("{prefix}/data.pkl"), cap)?;
    let StateDict {
        storages,
        tensors,
        entries,
    } = pickle::parse(&pkl)?;
    let mut loaded: Vec<Option<Tensor>> = storages.iter().map(|_| None).collect();
    let mut out = Vec::with_capacity(entries.len());
    for (name, ti) in entries {
        let t = tensors.get(ti).ok_or("internal: tensor index")?;
        let (s, slot) = storages
            .iter()
            .zip(loaded.iter_mut())
            .nth(t.storage)
            .ok_or("bad storage")?;
        if slot.is_none() {
            *slot = Some(load_storage(&mut zip, &prefix, s)?);
        }
        let base = slot.as_ref().ok_or("internal: storage")?;
        out.push((
            name,
            base.f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?,
        ));
    }
    Ok(out)
}

fn load_storage(
    zip: &mut Archive,
    prefix: &str,
    s: &pickle::StorageRef,
) -> Result<Tensor, ReadError> {
    let elt = s.kind.elt_size_in_bytes() as u64;
    let nbytes = (s.numel as u64)
        .checked_mul(elt)
        .ok_or_else(|| format!("storage {} is too large", s.key))?;
    let name = format!("{prefix}/data/{}", s.key);
    let data = read_record(zip, &name, nbytes)?;
    if data.len() as u64 != nbytes {
        let msg = format!(
            "record {name} holds {} bytes, expected {nbytes}",
            data.len()
        );
        return Err(msg.into());
    }
    if s.kind == Kind::Bool && data.iter().any(|&b| b > 1) {
        return Err(format!("record {name}: bool storage holds values other than 0/1").into());
    }
    Ok(Tensor::f_from_data_size(&data, &[s.numel], s.kind)?)
}
