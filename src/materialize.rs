//! Manifests → directories: restore of a merged view into a target, and
//! materialization of one layer as an overlay lowerdir (whiteouts as 0/0
//! character devices, opaque directories marked).
//!
//! Nothing is ever written outside the target, whatever a manifest says:
//! paths are validated, every parent is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the target's fd,
//! and entries are created with `O_EXCL` / `*at` calls that do not follow
//! symlinks. Each path is written once, from the layer that owns it, so
//! the cost follows the size of the result.

use crate::layer::{Chunk, Entry, Node, path_is_safe, show};
use crate::repo::Repo;
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How entries are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// A plain directory tree (restore). Whiteouts must not appear.
    Plain,
    /// An overlay lowerdir: whiteouts become 0/0 character devices and
    /// opaque directories get `trusted.overlay.opaque=y`.
    Lowerdir,
}

/// One entry to write, with its hard-link identity across the chain.
pub struct Item<'a> {
    /// The entry.
    pub entry: &'a Entry,
    /// (layer, group) for hard-linked entries.
    pub link: Option<(usize, u32)>,
}

/// Counters of a restore.
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    /// Entries written.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

/// One unit of restore work: a file index, a run of (offset, chunk), and
/// whether the run is the whole file.
type WriteTask<'a> = (usize, Vec<(u64, &'a Chunk)>, bool);

/// Chunks (about 1 MiB each) written by one task: big files are restored by
/// several threads at once.
const CHUNKS_PER_TASK: usize = 8;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

fn os(p: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(p)
}

struct Writer<'a> {
    root: OwnedFd,
    root_path: &'a Path,
    as_root: bool,
    cached: Option<(Vec<u8>, OwnedFd)>,
}

impl Writer<'_> {
    fn open_dir(&self, rel: &[u8]) -> Result<OwnedFd> {
        let p = if rel.is_empty() { b".".as_slice() } else { rel };
        rustix::fs::openat2(
            &self.root,
            os(p),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )
        .with_context(|| {
            format!(
                "refusing to write below {}: it is not a directory inside the target",
                show(rel)
            )
        })
    }

    fn parent(&mut self, rel: &[u8]) -> Result<&OwnedFd> {
        if self.cached.as_ref().is_none_or(|(p, _)| p != rel) {
            let fd = self.open_dir(rel)?;
            self.cached = Some((rel.to_vec(), fd));
        }
        Ok(&self.cached.as_ref().expect("just set").1)
    }

    fn open_file(&self, rel: &[u8]) -> Result<std::fs::File> {
        let fd = rustix::fs::openat2(
            &self.root,
            os(rel),
            OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )
        .with_context(|| format!("cannot reopen {}", show(rel)))?;
        Ok(std::fs::File::from(fd))
    }
}

fn ts(secs: i64, ns: u32) -> Timestamps {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: ns.min(999_999_999) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn set_xattrs_path(path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)], as_root: bool) -> Result<()> {
    for (k, v) in xattrs {
        if let Err(e) = rustix::fs::lsetxattr(path, os(k), v, rustix::fs::XattrFlags::empty()) {
            if !as_root && matches!(e, rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP) {
                continue; // trusted.* / security.* need root; documented
            }
            return Err(e).with_context(|| {
                format!(
                    "cannot set xattr {} on {}",
                    String::from_utf8_lossy(k),
                    path.display()
                )
            });
        }
    }
    Ok(())
}

/// The xattrs to write: in a plain directory, the user's own
/// `trusted.overlay.X` (stored escaped as `trusted.overlay.overlay.X`, as
/// the kernel keeps it in an upperdir) is written back unescaped; in a
/// lowerdir the escaped form is what overlay expects.
fn user_xattrs(x: &[(Vec<u8>, Vec<u8>)], target: Target) -> Vec<(Vec<u8>, Vec<u8>)> {
    const ESC: &[u8] = b"trusted.overlay.overlay.";
    x.iter()
        .map(|(k, v)| match k.strip_prefix(ESC) {
            Some(rest) if target == Target::Plain => {
                let mut n = b"trusted.overlay.".to_vec();
                n.extend_from_slice(rest);
                (n, v.clone())
            }
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

fn proc_path(dir: &OwnedFd, name: &[u8]) -> std::path::PathBuf {
    use rustix::fd::AsRawFd;
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(os(name))
}

/// Metadata for a non-directory, non-regular entry, by name in its parent.
fn apply_meta_at(
    dir: &OwnedFd,
    name: &[u8],
    e: &Entry,
    as_root: bool,
    target: Target,
) -> Result<()> {
    let m = &e.meta;
    if as_root {
        rustix::fs::chownat(
            dir,
            os(name),
            Some(rustix::fs::Uid::from_raw(m.uid)),
            Some(rustix::fs::Gid::from_raw(m.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("cannot chown {}", show(&e.path)))?;
    }
    set_xattrs_path(
        &proc_path(dir, name),
        &user_xattrs(&m.xattrs, target),
        as_root,
    )?;
    if !matches!(e.node, Node::Symlink { .. }) {
        rustix::fs::chmodat(dir, os(name), Mode::from_raw_mode(m.mode), AtFlags::empty())
            .with_context(|| format!("cannot chmod {}", show(&e.path)))?;
    }
    rustix::fs::utimensat(
        dir,
        os(name),
        &ts(m.mtime, m.mtime_ns),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("cannot set times of {}", show(&e.path)))?;
    Ok(())
}

/// Metadata of a directory or regular file through an open fd.
fn apply_meta_fd(fd: impl AsFd, e: &Entry, as_root: bool, target: Target) -> Result<()> {
    let fd = fd.as_fd();
    let m = &e.meta;
    if as_root {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(m.uid)),
            Some(rustix::fs::Gid::from_raw(m.gid)),
        )
        .with_context(|| format!("cannot chown {}", show(&e.path)))?;
    }
    let mut xattrs = user_xattrs(&m.xattrs, target);
    if target == Target::Lowerdir && matches!(e.node, Node::Dir { opaque: true }) {
        xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
    }
    for (k, v) in &xattrs {
        if let Err(err) = rustix::fs::fsetxattr(fd, os(k), v, rustix::fs::XattrFlags::empty()) {
            if !as_root && matches!(err, rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP) {
                continue;
            }
            return Err(err).with_context(|| {
                format!(
                    "cannot set xattr {} on {}",
                    String::from_utf8_lossy(k),
                    show(&e.path)
                )
            });
        }
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(m.mode))
        .with_context(|| format!("cannot chmod {}", show(&e.path)))?;
    rustix::fs::futimens(fd, &ts(m.mtime, m.mtime_ns))
        .with_context(|| format!("cannot set times of {}", show(&e.path)))?;
    Ok(())
}

/// Check that `target` is missing or an empty directory, and create it.
///
/// # Errors
/// It is a non-empty directory or not a directory.
pub fn prepare_target(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(md) if md.is_dir() => {
            if std::fs::read_dir(target)?.next().is_some() {
                bail!(
                    "restore target {} is not empty: give a new or empty directory",
                    target.display()
                );
            }
            Ok(())
        }
        Ok(_) => bail!(
            "restore target {} exists and is not a directory: give a new or empty directory",
            target.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(target)
            .with_context(|| format!("cannot create {}", target.display())),
        Err(e) => Err(e).with_context(|| format!("cannot access {}", target.display())),
    }
}

/// Write `items` (sorted by path, parents before children, the root entry
/// optional) into the existing directory `target`.
///
/// # Errors
/// Unsafe paths, refused writes, missing or corrupt blobs, I/O errors.
pub fn write_tree(
    repo: &Repo,
    target: &Path,
    items: &[Item<'_>],
    mode: Target,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Stats> {
    let root = rustix::fs::open(
        target,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", target.display()))?;
    let mut w = Writer {
        root,
        root_path: target,
        as_root: rustix::process::geteuid().is_root(),
        cached: None,
    };
    let mut stats = Stats::default();
    let mut first_link: HashMap<(usize, u32), &[u8]> = HashMap::new();
    let mut files: Vec<&Entry> = Vec::new();
    let mut dirs: Vec<&Entry> = Vec::new();
    if let Some(p) = progress {
        p.set_length(
            items
                .iter()
                .map(|i| match &i.entry.node {
                    Node::File { size, .. } if i.link.is_none_or(|_| true) => *size,
                    _ => 0,
                })
                .sum(),
        );
    }
    // Pass 1: the structure, sequentially (parents before children).
    for it in items {
        let e = it.entry;
        if !path_is_safe(&e.path) {
            bail!(
                "refusing manifest entry with unsafe path {:?}",
                show(&e.path)
            );
        }
        stats.entries += 1;
        if e.path.is_empty() {
            dirs.push(e);
            continue;
        }
        let (par, name) = split(&e.path);
        if let Some(key) = it.link
            && let Some(first) = first_link.get(&key)
        {
            let (fpar, fname) = split(first);
            let fdir = w.open_dir(fpar)?;
            let pdir = w.parent(par)?;
            rustix::fs::linkat(&fdir, os(fname), pdir, os(name), AtFlags::empty())
                .with_context(|| format!("cannot hard-link {}", show(&e.path)))?;
            continue;
        }
        if let Some(key) = it.link {
            first_link.insert(key, &e.path);
        }
        let as_root = w.as_root;
        let pdir = w.parent(par)?;
        let mk = |ft: FileType, rdev: u64| {
            rustix::fs::mknodat(pdir, os(name), ft, Mode::from_raw_mode(0o600), rdev)
        };
        let res = match &e.node {
            Node::Dir { .. } => rustix::fs::mkdirat(pdir, os(name), Mode::from_raw_mode(0o700))
                .map(|_| {
                    dirs.push(e);
                }),
            Node::File { size, .. } => {
                let fd = rustix::fs::openat(
                    pdir,
                    os(name),
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                );
                fd.and_then(|fd| {
                    rustix::fs::ftruncate(&fd, *size)?;
                    files.push(e);
                    Ok(())
                })
            }
            Node::Symlink { target } => rustix::fs::symlinkat(os(target), pdir, os(name)),
            Node::Fifo => mk(FileType::Fifo, 0),
            Node::Socket => mk(FileType::Socket, 0),
            Node::CharDev { rdev } => mk(FileType::CharacterDevice, *rdev),
            Node::BlockDev { rdev } => mk(FileType::BlockDevice, *rdev),
            Node::Whiteout if mode == Target::Lowerdir => mk(FileType::CharacterDevice, 0),
            Node::Whiteout => bail!(
                "internal error: whiteout {} in a merged view",
                show(&e.path)
            ),
        };
        if let Err(err) = res {
            if err == rustix::io::Errno::PERM
                && matches!(e.node, Node::CharDev { .. } | Node::BlockDev { .. })
            {
                bail!(
                    "cannot create device node {}: restoring devices needs root",
                    show(&e.path)
                );
            }
            return Err(err).with_context(|| format!("cannot create {}", show(&e.path)));
        }
        if !matches!(e.node, Node::Dir { .. } | Node::File { .. }) {
            apply_meta_at(pdir, name, e, as_root, mode)?;
        }
    }
    drop(w.cached.take());
    crate::failpoint::hit("restore-structure")?;
    // Pass 2: file data, in parallel across files and, for big files,
    // across runs of chunks within the file; small files get their metadata
    // in the same task (one open), big ones in pass 2b.
    // (file, its chunks with offsets, whether this task has the whole file)
    let mut tasks: Vec<WriteTask<'_>> = Vec::new();
    for (i, e) in files.iter().enumerate() {
        let mut pieces: Vec<(u64, &Chunk)> = Vec::new();
        if let Node::File { extents, .. } = &e.node {
            for x in extents {
                let mut off = x.offset;
                for c in &x.chunks {
                    pieces.push((off, c));
                    off += c.len as u64;
                }
            }
        }
        if pieces.len() <= CHUNKS_PER_TASK {
            tasks.push((i, pieces, true));
        } else {
            for run in pieces.chunks(CHUNKS_PER_TASK) {
                tasks.push((i, run.to_vec(), false));
            }
        }
    }
    let write_run = |e: &Entry, f: &std::fs::File, run: &[(u64, &Chunk)]| -> Result<u64> {
        let mut n = 0;
        for (off, c) in run {
            let data = repo
                .read_blob(&c.id)
                .with_context(|| format!("restoring {}", show(&e.path)))?;
            if data.len() != c.len as usize {
                bail!("chunk length mismatch in {}", show(&e.path));
            }
            f.write_all_at(&data, *off)
                .with_context(|| format!("cannot write {}", show(&e.path)))?;
            n += c.len as u64;
            if let Some(p) = progress {
                p.inc(c.len as u64);
            }
        }
        Ok(n)
    };
    let bytes: u64 = tasks
        .par_iter()
        .map(|(i, run, whole)| -> Result<u64> {
            let e = files[*i];
            let f = w.open_file(&e.path)?;
            let n = write_run(e, &f, run)?;
            if *whole {
                apply_meta_fd(&f, e, w.as_root, mode)?;
            }
            Ok(n)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))?;
    // Pass 2b: metadata of the files written in several tasks.
    let big: Vec<usize> = tasks.iter().filter(|t| !t.2).map(|t| t.0).collect();
    let mut big_files: Vec<usize> = big;
    big_files.dedup();
    big_files.par_iter().try_for_each(|&i| -> Result<()> {
        let e = files[i];
        let f = w.open_file(&e.path)?;
        apply_meta_fd(&f, e, w.as_root, mode)
    })?;
    stats.bytes = bytes;
    // Pass 3: directory metadata, deepest first, so child creation does not
    // disturb a parent's restored mtime.
    for e in dirs.iter().rev() {
        let fd = w.open_dir(&e.path)?;
        apply_meta_fd(&fd, e, w.as_root, mode)?;
    }
    rustix::fs::syncfs(&w.root).map_err(|e| anyhow!("syncfs {}: {e}", w.root_path.display()))?;
    Ok(stats)
}
