//! Layer manifests and overlay semantics, computed in user space.
//!
//! A [`Layer`] is the serialized form of one sealed upperdir: a sorted list of
//! entries with typed whiteouts and opaque directories (never overlay's
//! on-disk encodings). [`restack`] merges a chain of layers into the view the
//! kernel would show; it is a pure function and the single place where
//! overlay semantics live for restore, diff and mount-from-repository.

use crate::format::BlobId;
use crate::stack;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

/// Extended attributes as (name, value) pairs, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Inode metadata kept for every entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanosecond part.
    pub mtime_ns: u32,
    /// Extended attributes (name, value), sorted by name. ACLs and file
    /// capabilities are here as `system.posix_acl_*` and `security.capability`.
    pub xattrs: Xattrs,
}

/// One content-defined chunk of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// blake3 of the uncompressed chunk.
    pub id: BlobId,
    /// Uncompressed length.
    pub len: u32,
}

/// A run of data at `offset`; the gaps between extents are holes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Byte offset in the file.
    pub offset: u64,
    /// The chunks, contiguous from `offset`.
    pub chunks: Vec<Chunk>,
}

/// How a directory of a layer treats the layers below it.
///
/// Encoded like the `opaque: bool` of format version 1 for `Merge` (0) and
/// `Opaque` (1); `Redirect` (2) appears only in manifests of format
/// version 2 (see `docs/FORMAT.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirKind {
    /// Merges with the directory of the same name below.
    Merge,
    /// Hides everything below it.
    Opaque,
    /// A renamed directory (overlay's `trusted.overlay.redirect`): its
    /// lower content is the directory named here in the namespace below —
    /// a sibling's name, or a `/`-led path from the root.
    Redirect(Vec<u8>),
}

/// Longest redirect value accepted (the kernel writes at most
/// `redirect_max`, 256 by default).
pub const MAX_REDIRECT: usize = 4096;

/// Whether `r` is a redirect value the kernel accepts: a single safe name,
/// or `/` followed by a safe non-empty path.
pub fn redirect_is_valid(r: &[u8]) -> bool {
    if r.is_empty() || r.len() > MAX_REDIRECT {
        return false;
    }
    match r.strip_prefix(b"/") {
        Some(abs) => !abs.is_empty() && path_is_safe(abs),
        None => !r.contains(&b'/') && path_is_safe(r),
    }
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    /// The name is deleted in the layers below.
    Whiteout,
    /// A directory, and how it treats the layers below it.
    Dir {
        /// Merge, replace (opaque) or continue elsewhere (renamed).
        kind: DirKind,
    },
    /// A regular file.
    File {
        /// Apparent size (holes included).
        size: u64,
        /// Data extents, ascending and non-overlapping.
        extents: Vec<Extent>,
    },
    /// A symbolic link and its target bytes.
    Symlink {
        /// Link target, never followed by laybak.
        target: Vec<u8>,
    },
    /// A named pipe.
    Fifo,
    /// A unix socket (restored as an inert socket node).
    Socket,
    /// A character device.
    CharDev {
        /// Device number.
        rdev: u64,
    },
    /// A block device.
    BlockDev {
        /// Device number.
        rdev: u64,
    },
}

impl Node {
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Dir { .. })
    }

    /// A directory of this kind.
    pub fn dir(kind: DirKind) -> Node {
        Node::Dir { kind }
    }

    /// The redirect of a renamed directory.
    pub fn redirect(&self) -> Option<&[u8]> {
        match self {
            Node::Dir {
                kind: DirKind::Redirect(r),
            } => Some(r),
            _ => None,
        }
    }

    /// A short type letter for listings.
    pub fn letter(&self) -> char {
        match self {
            Node::Whiteout => 'w',
            Node::Dir { .. } => 'd',
            Node::File { .. } => 'f',
            Node::Symlink { .. } => 'l',
            Node::Fifo => 'p',
            Node::Socket => 's',
            Node::CharDev { .. } => 'c',
            Node::BlockDev { .. } => 'b',
        }
    }
}

/// One path in a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the volume root, components joined by `/`; the root
    /// itself is the empty path. Bytes, not UTF-8.
    pub path: Vec<u8>,
    /// What it is.
    pub node: Node,
    /// Metadata (ignored for whiteouts).
    pub meta: Meta,
    /// Hard-link group within this layer: entries with the same value are one
    /// inode. `None` for a single link.
    pub link: Option<u32>,
}

/// A layer manifest: the serialized sealed upperdir.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Entries sorted by path bytes, the root (empty path) first.
    pub entries: Vec<Entry>,
}

/// A layer manifest too large for one file, stored as pages (format
/// version 4): each page is a blob holding `postcard(Vec<Entry>)` of
/// consecutive entries, so no single object grows with the layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pages {
    /// Entries in all pages together.
    pub entries: u64,
    /// The pages, in entry order.
    pub pages: Vec<PageRef>,
}

/// One page of a [`Pages`] manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    /// The blob holding the page.
    pub blob: BlobId,
    /// Entries in the page (at least one).
    pub entries: u32,
    /// Path of the page's first entry, so a reader can find the page of a
    /// path without reading the others.
    pub first: Vec<u8>,
}

/// Most entries in one page.
pub const PAGE_ENTRIES: usize = 32_768;
/// A page is cut once its encoding reaches this many bytes.
pub const PAGE_BYTES: usize = 4 << 20;
/// Check that a path is relative, has no empty, `.` or `..` components and no
/// NUL bytes. The empty path (the root) is allowed.
pub fn path_is_safe(path: &[u8]) -> bool {
    if path.is_empty() {
        return true;
    }
    path.split(|&b| b == b'/')
        .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0))
}

/// The parent of a non-root path (`b""` for top-level names).
pub fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

/// A non-root path's parent and last component (`(b"", path)` for
/// top-level names).
pub fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// `s` with control characters and backslashes escaped (`\n`, `\t`,
/// `\xNN`, `\\`), as `ls -b` does: a name can then never start a fake
/// line in text output. JSON output carries names unescaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                for b in c.to_string().bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Printable form of a byte path (lossy, for messages only).
pub fn show(path: &[u8]) -> String {
    if path.is_empty() {
        return "/".into();
    }
    String::from_utf8_lossy(path).into_owned()
}

/// The rules of [`Layer::validate`], checked one entry at a time in
/// order, in memory that follows the depth of the tree, not its size: a
/// layer too large to hold is checked as it is written or read.
#[derive(Default)]
pub struct Checker {
    /// Entries checked so far.
    seen: u64,
    /// The previous entry's path.
    prev: Vec<u8>,
    /// The directories that may still have entries below them. In path
    /// byte order the entries below `d` come after every name that
    /// continues `d` with a byte below `/` (`d-x` sorts between `d` and
    /// `d/x`), so they are not always next to `d`; but a directory can
    /// still have entries to come only while the current path starts with
    /// it followed by a byte below `0` (the byte after `/`). Those
    /// directories are prefixes of one another: a stack.
    open: Vec<Vec<u8>>,
    /// The node kind of each hard-link group.
    groups: HashMap<u32, std::mem::Discriminant<Node>>,
}

impl Checker {
    /// Check the next entry.
    ///
    /// # Errors
    /// The first violation, naming the path.
    pub fn check(&mut self, e: &Entry) -> Result<()> {
        self.seen += 1;
        if self.seen == 1 {
            if !e.path.is_empty() || !e.node.is_dir() {
                bail!("layer manifest does not start with the root directory");
            }
            if e.node != Node::dir(DirKind::Merge) {
                bail!("layer manifest has an opaque or renamed root");
            }
            return Ok(());
        }
        if self.prev >= e.path {
            bail!(
                "layer manifest entries out of order or duplicated at {}",
                show(&e.path)
            );
        }
        if e.path.is_empty() || !path_is_safe(&e.path) {
            bail!("layer manifest has an unsafe path {:?}", show(&e.path));
        }
        let path = &e.path;
        while let Some(d) = self.open.last() {
            if path.starts_with(d) && path.get(d.len()).is_some_and(|&b| b < b'0') {
                break;
            }
            self.open.pop();
        }
        let p = parent(path);
        if !p.is_empty() && !self.open.iter().rev().any(|d| d[..] == *p) {
            bail!(
                "layer manifest entry {} has no parent directory in the layer",
                show(path)
            );
        }
        if let Some(r) = e.node.redirect()
            && !redirect_is_valid(r)
        {
            bail!(
                "layer manifest has an invalid redirect {:?} at {}",
                show(r),
                show(path)
            );
        }
        if let Some(g) = e.link {
            if e.node.is_dir() || e.node == Node::Whiteout {
                bail!("hard-linked directory or whiteout at {}", show(path));
            }
            let kind = std::mem::discriminant(&e.node);
            if *self.groups.entry(g).or_insert(kind) != kind {
                bail!("hard-link group {g} mixes file types at {}", show(path));
            }
        }
        if let Node::File { size, extents } = &e.node {
            let mut end = 0u64;
            for x in extents {
                if x.offset < end {
                    bail!("overlapping extents in {}", show(path));
                }
                let len: u64 = x.chunks.iter().map(|c| c.len as u64).sum();
                end = x.offset.saturating_add(len);
            }
            if end > *size {
                bail!("extents beyond the file size in {}", show(path));
            }
        }
        if e.node.is_dir() {
            self.open.push(e.path.clone());
        }
        self.prev.clone_from(&e.path);
        Ok(())
    }

    /// Entries checked so far.
    pub fn count(&self) -> u64 {
        self.seen
    }

    /// After the last entry: the layer had one.
    ///
    /// # Errors
    /// An empty layer.
    pub fn finish(&self) -> Result<()> {
        if self.seen == 0 {
            bail!("layer manifest has no root entry");
        }
        Ok(())
    }
}

impl Layer {
    /// Validate the structural rules every reader relies on: safe paths,
    /// strictly ascending order (no duplicates), the root first and a
    /// directory, every parent present as a directory in this layer, hard-link
    /// groups only over non-directories of one kind, extents in order.
    ///
    /// # Errors
    /// The first violation, naming the path.
    pub fn validate(&self) -> Result<()> {
        let mut check = Checker::default();
        for e in &self.entries {
            check.check(e)?;
        }
        check.finish()
    }

    /// Whether any directory of this layer is a renamed one.
    pub fn has_redirects(&self) -> bool {
        self.entries.iter().any(|e| e.node.redirect().is_some())
    }

    /// Bytes of file data (apparent sizes) in this layer.
    pub fn data_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.node {
                Node::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }
}

/// An entry of a merged view: which layer it comes from and the entry itself.
#[derive(Clone, Debug)]
pub struct Merged<'a> {
    /// Index of the owning layer in the chain (0 = bottom).
    pub layer: usize,
    /// The entry, at its path in the view (a directory's kind is `Merge`:
    /// how it was stacked does not matter once merged).
    pub entry: Cow<'a, Entry>,
}

impl Merged<'_> {
    /// Hard-link identity across the chain: (layer, group).
    pub fn link_key(&self) -> Option<(usize, u32)> {
        self.entry.link.map(|g| (self.layer, g))
    }
}

/// The merged view of a chain, keyed by path.
pub type View<'a> = BTreeMap<Vec<u8>, Merged<'a>>;

/// A chain of manifests as a [`stack::Source`]: each layer's entries by
/// path, and each directory's names.
pub struct Chain<'a> {
    by_path: Vec<HashMap<&'a [u8], &'a Entry>>,
    names: Vec<HashMap<&'a [u8], Vec<&'a [u8]>>>,
}

impl<'a> Chain<'a> {
    /// Index `layers` (bottom first; each [validated](Layer::validate)).
    pub fn new(layers: &'a [Layer]) -> Self {
        let mut by_path = Vec::with_capacity(layers.len());
        let mut names = Vec::with_capacity(layers.len());
        for l in layers {
            let mut p: HashMap<&[u8], &Entry> = HashMap::with_capacity(l.entries.len());
            let mut n: HashMap<&[u8], Vec<&[u8]>> = HashMap::new();
            for e in &l.entries {
                p.insert(&e.path, e);
                if !e.path.is_empty() {
                    let (par, name) = split(&e.path);
                    n.entry(par).or_default().push(name);
                }
            }
            by_path.push(p);
            names.push(n);
        }
        Self { by_path, names }
    }

    /// The entry at `path` of `layer`.
    pub fn get(&self, layer: usize, path: &[u8]) -> Option<&'a Entry> {
        self.by_path[layer].get(path).copied()
    }
}

impl stack::Source for Chain<'_> {
    fn count(&self) -> usize {
        self.by_path.len()
    }
    fn kind(&self, layer: usize, path: &[u8]) -> Option<stack::Kind> {
        Some(match &self.get(layer, path)?.node {
            Node::Whiteout => stack::Kind::Whiteout,
            Node::Dir { kind } => stack::Kind::Dir(kind.clone()),
            _ => stack::Kind::Other,
        })
    }
    fn names(&self, layer: usize, dir: &[u8]) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.names[layer]
            .get(dir)
            .map(|n| n.iter().map(|x| x.to_vec()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The top entry of a merged stack.
fn top<'a>(chain: &Chain<'a>, s: &[stack::Slot]) -> Option<(usize, &'a Entry)> {
    match s.first()? {
        stack::Slot::Layer(l, p) => Some((*l, chain.get(*l, p)?)),
        stack::Slot::Below(_) => None,
    }
}

/// Merge a chain of layers (bottom first) as the kernel does
/// ([`crate::stack`]): a whiteout hides the name, an opaque directory
/// hides what is below it, a renamed directory continues where it came
/// from, other directories merge by name (the top one's metadata wins),
/// anything else replaces. Whiteouts never appear in the result.
///
/// Layers must be [validated](Layer::validate); then every entry of the
/// view has its parent in the view as a directory.
pub fn restack(layers: &[Layer]) -> View<'_> {
    let chain = Chain::new(layers);
    let mut view: View<'_> = BTreeMap::new();
    stack::Model::new(&chain, false).walk(|path, s, _| {
        let Some((layer, e)) = top(&chain, s) else {
            return;
        };
        let entry = if e.path == path
            && !matches!(e.node, Node::Dir { ref kind } if *kind != DirKind::Merge)
        {
            Cow::Borrowed(e)
        } else {
            let mut o = e.clone();
            o.path = path.to_vec();
            if o.node.is_dir() {
                o.node = Node::dir(DirKind::Merge);
            }
            Cow::Owned(o)
        };
        view.insert(path.to_vec(), Merged { layer, entry });
    });
    view
}

/// Squash consecutive layers into one with the same effect: for any chain
/// `below`, `restack(below ++ [squash(layers)])` shows what
/// `restack(below ++ layers)` shows ([`stack::plan`]; with `bottom`,
/// nothing is below and the result is the merged view itself). Hard-link
/// groups are renumbered; a group keeps its identity even with one member
/// left, since a layer above may show that member under a second name (a
/// renamed parent).
///
/// The input layers must be [validated](Layer::validate); the result is.
pub fn squash(layers: &[Layer], bottom: bool) -> Layer {
    let chain = Chain::new(layers);
    let mut renum: HashMap<(usize, u32), u32> = HashMap::new();
    let entries = stack::plan(&chain, bottom)
        .into_iter()
        .filter_map(|p| {
            let Some((layer, real)) = p.from else {
                return Some(Entry {
                    path: p.path,
                    node: Node::Whiteout,
                    meta: Meta::default(),
                    link: None,
                });
            };
            let mut e = chain.get(layer, &real)?.clone();
            e.path = p.path;
            if let Some(kind) = p.dir {
                e.node = Node::dir(kind);
            }
            e.link = e.link.map(|g| {
                let n = renum.len() as u32;
                *renum.entry((layer, g)).or_insert(n)
            });
            Some(e)
        })
        .collect();
    Layer { entries }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn dir(p: &str, opaque: bool) -> Entry {
        Entry {
            path: p.as_bytes().to_vec(),
            node: Node::dir(if opaque {
                DirKind::Opaque
            } else {
                DirKind::Merge
            }),
            meta: Meta::default(),
            link: None,
        }
    }
    pub fn file(p: &str, tag: u8) -> Entry {
        Entry {
            path: p.as_bytes().to_vec(),
            node: Node::File {
                size: 1,
                extents: vec![Extent {
                    offset: 0,
                    chunks: vec![Chunk {
                        id: BlobId(crate::format::Id([tag; 32])),
                        len: 1,
                    }],
                }],
            },
            meta: Meta::default(),
            link: None,
        }
    }
    pub fn rdir(p: &str, from: &str) -> Entry {
        Entry {
            path: p.as_bytes().to_vec(),
            node: Node::dir(DirKind::Redirect(from.as_bytes().to_vec())),
            meta: Meta::default(),
            link: None,
        }
    }
    pub fn wh(p: &str) -> Entry {
        Entry {
            path: p.as_bytes().to_vec(),
            node: Node::Whiteout,
            meta: Meta::default(),
            link: None,
        }
    }
    pub fn layer(mut e: Vec<Entry>) -> Layer {
        e.sort_by(|a, b| a.path.cmp(&b.path));
        Layer { entries: e }
    }
    fn paths(v: &View<'_>) -> Vec<(String, usize)> {
        v.iter()
            .map(|(k, m)| (String::from_utf8_lossy(k).into_owned(), m.layer))
            .collect()
    }

    #[test]
    fn whiteout_opaque_and_merge() {
        let l0 = layer(vec![
            dir("", false),
            dir("a", false),
            file("a/x", 1),
            file("a/y", 1),
            dir("b", false),
            file("b/z", 1),
            file("c", 1),
            dir("d", false),
            file("d/q", 1),
        ]);
        let l1 = layer(vec![
            dir("", false),
            dir("a", false),
            wh("a/x"),
            file("a/new", 2),
            dir("b", true),
            file("b/w", 2),
            wh("c"),
            wh("d"),
        ]);
        let l2 = layer(vec![dir("", false), dir("c", false), file("c/k", 3)]);
        for l in [&l0, &l1, &l2] {
            l.validate().unwrap();
        }
        let chain = [l0, l1, l2];
        let v = restack(&chain);
        assert_eq!(
            paths(&v),
            vec![
                ("".into(), 2),
                ("a".into(), 1),
                ("a/new".into(), 1),
                ("a/y".into(), 0),
                ("b".into(), 1),
                ("b/w".into(), 1),
                ("c".into(), 2),
                ("c/k".into(), 2),
            ]
        );
    }

    #[test]
    fn file_replaces_dir_and_prefix_siblings_survive() {
        let l0 = layer(vec![
            dir("", false),
            dir("a", false),
            file("a/x", 1),
            file("a-b", 1),
            file("a0", 1),
        ]);
        let l1 = layer(vec![dir("", false), file("a", 2)]);
        let chain = [l0, l1];
        let v = restack(&chain);
        assert_eq!(
            paths(&v),
            vec![
                ("".into(), 1),
                ("a".into(), 1),
                ("a-b".into(), 0),
                ("a0".into(), 0)
            ]
        );
    }

    /// RESEARCH.md A.9: `mv photos pictures; mv pictures/2023
    /// x/2023-archive; add new.jpg` — a merge that ignores redirects loses
    /// the three images; the kernel (and this model) shows all four.
    #[test]
    fn renamed_directories_keep_their_lower_content() {
        let l1 = layer(vec![
            dir("", false),
            dir("photos", false),
            dir("photos/2023", false),
            file("photos/2023/img0", 1),
            file("photos/2023/img1", 1),
            file("photos/top", 1),
            dir("x", false),
        ]);
        let l2 = layer(vec![
            dir("", false),
            wh("photos"),
            rdir("pictures", "photos"),
            wh("pictures/2023"),
            dir("x", false),
            rdir("x/2023-archive", "/photos/2023"),
            file("x/2023-archive/new", 2),
        ]);
        let chain = [l1, l2];
        for l in &chain {
            l.validate().unwrap();
        }
        let v = restack(&chain);
        let got: Vec<String> = v.keys().map(|k| show(k)).collect();
        assert_eq!(
            got,
            [
                "/",
                "pictures",
                "pictures/top",
                "x",
                "x/2023-archive",
                "x/2023-archive/img0",
                "x/2023-archive/img1",
                "x/2023-archive/new"
            ]
        );
        assert_eq!(
            v[&b"x/2023-archive/img0"[..]].entry.path,
            b"x/2023-archive/img0"
        );
        assert_eq!(v[&b"x/2023-archive/img0"[..]].layer, 0);
        // Squashed over nothing: the plain merged tree; over something: the
        // same view, with the redirects kept for the namespace below.
        let flat = squash(&chain, true);
        assert!(!flat.has_redirects());
        assert_eq!(canon(&restack(std::slice::from_ref(&flat))), canon(&v));
        let over = squash(&chain[1..], false);
        assert!(over.has_redirects());
        let a = [chain[0].clone(), over];
        assert_eq!(canon(&restack(&a)), canon(&v));
    }

    #[test]
    fn validate_rejects_bad_layers() {
        let bad = [
            layer(vec![dir("", false), file("../x", 1)]),
            layer(vec![dir("", false), file("/x", 1)]),
            layer(vec![dir("", false), file("a//b", 1)]),
            layer(vec![dir("", false), file("a/b", 1)]),
            layer(vec![file("a", 1)]),
            Layer {
                entries: vec![dir("", false), file("a", 1), file("a", 2)],
            },
            layer(vec![dir("", true)]),
            layer(vec![dir("", false), file("x\0y", 1)]),
            layer(vec![dir("", false), rdir("a", "b/c")]),
            layer(vec![dir("", false), rdir("a", "/b//c")]),
            layer(vec![dir("", false), rdir("a", "..")]),
            layer(vec![dir("", false), rdir("a", "")]),
        ];
        for l in bad {
            assert!(l.validate().is_err(), "{l:?}");
        }
        assert!(!path_is_safe(b"a/./b"));
        assert!(path_is_safe(b"a/.b/..c"));
    }

    use proptest::prelude::*;

    /// A random valid layer over a small name space.
    fn arb_layer() -> impl Strategy<Value = Layer> {
        let names = ["a", "b", "c"];
        let path = proptest::collection::vec(0usize..3, 1..4)
            .prop_map(move |v| v.iter().map(|i| names[*i]).collect::<Vec<_>>().join("/"));
        let node = prop_oneof![
            Just(0u8), // whiteout
            Just(1u8), // dir
            Just(2u8), // opaque dir
            Just(3u8), // file
            Just(4u8), // hard-linked file
            Just(5u8), // renamed dir, relative redirect
            Just(6u8), // renamed dir, absolute redirect
        ];
        (
            proptest::collection::vec((path, node, 0u8..4, 0usize..3, 0usize..3), 0..8),
            0u32..3,
        )
            .prop_map(move |(items, root_mode)| {
                let mut m: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
                let mut root = dir("", false);
                root.meta.mode = root_mode;
                m.insert(Vec::new(), root);
                for (p, kind, tag, r1, r2) in items {
                    let pb = p.as_bytes().to_vec();
                    // Skip paths under a non-directory of this layer.
                    let mut blocked = false;
                    let comps: Vec<&str> = p.split('/').collect();
                    for k in 1..comps.len() {
                        let anc = comps[..k].join("/").into_bytes();
                        if let Some(a) = m.get(&anc)
                            && !a.node.is_dir()
                        {
                            blocked = true;
                        }
                    }
                    if blocked || m.contains_key(&pb) {
                        continue;
                    }
                    let has_children = m
                        .keys()
                        .any(|k| k.len() > pb.len() && k.starts_with(&pb) && k[pb.len()] == b'/');
                    let mut e = match kind {
                        0 if !has_children => wh(&p),
                        2 => dir(&p, true),
                        3 | 4 if !has_children => file(&p, tag),
                        5 => rdir(&p, names[r1]),
                        6 if r2 == 0 => rdir(&p, &format!("/{}", names[r1])),
                        6 => rdir(&p, &format!("/{}/{}", names[r1], names[r2])),
                        _ => dir(&p, false),
                    };
                    if kind == 4 && !e.node.is_dir() && e.node != Node::Whiteout {
                        e.link = Some(0);
                    }
                    e.meta.mode = tag as u32;
                    for k in 1..comps.len() {
                        let anc = comps[..k].join("/");
                        m.entry(anc.clone().into_bytes())
                            .or_insert_with(|| dir(&anc, false));
                    }
                    m.insert(pb, e);
                }
                Layer {
                    entries: m.into_values().collect(),
                }
            })
    }

    /// A view in comparable form: path → (node, meta, other members of its
    /// hard-link group).
    type Canon = BTreeMap<Vec<u8>, (Node, Meta, Vec<Vec<u8>>)>;

    fn canon(v: &View<'_>) -> Canon {
        let mut groups: HashMap<(usize, u32), Vec<Vec<u8>>> = HashMap::new();
        for (k, m) in v {
            if let Some(g) = m.link_key() {
                groups.entry(g).or_default().push(k.clone());
            }
        }
        v.iter()
            .map(|(k, m)| {
                let mut node = m.entry.node.clone();
                if let Node::Dir { .. } = node {
                    node = Node::dir(DirKind::Merge);
                }
                let g = m.link_key().map(|g| groups[&g].clone()).unwrap_or_default();
                let g = if g.len() > 1 { g } else { Vec::new() };
                (k.clone(), (node, m.entry.meta.clone(), g))
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn squash_preserves_every_view(chain in proptest::collection::vec(arb_layer(), 1..6), a in 0usize..6, b in 0usize..7) {
            for l in &chain {
                prop_assert!(l.validate().is_ok(), "generator made an invalid layer: {l:?}");
            }
            let n = chain.len();
            let (a, b) = (a.min(n - 1), b.clamp(a.min(n - 1) + 1, n));
            let sq = squash(&chain[a..b], a == 0);
            prop_assert!(sq.validate().is_ok(), "{:?}", sq.validate());
            let mut new_chain: Vec<Layer> = chain[..a].to_vec();
            new_chain.push(sq);
            new_chain.extend_from_slice(&chain[b..]);
            // The squashed point itself and every later point look the same.
            for top in b..=n {
                let old = canon(&restack(&chain[..top]));
                let k = a + 1 + (top - b);
                let new = canon(&restack(&new_chain[..k]));
                prop_assert_eq!(old, new, "chain {:?} squash {}..{}", chain, a, b);
            }
        }
    }
}
