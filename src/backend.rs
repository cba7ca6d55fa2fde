//! Storage behind a small trait, so a local directory today and an object
//! store later are interchangeable, and tests can wrap it to inject faults.
//!
//! Every object is immutable once written and named by the caller; `write`
//! must be atomic and durable: after it returns the object is complete on
//! stable storage, and a crash during it leaves either nothing or the whole
//! object under its name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Object storage used by a repository. Names are `/`-separated relative
/// paths such as `snapshots/<hex>` or `packs/ab/<hex>`.
pub trait Backend: Send + Sync {
    /// Read a whole object.
    ///
    /// # Errors
    /// `NotFound` when absent, any I/O error otherwise.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Read `len` bytes at `offset`; short objects are an error.
    ///
    /// # Errors
    /// As [`Backend::read`], plus `UnexpectedEof` on a short object.
    fn read_range(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Store an object atomically and durably, replacing any previous one.
    ///
    /// # Errors
    /// Any I/O error; on error no partial object is visible under `name`.
    fn write(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Store a short-lived object (a lock) atomically but without forcing
    /// it to stable storage: after a power cut it may be gone, which is
    /// right for a lock whose holder died too.
    ///
    /// # Errors
    /// As [`Backend::write`].
    fn write_ephemeral(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.write(name, data)
    }
    /// Delete a short-lived object without syncing the directory.
    ///
    /// # Errors
    /// As [`Backend::remove`].
    fn remove_ephemeral(&self, name: &str) -> io::Result<()> {
        self.remove(name)
    }
    /// Names of all objects under `prefix` (recursively), relative to it.
    ///
    /// # Errors
    /// I/O errors other than a missing prefix (which lists as empty).
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// Delete an object; deleting a missing object is not an error.
    ///
    /// # Errors
    /// Any I/O error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Size of an object.
    ///
    /// # Errors
    /// `NotFound` when absent.
    fn size(&self, name: &str) -> io::Result<u64>;
}

/// A repository in a local directory.
pub struct LocalBackend {
    root: PathBuf,
    seq: AtomicU64,
    handles: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<File>>>,
}

impl LocalBackend {
    /// Use `root` as the repository directory (it must exist).
    pub fn new(root: &Path) -> LocalBackend {
        LocalBackend {
            root: root.to_path_buf(),
            seq: AtomicU64::new(0),
            handles: Default::default(),
        }
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        if name.is_empty()
            || name.starts_with('/')
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid object name {name:?}"),
            ));
        }
        Ok(self.root.join(name))
    }
}

/// Create `dir` and missing parents, each `0700` (repository directories are
/// root's alone on a local backend).
///
/// # Errors
/// Any I/O error.
pub fn private_dirs(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Tighten an existing local repository made before repositories were
/// private: every directory `0700`, every file `0600`. Cheap when the root
/// is already private (nothing is walked).
///
/// # Errors
/// A chmod failed.
pub fn make_private(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = fs::symlink_metadata(root)?;
    if md.mode() & 0o077 == 0 {
        return Ok(());
    }
    let mut stack = vec![root.to_path_buf()];
    let mut dirs = Vec::new();
    while let Some(d) = stack.pop() {
        for ent in fs::read_dir(&d)? {
            let ent = ent?;
            let ft = ent.file_type()?;
            if ft.is_dir() {
                stack.push(ent.path());
            } else if ft.is_file() {
                fs::set_permissions(ent.path(), fs::Permissions::from_mode(0o600))?;
            }
        }
        dirs.push(d);
    }
    // The root last: its mode is what says the walk finished.
    for d in dirs.iter().rev() {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// fsync a directory so a rename or create inside it is durable.
///
/// # Errors
/// Opening or syncing the directory failed.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `path` atomically: temp file in the same directory, fsync,
/// rename, fsync of the directory.
///
/// # Errors
/// Any I/O error; the temp file is removed on failure.
pub fn atomic_write(path: &Path, data: &[u8], tmp_tag: u64) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{tmp_tag}",
        rustix::process::getpid().as_raw_nonzero()
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

impl Backend for LocalBackend {
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(name)?)
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        // Objects are immutable, so open handles are reused: a restore
        // reads many blobs from few packs.
        let f = {
            let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            match h.get(name) {
                Some(f) => f.clone(),
                None => {
                    let f = std::sync::Arc::new(File::open(self.path(name)?)?);
                    if h.len() >= 256 {
                        h.clear();
                    }
                    h.insert(name.to_string(), f.clone());
                    f
                }
            }
        };
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{name}: cannot read {len} bytes at {offset}: {e}"),
            )
        })?;
        Ok(buf)
    }

    fn write(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(name)?;
        let dir = path.parent().unwrap_or(&self.root);
        if !dir.exists() {
            private_dirs(dir)?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        atomic_write(&path, data, self.seq.fetch_add(1, Ordering::Relaxed))
    }

    fn write_ephemeral(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(name)?;
        if let Some(dir) = path.parent() {
            private_dirs(dir)?;
        }
        let tmp = path.with_file_name(format!(
            ".{}.tmp.{}.{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(data)?;
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    fn remove_ephemeral(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.path(name)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let base = self.path(prefix)?;
        let mut stack = vec![(base, String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for ent in rd {
                let ent = ent?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // temp files of writes in progress
                }
                let relname = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                if ent.file_type()?.is_dir() {
                    stack.push((ent.path(), relname));
                } else {
                    out.push(relname);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let path = self.path(name)?;
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn size(&self, name: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.path(name)?)?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_backend_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path());
        b.write("packs/ab/abcd", b"hello world").unwrap();
        b.write("snapshots/x", b"1").unwrap();
        assert_eq!(b.read("packs/ab/abcd").unwrap(), b"hello world");
        assert_eq!(b.read_range("packs/ab/abcd", 6, 5).unwrap(), b"world");
        assert!(b.read_range("packs/ab/abcd", 6, 6).is_err());
        assert_eq!(b.list("packs").unwrap(), vec!["ab/abcd".to_string()]);
        assert_eq!(b.size("snapshots/x").unwrap(), 1);
        assert!(b.read("../etc/passwd").is_err());
        b.remove("snapshots/x").unwrap();
        b.remove("snapshots/x").unwrap();
        assert!(b.list("snapshots").unwrap().is_empty());
        assert!(b.list("nothing").unwrap().is_empty());
    }
}
