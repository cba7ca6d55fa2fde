//! A repository in a local directory: one file per object, written to a
//! temp file, fsynced, renamed into place, and the directory fsynced.

use super::{Backend, Created, Entry, Error, Result, check_name};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn tmp_name(&self, path: &Path) -> PathBuf {
        path.with_file_name(format!(
            ".{}.tmp.{}.{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn parent_dirs(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(&self.root);
        if !dir.exists() {
            private_dirs(dir)?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        Ok(())
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
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        Ok(fs::read(self.path(name)?)?)
    }

    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
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
            Error::io(io::Error::new(
                e.kind(),
                format!("{name}: cannot read {len} bytes at {offset}: {e}"),
            ))
        })?;
        Ok(buf)
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        self.parent_dirs(&path)?;
        Ok(atomic_write(
            &path,
            data,
            self.seq.fetch_add(1, Ordering::Relaxed),
        )?)
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        let path = self.path(name)?;
        self.parent_dirs(&path)?;
        let tmp = self.tmp_name(&path);
        let res = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            // A hard link publishes the complete file, or fails if the
            // name is taken: atomic create.
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    sync_dir(path.parent().unwrap_or(&self.root))?;
                    Ok(Created::Yes)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Created::Existed),
                Err(e) => Err(e),
            }
        })();
        let _ = fs::remove_file(&tmp);
        Ok(res?)
    }

    fn put_ephemeral(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        if let Some(dir) = path.parent() {
            private_dirs(dir)?;
        }
        let tmp = self.tmp_name(&path);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(data)?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(e)
        })
    }

    fn delete_ephemeral(&self, name: &str) -> Result<()> {
        match fs::remove_file(self.path(name)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let base = self.path(prefix)?;
        let mut stack = vec![(base, String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
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
                let md = match ent.metadata() {
                    Ok(md) => md,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                if md.is_dir() {
                    stack.push((ent.path(), relname));
                } else {
                    out.push(Entry {
                        name: relname,
                        size: md.len(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn exists(&self, name: &str) -> Result<bool> {
        match fs::symlink_metadata(self.path(name)?) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(sync_dir(path.parent().unwrap_or(&self.root))?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_backend_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path());
        b.put("packs/ab/abcd", b"hello world").unwrap();
        b.put("snapshots/x", b"1").unwrap();
        assert_eq!(b.get("packs/ab/abcd").unwrap(), b"hello world");
        assert_eq!(b.get_range("packs/ab/abcd", 6, 5).unwrap(), b"world");
        assert!(b.get_range("packs/ab/abcd", 6, 6).is_err());
        let names: Vec<_> = b
            .list("packs")
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.size))
            .collect();
        assert_eq!(names, vec![("ab/abcd".to_string(), 11)]);
        assert!(b.exists("snapshots/x").unwrap());
        assert!(b.get("nothing/here").unwrap_err().is_not_found());
        assert!(b.get("../etc/passwd").is_err());
        assert_eq!(b.put_if_absent("locks/a", b"1").unwrap(), Created::Yes);
        assert_eq!(b.put_if_absent("locks/a", b"2").unwrap(), Created::Existed);
        assert_eq!(b.get("locks/a").unwrap(), b"1");
        b.delete("snapshots/x").unwrap();
        b.delete("snapshots/x").unwrap();
        assert!(!b.exists("snapshots/x").unwrap());
        assert!(b.list("snapshots").unwrap().is_empty());
        assert!(b.list("nothing").unwrap().is_empty());
    }
}
