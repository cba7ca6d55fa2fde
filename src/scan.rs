//! Upperdir → layer manifest + blobs.
//!
//! Reads only the sealed upper directory (never the workdir): a sequential
//! walk collects entries (cheap: the upper holds only the change), then
//! regular files are chunked (FastCDC), hashed (blake3) and compressed in
//! parallel (rayon). Overlay's own `trusted.overlay.*` bookkeeping is
//! interpreted (whiteouts, opaque) or dropped (origin, impure, uuid), never
//! stored as user data; redirect / metacopy / index artefacts are refused.
//!
//! The tree may be written by users while it is read, so nothing here
//! resolves a path string: the walk goes from descriptor to descriptor
//! ([`crate::fsx`]), every file is re-opened relative to the root and read
//! only if it is still the regular file the walk recorded, and error
//! messages show a path lossily, escaped and cut to a bounded length.

use crate::fsx;
use crate::layer::{Chunk, DirKind, Entry, Extent, Layer, Meta, Node, Xattrs, show};
use crate::repo::{Entries, Packer, Summary};
use crate::spill::{Sorted, Sorter, Spill};
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{FileType, Mode, OFlags, Stat};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Extents up to this size are read whole and chunked in memory.
const IN_MEMORY_EXTENT: u64 = 16 << 20;

/// Namespace of overlay's private xattrs (see [`crate::ovl`]).
pub const OVL_PREFIX: &[u8] = crate::ovl::PREFIX;

/// Directory descriptors the walk keeps open at most (the deepest
/// directories of its current path that still have subdirectories to
/// visit); shallower ones are closed and re-opened from the root when the
/// walk comes back to them.
const MAX_OPEN_DIRS: usize = 32;

/// Bytes of a path kept at each end in an error message.
const SHOWN_END: usize = 120;

/// What a walk is for: a sealed upperdir, or user data imported as the base
/// layer (where overlay artefacts in user data must be refused).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// A kernel-written upperdir.
    Upper,
    /// Existing user data becoming the bottom layer.
    Base,
}

/// An entry found by the walk, before file data is read.
pub struct Found {
    /// The manifest entry (files have no extents yet).
    pub entry: Entry,
    /// `(dev, ino)` seen by the walk; file data is read only from this inode.
    id: (u64, u64),
    /// Whether other names may share the inode (a non-directory with
    /// `st_nlink > 1`).
    multi: bool,
}

/// A path of the tree for an error message: lossy UTF-8, control characters
/// escaped (a name cannot break the message into lines), and a long path cut
/// in the middle to its first and last [`SHOWN_END`] bytes.
fn shown(path: &[u8]) -> String {
    let mut s = String::new();
    for c in show(path).chars() {
        if c.is_control() {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    if s.len() <= 2 * SHOWN_END + 3 {
        return s;
    }
    let mut head = SHOWN_END;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = s.len() - SHOWN_END;
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}…{}", &s[..head], &s[tail..])
}

/// The error for an entry that is no longer what the walk recorded.
fn changed(path: &[u8], why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{} changed while it was being archived ({why})",
        shown(path)
    )
}

/// `parent/name` (`name` for the root).
fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// List the xattrs of `path` (not following symlinks).
///
/// # Errors
/// The filesystem refused the listing.
pub fn read_xattrs(path: &Path) -> Result<Xattrs> {
    crate::fsx::xattrs_path(path).with_context(|| format!("listxattr {}", path.display()))
}

fn meta_of(st: &Stat, xattrs: Xattrs) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        mtime_ns: st.st_mtime_nsec as u32,
        xattrs,
    }
}

/// Split overlay bookkeeping from user xattrs. Returns how a directory
/// stacks (merge, opaque or renamed) and the user xattrs.
fn interpret_xattrs(path: &[u8], xattrs: Xattrs, source: Source) -> Result<(DirKind, Xattrs)> {
    let (mut opaque, mut redirect) = (false, None);
    let mut keep = Vec::new();
    for (name, value) in xattrs {
        if crate::ovl::is_plain_user(&name) {
            keep.push((name, value));
            continue;
        }
        if source == Source::Base {
            bail!(
                "{} carries the overlay attribute {}, which would change how the volume mounts; remove it (setfattr -x) before attaching",
                shown(path),
                String::from_utf8_lossy(&name)
            );
        }
        match crate::ovl::interpret(&name, &value) {
            crate::ovl::Attr::Opaque => opaque = true,
            crate::ovl::Attr::Redirect(r) => redirect = Some(r),
            crate::ovl::Attr::Bookkeeping => {}
            crate::ovl::Attr::User => keep.push((name, value)),
            crate::ovl::Attr::Refused(why) => bail!("{} {why}", shown(path)),
        }
    }
    Ok((crate::ovl::dir_kind(opaque, redirect), keep))
}

/// Open the directory a walk starts from: its canonical path, with no
/// symlink anywhere on the way.
fn open_root(root: &Path) -> Result<OwnedFd> {
    let canon =
        std::fs::canonicalize(root).with_context(|| format!("cannot read {}", root.display()))?;
    fsx::open_dir_path(&canon).with_context(|| format!("cannot open {}", root.display()))
}

/// A subdirectory seen in a listing, not visited yet.
struct Pending {
    name: Vec<u8>,
    st: Stat,
}

/// A directory on the walk's current path.
struct Frame {
    /// Path below the root (empty for the root).
    rel: Vec<u8>,
    /// `(dev, ino)` of the directory, checked whenever it is re-opened.
    id: (u64, u64),
    /// Its descriptor, while it is open (never for the root, which the
    /// walk holds itself).
    fd: Option<OwnedFd>,
    /// Subdirectories still to visit, last name first.
    todo: Vec<Pending>,
}

impl Frame {
    /// The directory's descriptor, re-opened from `root` (and checked to be
    /// the same directory) if it was closed.
    fn fd<'a>(&'a mut self, root: BorrowedFd<'a>) -> Result<BorrowedFd<'a>> {
        if self.rel.is_empty() {
            return Ok(root);
        }
        if self.fd.is_none() {
            let fd = fsx::open_beneath(root, &self.rel, fsx::dir_flags())
                .map_err(|e| changed(&self.rel, format_args!("cannot reopen it: {e}")))?;
            let st = rustix::fs::fstat(&fd)
                .with_context(|| format!("cannot stat {}", shown(&self.rel)))?;
            if fsx::dev_ino(&st) != self.id {
                return Err(changed(&self.rel, "it is another directory now"));
            }
            self.fd = Some(fd);
        }
        Ok(self.fd.as_ref().expect("just opened").as_fd())
    }
}

/// Walk `root` and classify every entry; no file data is read.
///
/// The walk works only through descriptors: `root` is opened once, every
/// directory below it by name relative to its parent (never through a
/// symlink, and checked to be the directory the listing saw), every entry
/// is `lstat`ed and read relative to its directory. Paths of any length
/// work.
///
/// # Errors
/// Unreadable entries, entries changed while the walk ran, or overlay
/// artefacts laybak refuses (see module docs).
pub fn walk(root: &Path, source: Source) -> Result<Vec<Found>> {
    let fd = open_root(root)?;
    let mut out = Vec::new();
    walk_fd(fd.as_fd(), root, source, &mut |f| {
        out.push(f);
        Ok(())
    })?;
    out.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    // Hard-link groups: only inodes seen at least twice in this layer.
    let mut count: HashMap<(u64, u64), u32> = HashMap::new();
    for f in out.iter().filter(|f| f.multi) {
        *count.entry(f.id).or_default() += 1;
    }
    let mut ids: HashMap<(u64, u64), u32> = HashMap::new();
    for f in out.iter_mut().filter(|f| f.multi) {
        if count[&f.id] > 1 {
            let n = ids.len() as u32;
            f.entry.link = Some(*ids.entry(f.id).or_insert(n));
        }
    }
    Ok(out)
}

/// Walk `root` as [`walk`] does, keeping nothing: whether it can be
/// archived as `source` (no overlay artefacts in user data, nothing
/// unreadable), in memory that follows the depth of the tree.
///
/// # Errors
/// As [`walk`].
pub fn check_tree(root: &Path, source: Source) -> Result<()> {
    let fd = open_root(root)?;
    walk_fd(fd.as_fd(), root, source, &mut |_| Ok(()))
}

/// The walk: every entry goes to `sink` as it is found, a directory before
/// what is in it, the names of one directory in byte order (which is not
/// the layer's order: `a-b` sorts between `a` and `a/x`).
fn walk_fd(
    root: BorrowedFd<'_>,
    root_path: &Path,
    source: Source,
    sink: &mut dyn FnMut(Found) -> Result<()>,
) -> Result<()> {
    let st =
        rustix::fs::fstat(root).with_context(|| format!("cannot stat {}", root_path.display()))?;
    let xattrs = fsx::xattrs_fd(root).with_context(|| {
        format!(
            "cannot read the extended attributes of {}",
            root_path.display()
        )
    })?;
    let (_, xattrs) = interpret_xattrs(b"", xattrs, source)?;
    sink(Found {
        entry: Entry {
            path: Vec::new(),
            node: Node::dir(DirKind::Merge),
            meta: meta_of(&st, xattrs),
            link: None,
        },
        id: fsx::dev_ino(&st),
        multi: false,
    })?;
    let mut stack = vec![Frame {
        rel: Vec::new(),
        id: fsx::dev_ino(&st),
        fd: None,
        todo: list(root, b"", source, sink)?,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(sub) = top.todo.pop() else {
            stack.pop();
            continue;
        };
        let rel = join(&top.rel, &sub.name);
        let fd = fsx::open_subdir(top.fd(root)?, &sub.name)
            .map_err(|e| changed(&rel, format_args!("cannot open it: {e}")))?;
        if top.todo.is_empty() {
            // Nothing more to open in it.
            top.fd = None;
        }
        let st = rustix::fs::fstat(&fd).with_context(|| format!("cannot stat {}", shown(&rel)))?;
        if fsx::dev_ino(&st) != fsx::dev_ino(&sub.st) {
            return Err(changed(&rel, "it is another directory now"));
        }
        let xattrs = fsx::xattrs_fd(&fd)
            .with_context(|| format!("cannot read the extended attributes of {}", shown(&rel)))?;
        let (kind, xattrs) = interpret_xattrs(&rel, xattrs, source)?;
        sink(Found {
            entry: Entry {
                path: rel.clone(),
                node: Node::dir(kind),
                meta: meta_of(&sub.st, xattrs),
                link: None,
            },
            id: fsx::dev_ino(&sub.st),
            multi: false,
        })?;
        let todo = list(fd.as_fd(), &rel, source, sink)?;
        stack.push(Frame {
            rel,
            id: fsx::dev_ino(&sub.st),
            fd: (!todo.is_empty()).then_some(fd),
            todo,
        });
        // Bounded descriptors however deep the tree: close the shallowest.
        if stack.len() > MAX_OPEN_DIRS + 1 {
            let n = stack.len() - MAX_OPEN_DIRS - 1;
            stack[n].fd = None;
        }
    }
    Ok(())
}

/// Classify the entries of directory `dir` (at `rel`) into `sink`, except
/// subdirectories, which are returned (sorted, last first) to be visited.
fn list(
    dir: BorrowedFd<'_>,
    rel: &[u8],
    source: Source,
    sink: &mut dyn FnMut(Found) -> Result<()>,
) -> Result<Vec<Pending>> {
    let mut subdirs = Vec::new();
    let names = fsx::names(dir).with_context(|| format!("cannot list {}", shown(rel)))?;
    for name in names {
        let path = join(rel, &name);
        let st = fsx::stat_at(dir, &name)
            .with_context(|| format!("cannot stat {}", shown(&path)))?
            .ok_or_else(|| changed(&path, "it is gone"))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if crate::ovl::is_whiteout(&st) {
            if source == Source::Base {
                bail!(
                    "{} is a character device 0/0, which overlayfs would treat as a deletion marker; move it out of the directory before attaching",
                    shown(&path)
                );
            }
            sink(Found {
                entry: Entry {
                    path,
                    node: Node::Whiteout,
                    meta: Meta::default(),
                    link: None,
                },
                id: fsx::dev_ino(&st),
                multi: false,
            })?;
            continue;
        }
        if ft == FileType::Directory {
            subdirs.push(Pending { name, st });
            continue;
        }
        let xattrs = fsx::xattrs_at(dir, &name)
            .with_context(|| format!("cannot read the extended attributes of {}", shown(&path)))?;
        let (_, xattrs) = interpret_xattrs(&path, xattrs, source)?;
        let node = match ft {
            FileType::RegularFile => Node::File {
                size: st.st_size as u64,
                extents: Vec::new(),
            },
            FileType::Symlink => {
                let t = rustix::fs::readlinkat(dir, fsx::os(&name), Vec::new())
                    .with_context(|| format!("cannot read link {}", shown(&path)))?;
                Node::Symlink {
                    target: t.into_bytes(),
                }
            }
            FileType::Fifo => Node::Fifo,
            FileType::Socket => Node::Socket,
            FileType::CharacterDevice => Node::CharDev { rdev: st.st_rdev },
            FileType::BlockDevice => Node::BlockDev { rdev: st.st_rdev },
            _ => bail!("{} has an unknown file type", shown(&path)),
        };
        sink(Found {
            entry: Entry {
                path,
                node,
                meta: meta_of(&st, xattrs),
                link: None,
            },
            id: fsx::dev_ino(&st),
            multi: st.st_nlink > 1,
        })?;
    }
    subdirs.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(subdirs)
}

/// Data extents of a file: `[(offset, len)]`. Uses SEEK_DATA/SEEK_HOLE only
/// when the file has fewer blocks than its size suggests.
fn data_extents(f: &File, st: &Stat) -> Result<Vec<(u64, u64)>> {
    let size = st.st_size as u64;
    if size == 0 {
        return Ok(Vec::new());
    }
    if st.st_blocks as u64 * 512 >= size {
        return Ok(vec![(0, size)]);
    }
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(start))?.min(size);
        if end > start {
            out.push((start, end - start));
        }
        pos = end;
    }
    Ok(out)
}

/// Open for reading the regular file the walk recorded as `f`, relative to
/// `root`, and return it with its `fstat`.
///
/// The name is first opened as an `O_PATH` handle (which opens nothing:
/// no fifo blocks, no device driver runs), and only a regular file with the
/// walk's `(dev, ino)` and size is then re-opened for reading through that
/// handle (`O_NONBLOCK` all the same). Anything else fails as changed.
fn open_regular(root: BorrowedFd<'_>, f: &Found) -> Result<(File, Stat)> {
    let path = &f.entry.path;
    let Node::File { size, .. } = f.entry.node else {
        bail!("{} is not a regular file", shown(path));
    };
    let check = |st: &Stat| -> Result<()> {
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(changed(path, "it is no longer a regular file"));
        }
        if fsx::dev_ino(st) != f.id {
            return Err(changed(path, "it is another file now"));
        }
        if st.st_size as u64 != size {
            return Err(changed(
                path,
                format_args!("its size went from {size} to {} bytes", st.st_size),
            ));
        }
        Ok(())
    };
    let handle = fsx::open_beneath(
        root,
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    )
    .map_err(
        |e| match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
            Some(
                rustix::io::Errno::NOENT
                | rustix::io::Errno::NOTDIR
                | rustix::io::Errno::LOOP
                | rustix::io::Errno::XDEV,
            ) => changed(path, format_args!("cannot reopen it: {e}")),
            _ => anyhow!("cannot open {}: {e}", shown(path)),
        },
    )?;
    check(&rustix::fs::fstat(&handle).with_context(|| format!("cannot stat {}", shown(path)))?)?;
    // Through the handle: the very inode just checked, whatever the name
    // is now.
    let again = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(&again, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::open(&again, flags, Mode::empty()),
        r => r,
    }
    .with_context(|| format!("cannot open {}", shown(path)))?;
    let st = rustix::fs::fstat(&fd).with_context(|| format!("cannot stat {}", shown(path)))?;
    check(&st)?;
    Ok((File::from(fd), st))
}

/// Chunks of one big extent hashed and compressed in parallel at a time.
const BATCH_CHUNKS: usize = 8;

/// Hash and store the pieces `cuts` of `data` in parallel, in order.
fn store_all(cuts: &[(usize, usize)], data: &[u8], packer: &Packer<'_>) -> Result<Vec<Chunk>> {
    let one = |&(off, len): &(usize, usize)| -> Result<Chunk> {
        let piece = &data[off..off + len];
        let id = packer.blob_id(piece);
        packer.add(id, piece)?;
        Ok(Chunk {
            id,
            len: len as u32,
        })
    };
    if cuts.len() <= 1 {
        return cuts.iter().map(one).collect();
    }
    cuts.par_iter().map(one).collect()
}

fn chunk_file(
    root: BorrowedFd<'_>,
    found: &Found,
    packer: &Packer<'_>,
    cfg: &crate::repo::Config,
) -> Result<Vec<Extent>> {
    let path = &found.entry.path;
    let (mut f, st) = open_regular(root, found)?;
    let mut extents = Vec::new();
    for (offset, len) in data_extents(&f, &st)? {
        f.seek(SeekFrom::Start(offset))?;
        let mut chunks = Vec::new();
        if len <= IN_MEMORY_EXTENT {
            // Small extents: one read, chunked in memory (StreamCDC would
            // allocate a chunk_max buffer per file).
            let mut data = vec![0u8; len as usize];
            f.read_exact(&mut data)
                .with_context(|| format!("cannot read {}", shown(path)))?;
            let cuts: Vec<(usize, usize)> = fastcdc::v2020::FastCDC::with_level_and_seed(
                &data,
                cfg.chunk_min,
                cfg.chunk_avg,
                cfg.chunk_max,
                fastcdc::v2020::Normalization::Level1,
                packer.chunker_seed(),
            )
            .map(|c| (c.offset, c.length))
            .collect();
            chunks = store_all(&cuts, &data, packer)?;
            extents.push(Extent { offset, chunks });
            continue;
        }
        // Big extents: cut while reading, then hash and compress a batch of
        // chunks on all cores (a single huge file is not one core's work).
        let reader = (&mut f).take(len);
        let mut got = 0u64;
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let flush = |batch: &mut Vec<Vec<u8>>, chunks: &mut Vec<Chunk>| -> Result<()> {
            let ids: Vec<Chunk> = batch
                .par_iter()
                .map(|d| {
                    let id = packer.blob_id(d);
                    packer.add(id, d).map(|()| Chunk {
                        id,
                        len: d.len() as u32,
                    })
                })
                .collect::<Result<_>>()?;
            chunks.extend(ids);
            batch.clear();
            Ok(())
        };
        for c in fastcdc::v2020::StreamCDC::with_level_and_seed(
            reader,
            cfg.chunk_min,
            cfg.chunk_avg,
            cfg.chunk_max,
            fastcdc::v2020::Normalization::Level1,
            packer.chunker_seed(),
        ) {
            let c = c.map_err(|e| anyhow!("cannot read {}: {e}", shown(path)))?;
            got += c.length as u64;
            batch.push(c.data);
            if batch.len() >= BATCH_CHUNKS {
                flush(&mut batch, &mut chunks)?;
            }
        }
        flush(&mut batch, &mut chunks)?;
        if got != len {
            return Err(changed(path, "its size changed while it was being read"));
        }
        extents.push(Extent { offset, chunks });
    }
    Ok(extents)
}

/// Files whose data is read in parallel at a time.
const BATCH: usize = 4096;

/// A scanned layer: its entries sorted ([`crate::spill`]: in memory, or
/// in runs on disk for a large tree), and its hard-link groups.
pub struct Scanned {
    sorted: Sorted,
    groups: Vec<Group>,
}

/// An inode the walk met under more than one name (`st_nlink > 1`).
struct Group {
    /// Names it has in the layer.
    names: u32,
    /// Its data, read once from its first name found.
    extents: Vec<Extent>,
}

impl Scanned {
    /// The layer's entries in order. A name of an inode met more than once
    /// carries its group (numbered in path order from 0) and the data read
    /// from the first name found; an inode met once is no group.
    pub fn entries(&self) -> Entries<'_> {
        let mut numbers: HashMap<u32, u32> = HashMap::new();
        Box::new(self.sorted.iter().map(move |e| {
            let e = e?;
            let Some(g) = e.link else {
                return Ok(e);
            };
            let mut e = e.into_owned();
            let group = &self.groups[g as usize];
            if group.names < 2 {
                e.link = None;
                return Ok(Cow::Owned(e));
            }
            let n = numbers.len() as u32;
            e.link = Some(*numbers.entry(g).or_insert(n));
            if let Node::File { extents, .. } = &mut e.node {
                extents.clone_from(&group.extents);
            }
            Ok(Cow::Owned(e))
        }))
    }

    /// The whole layer in memory (small layers, tests).
    ///
    /// # Errors
    /// Reading back the sorted runs failed.
    pub fn layer(&self) -> Result<Layer> {
        let entries = self
            .entries()
            .map(|e| e.map(Cow::into_owned))
            .collect::<Result<_>>()?;
        Ok(Layer { entries })
    }

    /// Sorted runs written to disk (0: the layer was sorted in memory).
    pub fn runs(&self) -> usize {
        self.sorted.runs()
    }
}

/// Entries on their way from the walk to the sorter: files are read in
/// batches of [`BATCH`], in parallel.
struct Pipeline<'a, 'r> {
    root: BorrowedFd<'a>,
    packer: &'a Packer<'r>,
    cfg: &'a crate::repo::Config,
    progress: Option<&'a indicatif::ProgressBar>,
    /// Found entries, and whether each is to be read.
    batch: Vec<(Found, bool)>,
    inodes: HashMap<(u64, u64), u32>,
    groups: Vec<Group>,
    sorter: Sorter,
    summary: Summary,
}

impl Pipeline<'_, '_> {
    fn push(&mut self, mut f: Found) -> Result<()> {
        self.summary.entries += 1;
        match f.entry.node {
            Node::File { size, .. } => {
                self.summary.files += 1;
                self.summary.data_bytes += size;
                if let Some(p) = self.progress {
                    p.inc_length(size);
                }
            }
            Node::Whiteout => self.summary.whiteouts += 1,
            _ => {}
        }
        let mut read = matches!(f.entry.node, Node::File { .. });
        f.entry.link = None;
        if f.multi {
            // One read per inode: later names share the first one's data.
            let next = self.groups.len() as u32;
            let g = *self.inodes.entry(f.id).or_insert(next);
            if g == next {
                self.groups.push(Group {
                    names: 0,
                    extents: Vec::new(),
                });
            } else {
                read = false;
            }
            self.groups[g as usize].names += 1;
            f.entry.link = Some(g);
        }
        self.batch.push((f, read));
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let (root, packer, cfg, progress) = (self.root, self.packer, self.cfg, self.progress);
        let read: Vec<Option<Vec<Extent>>> = self
            .batch
            .par_iter()
            .map(|(f, read)| {
                if !read {
                    return Ok(None);
                }
                let ext = chunk_file(root, f, packer, cfg)?;
                if let (Some(p), Node::File { size, .. }) = (progress, &f.entry.node) {
                    p.inc(*size);
                }
                Ok(Some(ext))
            })
            .collect::<Result<_>>()?;
        for ((mut f, _), ext) in self.batch.drain(..).zip(read) {
            if let (Some(ext), Node::File { extents, .. }) = (ext, &mut f.entry.node) {
                if let Some(g) = f.entry.link {
                    self.groups[g as usize].extents.clone_from(&ext);
                }
                *extents = ext;
            }
            self.sorter.push(f.entry)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Scanned, Summary)> {
        self.flush()?;
        let scanned = Scanned {
            sorted: self.sorter.finish()?,
            groups: self.groups,
        };
        Ok((scanned, self.summary))
    }
}

/// Scan a directory into a layer manifest, storing file data through
/// `packer`. `progress` is advanced by file bytes. Entries go from the
/// walk to the reading of their data and on to a sorter as they are found,
/// so memory follows a batch and a sorted run, not the tree; a large tree
/// is sorted through an unnamed temporary file as `spill` says (see
/// [`crate::spill`]).
///
/// # Errors
/// Walk errors, unreadable or changed files, or repository write failures.
pub fn scan(
    root: &Path,
    source: Source,
    packer: &Packer<'_>,
    cfg: &crate::repo::Config,
    progress: Option<&indicatif::ProgressBar>,
    spill: &Spill,
) -> Result<(Scanned, Summary)> {
    let fd = open_root(root)?;
    let mut pipe = pipeline(fd.as_fd(), packer, cfg, progress, spill);
    walk_fd(fd.as_fd(), root, source, &mut |f| pipe.push(f))?;
    pipe.finish()
}

fn pipeline<'a, 'r>(
    root: BorrowedFd<'a>,
    packer: &'a Packer<'r>,
    cfg: &'a crate::repo::Config,
    progress: Option<&'a indicatif::ProgressBar>,
    spill: &Spill,
) -> Pipeline<'a, 'r> {
    if let Some(p) = progress {
        p.set_length(0);
    }
    Pipeline {
        root,
        packer,
        cfg,
        progress,
        batch: Vec::with_capacity(BATCH),
        inodes: HashMap::new(),
        groups: Vec::new(),
        sorter: Sorter::new(spill),
        summary: Summary::default(),
    }
}

/// The second half of [`scan`], for a [`walk`] made earlier: read the
/// data of the regular files it found, store it through `packer`, and
/// return the manifest. Each file is re-opened relative to `root`; one
/// that is no longer the regular file the walk saw (another inode,
/// another size, another type) fails the scan, and nothing but a regular
/// file is ever opened for reading.
///
/// # Errors
/// `root` is no longer the walked directory, a file changed, or a read or
/// repository write failed.
pub fn archive(
    root: &Path,
    found: Vec<Found>,
    packer: &Packer<'_>,
    cfg: &crate::repo::Config,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(Layer, Summary)> {
    let fd = open_root(root)?;
    let st = rustix::fs::fstat(&fd).with_context(|| format!("cannot stat {}", root.display()))?;
    if found.first().is_some_and(|r| r.id != fsx::dev_ino(&st)) {
        bail!(
            "{} changed while it was being archived (it is another directory now)",
            root.display()
        );
    }
    let spill = Spill::in_dir(&std::env::temp_dir());
    let mut pipe = pipeline(fd.as_fd(), packer, cfg, progress, &spill);
    for f in found {
        pipe.push(f)?;
    }
    let (scanned, summary) = pipe.finish()?;
    Ok((scanned.layer()?, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_paths_are_shown_whole() {
        assert_eq!(shown(b""), "/");
        assert_eq!(shown(b"a/b c"), "a/b c");
        assert_eq!(shown(b"bad\xffname"), "bad\u{fffd}name");
        let p = vec![b'x'; 2 * SHOWN_END + 3];
        assert_eq!(shown(&p), String::from_utf8(p).unwrap());
    }

    #[test]
    fn control_characters_cannot_break_the_line() {
        assert_eq!(shown(b"evil\nname\r\x1b[2J"), "evil\\nname\\r\\u{1b}[2J");
    }

    #[test]
    fn long_paths_keep_both_ends() {
        let mut p = b"head/".to_vec();
        p.extend(std::iter::repeat_n(b'm', 10_000));
        p.extend_from_slice(b"/tail.txt");
        let s = shown(&p);
        assert!(s.starts_with("head/mmm"), "{s}");
        assert!(s.ends_with("mmm/tail.txt"), "{s}");
        assert_eq!(
            s,
            format!("{}…{}", &s[..SHOWN_END], &s[s.len() - SHOWN_END..])
        );
    }

    #[test]
    fn long_paths_are_cut_on_character_boundaries() {
        // Three-byte characters: no cut lands on a byte boundary of 120.
        let p = "é€".repeat(500).into_bytes();
        let s = shown(&p);
        assert!(s.contains('…'));
        assert!(s.len() <= 2 * SHOWN_END + '…'.len_utf8());
        assert!(s.len() >= 2 * (SHOWN_END - 3));
    }
}
