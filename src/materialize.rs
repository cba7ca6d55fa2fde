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

use crate::layer::{Chunk, Entry, Node, path_is_safe, show, split};
use crate::repo::Repo;
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
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
    /// Device nodes left out ([`Safety::no_devices`]).
    pub skipped_devices: u64,
}

/// One unit of restore work: a file index, a run of (offset, chunk), and
/// whether the run is the whole file.
type WriteTask<'a> = (usize, Vec<(u64, &'a Chunk)>, bool);

/// Chunks (about 1 MiB each) written by one task: big files are restored by
/// several threads at once.
const CHUNKS_PER_TASK: usize = 8;

fn os(p: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(p)
}

struct Writer<'a> {
    root: rustix::fd::BorrowedFd<'a>,
    as_root: bool,
    safety: Safety,
    cached: Option<(Vec<u8>, OwnedFd)>,
}

impl Writer<'_> {
    fn open_dir(&self, rel: &[u8]) -> Result<OwnedFd> {
        crate::fsx::open_beneath(
            self.root,
            rel,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
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
        let fd = crate::fsx::open_beneath(
            self.root,
            rel,
            OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
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
    x.iter()
        .map(|(k, v)| match target {
            Target::Plain => (crate::ovl::unescape(k), v.clone()),
            Target::Lowerdir => (k.clone(), v.clone()),
        })
        .collect()
}

/// The mode and xattrs to give `e`, with setuid/setgid bits and file
/// capabilities removed when `safety` says so.
fn safe_meta(e: &Entry, target: Target, safety: Safety) -> (u32, crate::layer::Xattrs) {
    let mut mode = e.meta.mode;
    let mut x = user_xattrs(&e.meta.xattrs, target);
    if safety.no_setuid {
        if !e.node.is_dir() {
            mode &= !0o6000;
        }
        x.retain(|(k, _)| k.as_slice() != b"security.capability");
    }
    (mode, x)
}

/// Metadata for a non-directory, non-regular entry, by name in its parent.
fn apply_meta_at(
    dir: &OwnedFd,
    name: &[u8],
    e: &Entry,
    as_root: bool,
    target: Target,
    safety: Safety,
) -> Result<()> {
    let m = &e.meta;
    let (mode, xattrs) = safe_meta(e, target, safety);
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
    set_xattrs_path(&crate::fsx::proc_path(dir.as_fd(), name), &xattrs, as_root)?;
    if !matches!(e.node, Node::Symlink { .. }) {
        // chmodat follows symlinks: go through an O_PATH descriptor of the
        // entry itself (never a symlink: O_NOFOLLOW, type checked).
        let fd = rustix::fs::openat(
            dir,
            os(name),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", show(&e.path)))?;
        let ft = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        if ft == FileType::Symlink || ft == FileType::Directory || ft == FileType::RegularFile {
            bail!("{} changed type while it was restored", show(&e.path));
        }
        rustix::fs::chmod(
            crate::fsx::fd_path(fd.as_fd()).as_path(),
            Mode::from_raw_mode(mode),
        )
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
fn apply_meta_fd(
    fd: impl AsFd,
    e: &Entry,
    as_root: bool,
    target: Target,
    safety: Safety,
) -> Result<()> {
    let fd = fd.as_fd();
    let m = &e.meta;
    let (mode, mut xattrs) = safe_meta(e, target, safety);
    if as_root {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(m.uid)),
            Some(rustix::fs::Gid::from_raw(m.gid)),
        )
        .with_context(|| format!("cannot chown {}", show(&e.path)))?;
    }
    if target == Target::Lowerdir
        && let Node::Dir { kind } = &e.node
    {
        xattrs.extend(crate::ovl::dir_xattr(kind));
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
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
        .with_context(|| format!("cannot chmod {}", show(&e.path)))?;
    rustix::fs::futimens(fd, &ts(m.mtime, m.mtime_ns))
        .with_context(|| format!("cannot set times of {}", show(&e.path)))?;
    Ok(())
}

/// What a restore may recreate. A crafted or foreign repository can hold
/// device nodes, setuid files and file capabilities; restoring them where
/// an unprivileged user can reach them hands that user root.
#[derive(Clone, Copy, Debug, Default)]
pub struct Safety {
    /// Skip device nodes (character and block).
    pub no_devices: bool,
    /// Clear setuid/setgid bits on non-directories and drop
    /// `security.capability`.
    pub no_setuid: bool,
}

/// A restore target, opened once and held by descriptor.
pub struct Dest {
    /// The target directory.
    pub fd: OwnedFd,
    /// Its path, for messages.
    pub shown: std::path::PathBuf,
    /// Whether the directory belonged to someone other than root before
    /// the restore (laybak made it root's alone while it writes).
    pub foreign: bool,
    /// Owner, group and mode it had before, put back if the restore fails.
    orig: (u32, u32, u32),
}

impl Dest {
    /// A directory of laybak's own (root-only, such as a cache entry being
    /// built), opened without following symlinks.
    ///
    /// # Errors
    /// It cannot be opened.
    pub fn own(path: &Path) -> Result<Dest> {
        let fd = crate::fsx::open_dir_path(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let st = rustix::fs::fstat(&fd)?;
        Ok(Dest {
            fd,
            shown: path.to_path_buf(),
            foreign: false,
            orig: (st.st_uid, st.st_gid, st.st_mode & 0o7777),
        })
    }

    /// Put the target's original owner and mode back (after a failure).
    pub fn give_back(&self) {
        let (u, g, m) = self.orig;
        let _ = rustix::fs::fchown(
            &self.fd,
            Some(rustix::fs::Uid::from_raw(u)),
            Some(rustix::fs::Gid::from_raw(g)),
        );
        let _ = rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(m));
    }
}

/// Open the restore target: missing (created, `0700`) or an empty
/// directory. Nothing on the way is followed unless root owns it (see
/// [`crate::fsx::open_dir_trusted`]); the target itself is never a symlink.
/// A target owned by another user is made root's alone (`0700`, root) for
/// the time of the restore, and checked for emptiness only after that, so
/// its owner cannot swap names under the writes; the restore gives it the
/// snapshot root's owner and mode at the end.
///
/// # Errors
/// It is a non-empty directory, not a directory, or reached through a
/// user's symlink.
pub fn prepare_target(target: &Path) -> Result<Dest> {
    use std::os::unix::ffi::OsStrExt;
    let (parent, name) = match (target.parent(), target.file_name()) {
        (Some(p), Some(n)) => (
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        ),
        _ => bail!(
            "restore target {} is not a usable directory name: give a new or empty directory",
            target.display()
        ),
    };
    if !parent.exists() {
        crate::fsx::create_dirs_trusted(parent, 0o755)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let pfd = crate::fsx::open_dir_trusted(parent)
        .with_context(|| format!("cannot open {}", parent.display()))?;
    let created = match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", target.display())),
    };
    let fd = crate::fsx::open_subdir(&pfd, name.as_bytes()).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) {
            anyhow!(
                "restore target {} exists and is not a directory: give a new or empty directory",
                target.display()
            )
        } else {
            anyhow!(
                "restore target {} cannot be opened as a directory ({e}; a symlink is never followed): give a new or empty directory",
                target.display()
            )
        }
    })?;
    let st = rustix::fs::fstat(&fd)?;
    let orig = (st.st_uid, st.st_gid, st.st_mode & 0o7777);
    let dest = Dest {
        fd,
        shown: target.to_path_buf(),
        foreign: rustix::process::geteuid().is_root() && st.st_uid != 0,
        orig,
    };
    let as_root = rustix::process::geteuid().is_root();
    // Decided from the directory actually opened, not from whether laybak
    // just made it: its owner may have swapped the name in between.
    let _ = created;
    if as_root && (st.st_uid != 0 || st.st_gid != 0 || st.st_mode & 0o077 != 0) {
        // Root's alone while it writes: nobody else can create, rename or
        // open anything in it from here on.
        rustix::fs::fchown(
            &dest.fd,
            Some(rustix::fs::Uid::ROOT),
            Some(rustix::fs::Gid::ROOT),
        )
        .with_context(|| format!("cannot take over {} for the restore", target.display()))?;
        rustix::fs::fchmod(&dest.fd, Mode::from_raw_mode(0o700))?;
    }
    if !crate::fsx::names(&dest.fd)?.is_empty() {
        dest.give_back();
        bail!(
            "restore target {} is not empty: give a new or empty directory",
            target.display()
        );
    }
    Ok(dest)
}

/// Write `items` (sorted by path, parents before children, the root entry
/// optional) into the existing directory `target`.
///
/// # Errors
/// Unsafe paths, refused writes, missing or corrupt blobs, I/O errors.
pub fn write_tree(
    repo: &Repo,
    target: &Dest,
    items: &[Item<'_>],
    mode: Target,
    safety: Safety,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Stats> {
    let mut w = Writer {
        root: target.fd.as_fd(),
        as_root: rustix::process::geteuid().is_root(),
        safety,
        cached: None,
    };
    let mut stats = Stats::default();
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
    let (files, dirs) = structure(&mut w, items, mode, safety, &mut stats)?;
    drop(w.cached.take());
    crate::failpoint::hit("restore-structure")?;
    // Pass 2: file data, in parallel across files and, for big files,
    // across runs of chunks within the file; small files get their metadata
    // in the same task (one open), big ones in pass 2b.
    let (bytes, tasks) = file_data(repo, &w, &files, mode, progress)?;
    // Pass 2b: metadata of the files written in several tasks.
    let big: Vec<usize> = tasks.iter().filter(|t| !t.2).map(|t| t.0).collect();
    let mut big_files: Vec<usize> = big;
    big_files.dedup();
    big_files.par_iter().try_for_each(|&i| -> Result<()> {
        let e = files[i];
        let f = w.open_file(&e.path)?;
        apply_meta_fd(&f, e, w.as_root, mode, w.safety)
    })?;
    stats.bytes = bytes;
    // Pass 3: directory metadata, deepest first, so child creation does not
    // disturb a parent's restored mtime.
    for e in dirs.iter().rev() {
        let fd = w.open_dir(&e.path)?;
        apply_meta_fd(&fd, e, w.as_root, mode, w.safety)?;
    }
    rustix::fs::syncfs(w.root).map_err(|e| anyhow!("syncfs {}: {e}", target.shown.display()))?;
    Ok(stats)
}

/// Pass 1 of [`write_tree`]: every entry created (files empty, at their
/// size), hard links made, metadata of everything but files and
/// directories applied. Returns the files and directories to finish.
fn structure<'a>(
    w: &mut Writer<'_>,
    items: &'a [Item<'a>],
    mode: Target,
    safety: Safety,
    stats: &mut Stats,
) -> Result<(Vec<&'a Entry>, Vec<&'a Entry>)> {
    let mut first_link: HashMap<(usize, u32), &[u8]> = HashMap::new();
    let mut files: Vec<&Entry> = Vec::new();
    let mut dirs: Vec<&Entry> = Vec::new();
    for it in items {
        let e = it.entry;
        if !path_is_safe(&e.path) {
            bail!(
                "refusing manifest entry with unsafe path {:?}",
                show(&e.path)
            );
        }
        if safety.no_devices && matches!(e.node, Node::CharDev { .. } | Node::BlockDev { .. }) {
            stats.skipped_devices += 1;
            continue;
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
            apply_meta_at(pdir, name, e, as_root, mode, safety)?;
        }
    }
    Ok((files, dirs))
}

/// Pass 2 of [`write_tree`]: the data of every file, in parallel.
/// Returns the bytes written and the tasks (for pass 2b).
fn file_data<'a>(
    repo: &Repo,
    w: &Writer<'_>,
    files: &[&'a Entry],
    mode: Target,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(u64, Vec<WriteTask<'a>>)> {
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
                apply_meta_fd(&f, e, w.as_root, mode, w.safety)?;
            }
            Ok(n)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))?;
    Ok((bytes, tasks))
}
