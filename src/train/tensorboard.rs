//! TensorBoard event files (`report_to = ["tensorboard"]`): the metrics log's records as scalar
//! summaries in `output_dir/runs/{date}_{host}/` (a directory per run or resume, as Hugging
//! Face's trainer names them), where `tensorboard --logdir OUTPUT_DIR/runs` finds them.
//!
//! The format is TensorFlow's TFRecord of `Event` protobufs: each record is the payload's length
//! (u64, little-endian), the masked CRC-32C of those 8 bytes, the payload, and its masked CRC-32C.
//! The first event carries `file_version = "brain.Event:2"`, the others a `Summary` of
//! `(tag, simple_value)` pairs. The five protobuf fields used are encoded here by hand: prost
//! would bring a code generator (and protoc or vendored .proto files) for a dozen lines.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// The directory under `output_dir` that holds the event files (Hugging Face's default).
pub const RUNS_DIR: &str = "runs";

/// The `report_to` values loratch knows.
pub const REPORTERS: &[&str] = &["tensorboard", "none"];

/// Checks `report_to` (the names of [`REPORTERS`]) and says whether TensorBoard is among them.
pub fn wants_tensorboard(report_to: &[String]) -> Result<bool> {
    for name in report_to {
        if !REPORTERS.contains(&name.as_str()) {
            return Err(Error::Config(format!(
                "training.report_to: unknown reporter {name:?} (known: {})",
                REPORTERS.join(", ")
            )));
        }
    }
    Ok(report_to.iter().any(|n| n == "tensorboard"))
}

/// An event file being written; every call appends whole records and flushes them, so a killed
/// run leaves a file TensorBoard reads up to its last complete record.
pub struct EventWriter {
    path: PathBuf,
    file: fs::File,
}

impl EventWriter {
    /// Creates a run directory in `runs` (`{Mon}{DD}_{HH}-{MM}-{SS}_{host}`, local time) and a
    /// new event file in it, named as TensorFlow names them
    /// (`events.out.tfevents.{seconds}.{host}.{pid}.{n}`), and writes its header event.
    pub fn create(runs: &Path) -> Result<Self> {
        static FILES: AtomicU64 = AtomicU64::new(0);
        let now = wall_time();
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let dir = runs.join(format!(
            "{}_{host}",
            chrono::Local::now().format("%b%d_%H-%M-%S")
        ));
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = format!(
            "events.out.tfevents.{}.{host}.{}.{}",
            now as u64,
            std::process::id(),
            FILES.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = Self { path, file };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_varint_field(&mut event, 2, 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.append(&event)?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event at `step` holding a scalar per `(tag, value)` (float32, as TensorBoard
    /// stores them).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_key(&mut v, 2, 5);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.append(&event)
    }

    fn append(&mut self, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(payload.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(payload);
        record.extend_from_slice(&masked_crc(payload).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TFRecord's checksum: CRC-32C rotated and offset, as TensorFlow masks it (a CRC of data that
/// holds CRCs is otherwise weak).
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field's key: its number and wire type (0 varint, 1 fixed 64-bit, 2 bytes, 5 fixed 32-bit).
fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_and_varints_match_tensorflow() {
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value); the mask rotates it
        // right by 15 and adds 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut f = Vec::new();
        put_bytes(&mut f, 5, b"ab");
        assert_eq!(f, [0x2a, 2, b'a', b'b']);
    }

    #[test]
    fn records_frame_their_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join(RUNS_DIR)).unwrap();
        w.scalars(7, &[("train/loss", 1.5)]).unwrap();
        let bytes = fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut payloads = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(&bytes[at..at + 8]));
            let payload = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(payload));
            payloads.push(payload.to_vec());
            at += 16 + len;
        }
        assert_eq!(payloads.len(), 2);
        assert!(payloads[0].ends_with(b"\x1a\x0dbrain.Event:2"));
        // step 7, then the summary: one value with its tag and float 1.5.
        let mut tail = vec![0x10, 7, 0x2a, 19, 0x0a, 17, 0x0a, 10];
        tail.extend_from_slice(b"train/loss");
        tail.push(0x15);
        tail.extend_from_slice(&1.5f32.to_le_bytes());
        assert!(payloads[1].ends_with(&tail), "{:?}", payloads[1]);
        assert!(wants_tensorboard(&["tensorboard".into()]).unwrap());
        assert!(!wants_tensorboard(&[]).unwrap());
        let e = wants_tensorboard(&["wandb".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"wandb\"") && e.contains("tensorboard, none"),
            "{e}"
        );
    }
}
