//! Upperdir → layer manifest + blobs.
//!
//! Reads only the sealed upper directory (never the workdir): a sequential
//! walk collects entries (cheap: the upper holds only the change), then
//! regular files are chunked (FastCDC), hashed (blake3) and compressed in
//! parallel (rayon). Overlay's own `trusted.overlay.*` bookkeeping is
//! interpreted (whiteouts, opaque) or dropped (origin, impure, uuid), never
//! stored as user data; redirect / metacopy / index artefacts are refused.

use crate::format::Id;
use crate::layer::{Chunk, Entry, Extent, Layer, Meta, Node, Xattrs, show};
use crate::repo::{Packer, Summary};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Extents up to this size are read whole and chunked in memory.
const IN_MEMORY_EXTENT: u64 = 16 << 20;

/// Namespace of overlay's private xattrs (laybak mounts in trusted mode).
pub const OVL_PREFIX: &[u8] = b"trusted.overlay.";

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
    /// Where it is on disk.
    pub fs_path: PathBuf,
    dev_ino: Option<(u64, u64)>,
}

/// List the xattrs of `path` (not following symlinks).
///
/// # Errors
/// The filesystem refused the listing.
pub fn read_xattrs(path: &Path) -> Result<Xattrs> {
    let mut out = Vec::new();
    let n = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listxattr {}", path.display())),
    };
    if n == 0 {
        return Ok(out);
    }
    let mut names = vec![0u8; n];
    let n = rustix::fs::llistxattr(path, &mut names[..])
        .with_context(|| format!("listxattr {}", path.display()))?;
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cname = std::ffi::CString::new(name.to_vec()).expect("no interior NUL");
        let len = match rustix::fs::lgetxattr_query(path, &cname) {
            Ok(l) => l,
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => return Err(e).with_context(|| format!("getxattr {}", path.display())),
        };
        let mut val = vec![0u8; len];
        let l = rustix::fs::lgetxattr(path, &cname, &mut val[..])
            .with_context(|| format!("getxattr {}", path.display()))?;
        val.truncate(l);
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

fn meta_of(md: &Metadata, xattrs: Xattrs) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_ns: md.mtime_nsec() as u32,
        xattrs,
    }
}

/// Split overlay bookkeeping from user xattrs. Returns (opaque, user xattrs).
fn interpret_xattrs(path: &[u8], xattrs: Xattrs, source: Source) -> Result<(bool, Xattrs)> {
    let mut opaque = false;
    let mut keep = Vec::new();
    for (name, value) in xattrs {
        let Some(key) = name.strip_prefix(OVL_PREFIX) else {
            keep.push((name, value));
            continue;
        };
        if source == Source::Base {
            bail!(
                "{} carries the overlay attribute {}, which would change how the volume mounts; remove it (setfattr -x) before attaching",
                show(path),
                String::from_utf8_lossy(&name)
            );
        }
        match key {
            b"opaque" if value == b"y" => opaque = true,
            b"opaque" => bail!(
                "{} has trusted.overlay.opaque={:?}, which the kernel never writes into an upperdir: this layer was made by another tool; laybak will not archive it",
                show(path),
                String::from_utf8_lossy(&value)
            ),
            b"origin" | b"impure" | b"uuid" | b"protattr" => {}
            b"redirect" => bail!(
                "{} is a renamed directory (trusted.overlay.redirect): the volume was mounted with redirect_dir enabled, which laybak does not support; mount it only with `laybak up`",
                show(path)
            ),
            b"metacopy" => bail!(
                "{} is a metadata-only copy-up (trusted.overlay.metacopy): the volume was mounted with metacopy=on; remount it with `laybak up` (metacopy=off)",
                show(path)
            ),
            b"nlink" => bail!(
                "{} has trusted.overlay.nlink: the volume was mounted with index=on; remount it with `laybak up` (index=off)",
                show(path)
            ),
            b"whiteout" => bail!(
                "{} is an xattr whiteout, which the kernel never writes into an upperdir: this layer was made by another tool",
                show(path)
            ),
            k if k.starts_with(b"overlay.") => keep.push((name, value)),
            _ => bail!(
                "{} carries an unknown overlay attribute {}: this kernel writes something laybak does not understand; refusing to store a wrong layer",
                show(path),
                String::from_utf8_lossy(&name)
            ),
        }
    }
    Ok((opaque, keep))
}

/// Walk `root` and classify every entry; no file data is read.
///
/// # Errors
/// Unreadable entries, or overlay artefacts laybak refuses (see module docs).
pub fn walk(root: &Path, source: Source) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    let md = std::fs::symlink_metadata(root)
        .with_context(|| format!("cannot read {}", root.display()))?;
    let (_, xattrs) = interpret_xattrs(b"", read_xattrs(root)?, source)?;
    out.push(Found {
        entry: Entry {
            path: Vec::new(),
            node: Node::Dir { opaque: false },
            meta: meta_of(&md, xattrs),
            link: None,
        },
        fs_path: root.to_path_buf(),
        dev_ino: None,
    });
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for ent in rd {
            let ent = ent.with_context(|| format!("cannot list {}", dir.display()))?;
            let name = ent.file_name();
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            let fs_path = ent.path();
            let md = std::fs::symlink_metadata(&fs_path)
                .with_context(|| format!("cannot stat {}", fs_path.display()))?;
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                if source == Source::Base {
                    bail!(
                        "{} is a character device 0/0, which overlayfs would treat as a deletion marker; move it out of the directory before attaching",
                        show(&path)
                    );
                }
                out.push(Found {
                    entry: Entry {
                        path,
                        node: Node::Whiteout,
                        meta: Meta::default(),
                        link: None,
                    },
                    fs_path,
                    dev_ino: None,
                });
                continue;
            }
            let (opaque, xattrs) = interpret_xattrs(&path, read_xattrs(&fs_path)?, source)?;
            let node = if ft.is_dir() {
                stack.push((fs_path.clone(), path.clone()));
                Node::Dir { opaque }
            } else if ft.is_file() {
                Node::File {
                    size: md.len(),
                    extents: Vec::new(),
                }
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&fs_path)
                    .with_context(|| format!("cannot read link {}", fs_path.display()))?;
                Node::Symlink {
                    target: t.as_os_str().as_bytes().to_vec(),
                }
            } else if ft.is_fifo() {
                Node::Fifo
            } else if ft.is_socket() {
                Node::Socket
            } else if ft.is_char_device() {
                Node::CharDev { rdev: md.rdev() }
            } else if ft.is_block_device() {
                Node::BlockDev { rdev: md.rdev() }
            } else {
                bail!("{} has an unknown file type", fs_path.display());
            };
            let dev_ino = (!ft.is_dir() && md.nlink() > 1).then_some((md.dev(), md.ino()));
            out.push(Found {
                entry: Entry {
                    path,
                    node,
                    meta: meta_of(&md, xattrs),
                    link: None,
                },
                fs_path,
                dev_ino,
            });
        }
    }
    out.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    // Hard-link groups: only inodes seen at least twice in this layer.
    let mut count: HashMap<(u64, u64), u32> = HashMap::new();
    for f in &out {
        if let Some(k) = f.dev_ino {
            *count.entry(k).or_default() += 1;
        }
    }
    let mut ids: HashMap<(u64, u64), u32> = HashMap::new();
    for f in &mut out {
        if let Some(k) = f.dev_ino
            && count[&k] > 1
        {
            let n = ids.len() as u32;
            f.entry.link = Some(*ids.entry(k).or_insert(n));
        }
    }
    Ok(out)
}

/// Data extents of a file: `[(offset, len)]`. Uses SEEK_DATA/SEEK_HOLE only
/// when the file has fewer blocks than its size suggests.
fn data_extents(f: &File, md: &Metadata) -> Result<Vec<(u64, u64)>> {
    let size = md.len();
    if size == 0 {
        return Ok(Vec::new());
    }
    if md.blocks() * 512 >= size {
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

fn open_noatime(path: &Path) -> std::io::Result<File> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            rustix::fs::OFlags::NOATIME.bits() as i32 | rustix::fs::OFlags::NOFOLLOW.bits() as i32,
        )
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(path)
        }
        r => r,
    }
}

/// Chunks of one big extent hashed and compressed in parallel at a time.
const BATCH_CHUNKS: usize = 8;

/// Hash and store the pieces `cuts` of `data` in parallel, in order.
fn store_all(cuts: &[(usize, usize)], data: &[u8], packer: &Packer<'_>) -> Result<Vec<Chunk>> {
    let one = |&(off, len): &(usize, usize)| -> Result<Chunk> {
        let piece = &data[off..off + len];
        let id = Id::of(piece);
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

fn chunk_file(path: &Path, packer: &Packer<'_>, cfg: &crate::repo::Config) -> Result<Vec<Extent>> {
    let mut f = open_noatime(path).with_context(|| format!("cannot open {}", path.display()))?;
    let md = f.metadata()?;
    let mut extents = Vec::new();
    for (offset, len) in data_extents(&f, &md)? {
        f.seek(SeekFrom::Start(offset))?;
        let mut chunks = Vec::new();
        if len <= IN_MEMORY_EXTENT {
            // Small extents: one read, chunked in memory (StreamCDC would
            // allocate a chunk_max buffer per file).
            let mut data = vec![0u8; len as usize];
            f.read_exact(&mut data)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let cuts: Vec<(usize, usize)> =
                fastcdc::v2020::FastCDC::new(&data, cfg.chunk_min, cfg.chunk_avg, cfg.chunk_max)
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
                    let id = Id::of(d);
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
        for c in fastcdc::v2020::StreamCDC::new(reader, cfg.chunk_min, cfg.chunk_avg, cfg.chunk_max)
        {
            let c = c.map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            got += c.length as u64;
            batch.push(c.data);
            if batch.len() >= BATCH_CHUNKS {
                flush(&mut batch, &mut chunks)?;
            }
        }
        flush(&mut batch, &mut chunks)?;
        if got != len {
            bail!("{} changed size while being read", path.display());
        }
        extents.push(Extent { offset, chunks });
    }
    Ok(extents)
}

/// Scan a directory into a layer manifest, storing file data through
/// `packer`. `progress` is advanced by file bytes.
///
/// # Errors
/// Walk errors, unreadable files, or repository write failures.
pub fn scan(
    root: &Path,
    source: Source,
    packer: &Packer<'_>,
    cfg: &crate::repo::Config,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(Layer, Summary)> {
    let found = walk(root, source)?;
    if let Some(p) = progress {
        let total: u64 = found
            .iter()
            .map(|f| match f.entry.node {
                Node::File { size, .. } => size,
                _ => 0,
            })
            .sum();
        p.set_length(total);
    }
    // One read per inode: hard-linked names share the first name's chunks.
    let mut first_of_group: HashMap<u32, usize> = HashMap::new();
    let todo: Vec<usize> = found
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f.entry.node, Node::File { .. }))
        .filter(|(i, f)| match f.entry.link {
            Some(g) => *first_of_group.entry(g).or_insert(*i) == *i,
            None => true,
        })
        .map(|(i, _)| i)
        .collect();
    let results: Vec<(usize, Vec<Extent>)> = todo
        .par_iter()
        .map(|&i| {
            let ext = chunk_file(&found[i].fs_path, packer, cfg)?;
            if let (Some(p), Node::File { size, .. }) = (progress, &found[i].entry.node) {
                p.inc(*size);
            }
            Ok((i, ext))
        })
        .collect::<Result<_>>()?;
    let mut by_index: HashMap<usize, Vec<Extent>> = results.into_iter().collect();
    let mut summary = Summary::default();
    let mut entries = Vec::with_capacity(found.len());
    for (i, f) in found.into_iter().enumerate() {
        let mut e = f.entry;
        if let Node::File { extents, .. } = &mut e.node {
            let src = match e.link {
                Some(g) => first_of_group[&g],
                None => i,
            };
            *extents = if e.link.is_some() {
                by_index.get(&src).cloned().unwrap_or_default()
            } else {
                by_index.remove(&i).unwrap_or_default()
            };
            summary.files += 1;
        }
        if e.node == Node::Whiteout {
            summary.whiteouts += 1;
        }
        entries.push(e);
    }
    let layer = Layer { entries };
    summary.entries = layer.entries.len() as u64;
    summary.data_bytes = layer.data_bytes();
    Ok((layer, summary))
}
