//! The output directory's lock: one run at a time writes into an `output_dir`.
//!
//! A run holds an exclusive `flock` on `output_dir/.loratch.lock` (which holds its pid) from its
//! start to its end, so a second run into the same directory fails at once instead of
//! interleaving checkpoints with the first and overwriting its `metrics.jsonl`. The kernel drops
//! an `flock` when its holder dies, so the file a killed run leaves behind blocks nobody; a run
//! that ends deletes it.
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The lock file in the output directory.
pub const LOCK_FILE: &str = ".loratch.lock";

/// An exclusive lock on an output directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct OutputDirLock {
    /// Held open: the lock lasts as long as this open file.
    _file: fs::File,
    path: PathBuf,
    /// The directories [`OutputDirLock::acquire`] created, deepest first: removed again on release
    /// if nothing else was written into them, as a run that fails in setup leaves no trace.
    created: Vec<PathBuf>,
}

impl OutputDirLock {
    /// Creates `dir` if needed and locks it for this process.
    ///
    /// Errors: [`Error::State`] naming the holder's pid when another run (in this process or
    /// another) holds the lock; [`Error::Io`] when `dir` is a file or it or the lock file cannot
    /// be created.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        if dir.exists() && !dir.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory");
            return Err(Error::io(dir, e));
        }
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = loop {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            if !sys::try_lock(&file).map_err(|e| Error::io(&path, e))? {
                return Err(held_by(dir, file));
            }
            // The run before us deletes the file on release: if it did so between our open and
            // our lock, we hold a file no one else will open; lock the new one instead.
            if sys::is_at(&file, &path) {
                break file;
            }
        };
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            _file: file,
            path,
            created,
        })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputDirLock {
    fn drop(&mut self) {
        // Deleted while still locked (the file closes after this), so the next run either
        // opened it before and retries, or creates a new one.
        let _ = fs::remove_file(&self.path);
        for dir in &self.created {
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// The error for a lock held by another run: names its pid (the holder writes it just after
/// locking, so an empty file is read again for a moment).
fn held_by(dir: &Path, mut file: fs::File) -> Error {
    let mut pid = String::new();
    for _ in 0..50 {
        pid.clear();
        let read = file
            .rewind()
            .and_then(|()| file.read_to_string(&mut pid).map(|_| ()));
        if read.is_ok() && !pid.trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = pid.trim();
    let holder = if pid.is_empty() {
        "pid unknown".to_string()
    } else if pid == std::process::id().to_string() {
        format!("pid {pid}, this process")
    } else {
        format!("pid {pid}")
    };
    Error::State(format!(
        "output_dir {} is in use by another loratch run ({holder}; lock file {}): wait for it \
         to end or use another output_dir",
        dir.display(),
        dir.join(LOCK_FILE).display()
    ))
}

#[cfg(unix)]
mod sys {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    use std::path::Path;

    /// Takes an exclusive `flock` on `file` without waiting: false when another open file holds
    /// it. A file system without `flock` support is treated as locked by us (no lock beats no
    /// training).
    pub fn try_lock(file: &File) -> std::io::Result<bool> {
        // SAFETY: flock on a file descriptor that `file` keeps open; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(false),
            Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => Ok(true),
            _ => Err(e),
        }
    }

    /// Whether `path` still names the open `file`.
    pub fn is_at(file: &File, path: &Path) -> bool {
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
}

#[cfg(not(unix))]
mod sys {
    use std::fs::File;
    use std::path::Path;

    /// No `flock` here: runs are not kept apart.
    pub fn try_lock(_file: &File) -> std::io::Result<bool> {
        Ok(true)
    }

    pub fn is_at(_file: &File, _path: &Path) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_nothing_left_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a").join("out");
        let lock = OutputDirLock::acquire(&out).unwrap();
        assert_eq!(
            fs::read_to_string(lock.path()).unwrap(),
            std::process::id().to_string()
        );
        // Cleaning up after a killed run leaves the lock alone.
        assert!(!LOCK_FILE.starts_with(crate::io::atomic::TEMP_PREFIX));
        crate::train::checkpoint::recover(&out).unwrap();
        assert!(lock.path().is_file());
        // flock locks belong to the open file: a second acquire in this process is refused too.
        let e = OutputDirLock::acquire(&out).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::State(_)), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains(LOCK_FILE),
            "{msg}"
        );
        drop(lock);
        // The directories it created, empty again, are gone.
        assert!(!dir.path().join("a").exists());

        // A lock file left by a dead holder (no flock on it) is taken over.
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join(LOCK_FILE), "999999999").unwrap();
        let lock = OutputDirLock::acquire(&out).unwrap();
        assert_eq!(
            fs::read_to_string(lock.path()).unwrap(),
            std::process::id().to_string()
        );
        fs::write(out.join("metrics.jsonl"), "").unwrap();
        drop(lock);
        assert!(!out.join(LOCK_FILE).exists() && out.join("metrics.jsonl").is_file());

        let file = dir.path().join("a-file");
        fs::write(&file, "x").unwrap();
        let e = OutputDirLock::acquire(&file).unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotADirectory),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_on_a_deleted_file_is_not_a_lock() {
        // The first holder deletes the file on release; a run that opened it just before holds
        // an orphan, and must lock the file at the path instead.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let orphan = fs::File::create(&path).unwrap();
        fs::remove_file(&path).unwrap();
        assert!(sys::try_lock(&orphan).unwrap());
        assert!(!sys::is_at(&orphan, &path));
        let lock = OutputDirLock::acquire(dir.path()).unwrap();
        assert!(sys::is_at(&lock._file, &path));
    }
}
