//! Atomic file replacement: write a temporary file in the target's directory, flush it to disk,
//! then rename it over the target. A crash or a full disk mid-write leaves the old file intact.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// The name prefix of the temporary files.
pub const TEMP_PREFIX: &str = ".loratch-tmp-";

/// Deletes the temporary files that writes killed mid-way left in `dir` (none if it is missing).
/// Only for a directory that no other process is writing to.
pub fn remove_temp_files(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically (temp file + fsync + rename + directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// As [`write_atomic`], the contents streamed by `fill` into a buffered writer, for files too
/// large to assemble in memory first. When `fill` fails, the temporary file is removed and
/// `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(missing_dir(dir));
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    // Through the File: NamedTempFile's own errors would name the temporary file.
    let mut w = std::io::BufWriter::new(tmp.as_file_mut());
    fill(&mut w)?;
    w.flush().map_err(|e| Error::io(path, e))?;
    drop(w);
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // On failure the NamedTempFile is dropped and removed; the target is untouched.
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Why `dir` cannot hold files: an ancestor that is a file (not a directory), or it is missing.
fn missing_dir(dir: &Path) -> Error {
    let file_ancestor = dir.ancestors().find(|a| a.is_file());
    match file_ancestor {
        Some(f) => Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("not a directory: {} is a file", f.display()),
            ),
        ),
        None => Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "directory does not exist"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_fill_leaves_the_target_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, b"one").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half").unwrap();
            Err(Error::State("stopped".into()))
        });
        assert!(matches!(err, Err(Error::State(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftover_temp_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".loratch-tmp-abc123"), b"half").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"x").unwrap();
        remove_temp_files(dir.path()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")]);
        remove_temp_files(&dir.path().join("missing")).unwrap();
    }

    #[test]
    fn missing_directory_is_not_found() {
        let err = write_atomic(Path::new("/nonexistent-loratch-dir/x"), b"x").unwrap_err();
        match err {
            Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parent_that_is_a_file_is_not_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let err = write_atomic(&f.join("sub").join("x"), b"x").unwrap_err();
        match &err {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotADirectory)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
