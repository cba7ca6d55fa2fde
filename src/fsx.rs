//! Descriptor-relative filesystem primitives for directories that
//! unprivileged users can write.
//!
//! laybak runs as root over trees that other users own. Every operation
//! below starts from a directory descriptor and names one entry in it (or a
//! relative path resolved with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`), so a user who swaps a name for a symlink or
//! another directory can at worst make the operation fail; it never reaches
//! outside the tree. Metadata is changed through descriptors (`fchmod`,
//! `fchown`, `fsetxattr`, `futimens`), never by a path.

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Resolution flags for every walk below a descriptor.
pub const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Longest relative path handed to the kernel in one call (below PATH_MAX).
const SEGMENT: usize = 3072;

/// Bytes as an `OsStr`.
pub fn os(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(p)
}

/// `(dev, ino)` of a stat result.
pub fn dev_ino(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// Whether a stat result is a directory.
pub fn is_dir(st: &Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
}

pub use crate::ovl::is_whiteout;

fn err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Open an absolute path as a directory without following a symlink
/// anywhere on the way (the path should already be canonical).
///
/// # Errors
/// Missing, not a directory, or a symlink somewhere on the path.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let root = rustix::fs::open("/", dir_flags(), Mode::empty()).map_err(err)?;
    let rel = path.strip_prefix("/").unwrap_or(path);
    if rel.as_os_str().is_empty() {
        return Ok(root);
    }
    open_beneath(&root, rel.as_os_str().as_bytes(), dir_flags())
}

/// Flags to open a directory for reading, never through a final symlink.
pub fn dir_flags() -> OFlags {
    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW
}

/// Open the relative path `rel` below `dir` with `flags`, resolved beneath
/// `dir` and never through a symlink. Paths longer than `PATH_MAX` are
/// opened a segment at a time.
///
/// # Errors
/// Any component missing, a symlink, or outside `dir`.
pub fn open_beneath(dir: impl AsFd, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { b".".as_slice() } else { rel };
    if rel.len() <= SEGMENT {
        return rustix::fs::openat2(dir, os(rel), flags, Mode::empty(), RESOLVE).map_err(err);
    }
    // Split at a '/' no further than SEGMENT bytes in.
    let cut = rel[..SEGMENT]
        .iter()
        .rposition(|&b| b == b'/')
        .ok_or_else(|| {
            io::Error::from_raw_os_error(rustix::io::Errno::NAMETOOLONG.raw_os_error())
        })?;
    let mid = rustix::fs::openat2(
        dir,
        os(&rel[..cut]),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        RESOLVE,
    )
    .map_err(err)?;
    open_beneath(&mid, &rel[cut + 1..], flags)
}

/// Open directory entry `name` of `dir` as a directory (never a symlink).
///
/// # Errors
/// Missing, not a directory, or a symlink.
pub fn open_subdir(dir: impl AsFd, name: &[u8]) -> io::Result<OwnedFd> {
    rustix::fs::openat2(dir, os(name), dir_flags(), Mode::empty(), RESOLVE).map_err(err)
}

/// `lstat` of entry `name` of `dir`; `None` when it does not exist.
///
/// # Errors
/// Any error but `ENOENT`.
pub fn stat_at(dir: impl AsFd, name: &[u8]) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// Names in directory `dir` (without `.` and `..`).
///
/// # Errors
/// The directory cannot be read.
pub fn names(dir: impl AsFd) -> io::Result<Vec<Vec<u8>>> {
    let d = rustix::fs::Dir::read_from(dir).map_err(err)?;
    let mut out = Vec::new();
    for e in d {
        let e = e.map_err(err)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// The path through which `l*xattr` reach entry `name` of `dir` without
/// leaving it: `/proc/self/fd/N/name` (the final component is not followed).
pub fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(os(name))
}

/// `/proc/self/fd/N`: the path of an open descriptor itself (for calls that
/// only take paths, such as `chmod` on an `O_PATH` descriptor).
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Extended attributes `(name, value)`, sorted.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The calls of one xattr family (`f*` on a descriptor, `l*` on a path):
/// the size of the name list, the list, the size of a value, a value.
struct XattrCalls<LQ, L, GQ, G> {
    list_size: LQ,
    list: L,
    value_size: GQ,
    value: G,
}

/// Read every xattr through `c`, sorted by name.
fn gather<LQ, L, GQ, G>(c: XattrCalls<LQ, L, GQ, G>) -> io::Result<Xattrs>
where
    LQ: Fn() -> rustix::io::Result<usize>,
    L: Fn(&mut [u8]) -> rustix::io::Result<usize>,
    GQ: Fn(&[u8]) -> rustix::io::Result<usize>,
    G: Fn(&[u8], &mut [u8]) -> rustix::io::Result<usize>,
{
    let mut out = Vec::new();
    let n = match (c.list_size)() {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(err(e)),
    };
    if n == 0 {
        return Ok(out);
    }
    let mut names = vec![0u8; n];
    let n = (c.list)(&mut names).map_err(err)?;
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let len = match (c.value_size)(name) {
            Ok(l) => l,
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => return Err(err(e)),
        };
        let mut val = vec![0u8; len];
        let l = (c.value)(name, &mut val).map_err(err)?;
        val.truncate(l);
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

/// Xattrs of an open file or directory.
///
/// # Errors
/// The filesystem refused the listing.
pub fn xattrs_fd(fd: impl AsFd) -> io::Result<Xattrs> {
    let fd = fd.as_fd();
    gather(XattrCalls {
        list_size: || rustix::fs::flistxattr_query(fd),
        list: |buf: &mut [u8]| rustix::fs::flistxattr(fd, buf),
        value_size: |k: &[u8]| rustix::fs::fgetxattr_query(fd, os(k)),
        value: |k: &[u8], buf: &mut [u8]| rustix::fs::fgetxattr(fd, os(k), buf),
    })
}

/// Xattrs of `path` itself (a final symlink is not followed).
///
/// # Errors
/// The filesystem refused the listing.
pub fn xattrs_path(path: &Path) -> io::Result<Xattrs> {
    gather(XattrCalls {
        list_size: || rustix::fs::llistxattr_query(path),
        list: |buf: &mut [u8]| rustix::fs::llistxattr(path, buf),
        value_size: |k: &[u8]| rustix::fs::lgetxattr_query(path, os(k)),
        value: |k: &[u8], buf: &mut [u8]| rustix::fs::lgetxattr(path, os(k), buf),
    })
}

/// Xattrs of entry `name` of `dir`, whatever its type (not followed).
///
/// # Errors
/// The filesystem refused the listing.
pub fn xattrs_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Xattrs> {
    xattrs_path(&proc_path(dir, name))
}

/// Remove xattr `key` of entry `name` of `dir` (not followed); a missing
/// attribute is not an error.
///
/// # Errors
/// The filesystem refused.
pub fn remove_xattr_at(dir: BorrowedFd<'_>, name: &[u8], key: &[u8]) -> io::Result<()> {
    match rustix::fs::lremovexattr(proc_path(dir, name), os(key)) {
        Ok(()) | Err(rustix::io::Errno::NODATA) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Set the access and modification times of an open file.
///
/// # Errors
/// The filesystem refused.
pub fn set_times_fd(fd: impl AsFd, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let t = |(s, n): (i64, i64)| Timespec {
        tv_sec: s,
        tv_nsec: n as _,
    };
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: t(atime),
            last_modification: t(mtime),
        },
    )
    .map_err(err)
}

/// Copy owner, mode, times and the xattrs `managed` selects (the others are
/// neither copied nor removed) of open directory `from` onto open directory
/// `to`.
///
/// # Errors
/// Any syscall failure.
pub fn copy_meta_fd(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    managed: impl Fn(&[u8]) -> bool,
) -> io::Result<()> {
    let st = rustix::fs::fstat(from).map_err(err)?;
    for (k, _) in xattrs_fd(to)? {
        if managed(&k) {
            match rustix::fs::fremovexattr(to, os(&k)) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(err(e)),
            }
        }
    }
    for (k, v) in xattrs_fd(from)? {
        if managed(&k) {
            rustix::fs::fsetxattr(to, os(&k), &v, rustix::fs::XattrFlags::empty()).map_err(err)?;
        }
    }
    rustix::fs::fchown(
        to,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    )
    .map_err(err)?;
    rustix::fs::fchmod(to, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(err)?;
    set_times_fd(
        to,
        (st.st_atime, st.st_atime_nsec as i64),
        (st.st_mtime, st.st_mtime_nsec as i64),
    )
}

/// Remove entry `name` of `dir` and, if it is a directory, everything in
/// it, working only through descriptors. A missing entry is not an error.
/// A name swapped for something else while this runs makes it fail (the
/// `unlinkat` flag no longer matches the type); nothing outside `dir` is
/// ever touched.
///
/// # Errors
/// Any filesystem error.
pub fn remove_all_at(dir: impl AsFd, name: &[u8]) -> io::Result<()> {
    let dir = dir.as_fd();
    let Some(st) = stat_at(dir, name)? else {
        return Ok(());
    };
    if is_dir(&st) {
        let sub = open_subdir(dir, name)?;
        if dev_ino(&rustix::fs::fstat(&sub).map_err(err)?) != dev_ino(&st) {
            return Err(io::Error::other("directory changed while being removed"));
        }
        for n in names(&sub)? {
            remove_all_at(&sub, &n)?;
        }
        drop(sub);
        rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR).map_err(err)
    } else {
        match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

/// Rename entry `from` of `fdir` to `to` of `tdir` (replacing a
/// non-directory or an empty directory there).
///
/// # Errors
/// The kernel refused.
pub fn rename_at(fdir: impl AsFd, from: &[u8], tdir: impl AsFd, to: &[u8]) -> io::Result<()> {
    rustix::fs::renameat(fdir, os(from), tdir, os(to)).map_err(err)
}

/// Create directory `path` (and missing parents) with mode `mode`, or
/// tighten an existing one to `mode` and root ownership when it is looser.
/// Used for laybak's own root-only directories.
///
/// # Errors
/// It cannot be created or is not a directory.
pub fn private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            if md.mode() & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path),
        Err(e) => Err(e),
    }
}

/// Open directory `path` (absolute, or relative to the working directory)
/// for use as a parent, following a symlink on the way only when root owns
/// it. Each component is looked up relative to the previous one, so a user
/// who swaps a component while this runs makes it fail instead of
/// redirecting it; a user's own symlink (planted in a directory they
/// control, pointing at one of root's) is refused.
///
/// # Errors
/// Missing, not a directory, or a symlink owned by another user.
pub fn open_dir_trusted(path: &Path) -> io::Result<OwnedFd> {
    use std::collections::VecDeque;
    use std::path::Component;
    let start = |abs: bool| {
        rustix::fs::open(
            if abs { "/" } else { "." },
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)
    };
    let mut fd = start(path.is_absolute())?;
    let mut todo: VecDeque<Vec<u8>> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_bytes().to_vec()),
            Component::ParentDir => Some(b"..".to_vec()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        let st = rustix::fs::statat(&fd, os(&c), AtFlags::SYMLINK_NOFOLLOW).map_err(err)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink {
            links += 1;
            if st.st_uid != 0 || links > 40 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} goes through a symlink {} owned by uid {}, which laybak will not follow as root: give the real path",
                        path.display(),
                        String::from_utf8_lossy(&c),
                        st.st_uid
                    ),
                ));
            }
            let target = rustix::fs::readlinkat(&fd, os(&c), Vec::new()).map_err(err)?;
            let t = Path::new(os(target.as_bytes()));
            if t.is_absolute() {
                fd = start(true)?;
            }
            for (i, n) in t
                .components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.as_bytes().to_vec()),
                    Component::ParentDir => Some(b"..".to_vec()),
                    _ => None,
                })
                .enumerate()
            {
                todo.insert(i, n);
            }
            continue;
        }
        fd = rustix::fs::openat(
            &fd,
            os(&c),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(err)?;
    }
    Ok(fd)
}

/// Create `path` and its missing parents with `mode`, each relative to its
/// parent's descriptor (the existing part is opened with
/// [`open_dir_trusted`], the new part never follows a symlink): a user
/// cannot make root create directories somewhere else.
///
/// # Errors
/// A component is a user's symlink, not a directory, or cannot be made.
pub fn create_dirs_trusted(path: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    while std::fs::symlink_metadata(p).is_err() {
        match (p.parent(), p.file_name()) {
            (Some(up), Some(n)) => {
                missing.push(n.as_bytes().to_vec());
                p = if up.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    up
                };
            }
            _ => break,
        }
    }
    let mut fd = open_dir_trusted(p)?;
    for name in missing.iter().rev() {
        match rustix::fs::mkdirat(&fd, os(name), Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err(e)),
        }
        fd = rustix::fs::openat(
            &fd,
            os(name),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
    }
    Ok(())
}
