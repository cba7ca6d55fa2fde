//! The scanner over trees built to break it: paths longer than PATH_MAX,
//! trees deeper than the descriptor limit, and entries swapped between the
//! walk and the reading of file data. Library level (no mounts), through the
//! real repository code.

mod common;
use common::*;
use laybak::layer::{Layer, Node};
use laybak::repo::{Packer, Repo};
use laybak::scan::{self, Source};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{FileType, Mode, OFlags};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// Well above PATH_MAX (4096): 40 levels of 200-byte names.
const LEVELS: usize = 40;
const NAME_LEN: usize = 200;

fn level_name(i: usize) -> Vec<u8> {
    let mut n = format!("{i:03}").into_bytes();
    n.resize(NAME_LEN, b'x');
    n
}

fn open_dir(dir: impl AsFd, name: &[u8]) -> OwnedFd {
    rustix::fs::openat(
        dir,
        std::ffi::OsStr::from_bytes(name),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

fn write_at(dir: impl AsFd, name: &[u8], data: &[u8]) {
    let fd = rustix::fs::openat(
        dir,
        std::ffi::OsStr::from_bytes(name),
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    assert_eq!(rustix::io::write(&fd, data).unwrap(), data.len());
}

/// `levels` nested directories below `root` (made relative to descriptors,
/// never by path); returns the descriptor of the deepest one and its path
/// relative to `root`.
fn deep_dirs(root: &Path, levels: usize) -> (OwnedFd, Vec<u8>) {
    let mut fd = open_dir(rustix::fs::CWD, root.as_os_str().as_bytes());
    let mut rel = Vec::new();
    for i in 0..levels {
        let n = level_name(i);
        rustix::fs::mkdirat(
            &fd,
            std::ffi::OsStr::from_bytes(&n),
            Mode::from_raw_mode(0o755),
        )
        .unwrap();
        fd = open_dir(&fd, &n);
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&n);
    }
    (fd, rel)
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut p = a.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(b);
    p
}

/// The bytes of a scanned file, read back from the repository (holes as
/// zeros).
fn content(repo: &Repo, node: &Node) -> Vec<u8> {
    let Node::File { size, extents } = node else {
        panic!("not a file: {node:?}");
    };
    let mut out = vec![0u8; *size as usize];
    for x in extents {
        let mut at = x.offset as usize;
        for c in &x.chunks {
            let b = repo.read_blob(&c.id).unwrap();
            out[at..at + b.len()].copy_from_slice(&b);
            at += b.len();
        }
    }
    out
}

fn scan_into(repo: &Repo, root: &Path, source: Source) -> anyhow::Result<Layer> {
    let packer = Packer::new(repo);
    let dir = tempfile::tempdir()?;
    let spill = laybak::spill::Spill::in_dir(dir.path());
    let (scanned, _) = scan::scan(root, source, &packer, &repo.config, None, &spill)?;
    packer.finish()?;
    scanned.layer()
}

/// Run `f` on another thread; fail the test (instead of hanging it) if it
/// does not finish within a generous bound.
fn must_finish<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{what} blocked"))
}

#[test]
fn a_tree_deeper_than_path_max_is_scanned_and_its_data_read() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let root = env.path("tree");
    std::fs::create_dir(&root).unwrap();
    let (bottom, rel) = deep_dirs(&root, LEVELS);
    write_at(&bottom, b"bottom.txt", b"at the very bottom\n");
    rustix::fs::symlinkat("../up", &bottom, "link").unwrap();
    rustix::fs::mknodat(
        &bottom,
        "pipe",
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    drop(bottom);
    let file = join(&rel, b"bottom.txt");
    assert!(file.len() > 4096 + 3000, "the test tree is deep enough");

    let repo = Repo::init(&env.path("repo"), &laybak::repo::Protection::Plaintext).unwrap();
    let layer = scan_into(&repo, &root, Source::Base).unwrap();
    layer.validate().unwrap();
    repo.write_layer(&layer).unwrap();
    assert_eq!(layer.entries.len(), 1 + LEVELS + 3);
    let by_path: BTreeMap<&[u8], &Node> = layer
        .entries
        .iter()
        .map(|e| (e.path.as_slice(), &e.node))
        .collect();
    assert_eq!(
        content(&repo, by_path[file.as_slice()]),
        b"at the very bottom\n"
    );
    assert_eq!(
        by_path[join(&rel, b"link").as_slice()],
        &Node::Symlink {
            target: b"../up".to_vec()
        }
    );
    assert_eq!(by_path[join(&rel, b"pipe").as_slice()], &Node::Fifo);

    // `walk` (status, attach checks) sees the same entries.
    let found = scan::walk(&root, Source::Base).unwrap();
    let paths: Vec<&[u8]> = found.iter().map(|f| f.entry.path.as_slice()).collect();
    let want: Vec<&[u8]> = layer.entries.iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(paths, want);
}

/// Deeper than the descriptor limit, with a second subdirectory at every
/// level so the walk must come back to (and re-open) each directory: the
/// walk holds a bounded number of descriptors.
#[test]
fn a_tree_deeper_than_the_descriptor_limit_is_walked() {
    const DEPTH: usize = 1500;
    if !need_root() {
        return;
    }
    let env = Env::new();
    let root = env.path("tree");
    std::fs::create_dir(&root).unwrap();
    {
        let mut fd = open_dir(rustix::fs::CWD, root.as_os_str().as_bytes());
        for i in 0..DEPTH {
            for n in ["aaa", "zzz"] {
                rustix::fs::mkdirat(&fd, n, Mode::from_raw_mode(0o755)).unwrap();
            }
            write_at(&fd, b"f", format!("level {i}").as_bytes());
            fd = open_dir(&fd, b"aaa");
        }
    }
    let repo = Repo::init(&env.path("repo"), &laybak::repo::Protection::Plaintext).unwrap();

    // Far fewer descriptors than levels.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let low = rustix::process::Rlimit {
        current: Some(256),
        maximum: lim.maximum,
    };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, low).unwrap();
    let got = scan_into(&repo, &root, Source::Upper);
    rustix::process::setrlimit(rustix::process::Resource::Nofile, lim).unwrap();
    let layer = got.unwrap();

    layer.validate().unwrap();
    assert_eq!(layer.entries.len(), 1 + DEPTH * 3);
    let deepest = layer
        .entries
        .iter()
        .filter(|e| e.path.ends_with(b"/f"))
        .max_by_key(|e| e.path.len())
        .unwrap();
    assert!(deepest.path.len() > 4096);
    assert_eq!(
        content(&repo, &deepest.node),
        format!("level {}", DEPTH - 1).as_bytes()
    );
}

#[test]
fn a_fifo_swapped_in_after_the_walk_fails_the_scan_without_blocking() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let root = env.path("tree");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/data"), b"some data").unwrap();
    std::fs::write(root.join("other"), b"other").unwrap();
    let found = scan::walk(&root, Source::Upper).unwrap();

    // No writer will ever open it: reading it would block forever.
    std::fs::remove_file(root.join("d/data")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("d/data"),
        FileType::Fifo,
        Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();

    let repo_dir = env.path("repo");
    let r = must_finish("reading a swapped-in fifo", move || {
        let repo = Repo::init(&repo_dir, &laybak::repo::Protection::test("pw")).unwrap();
        let packer = Packer::new(&repo);
        scan::archive(&root, found, &packer, &repo.config, None)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    });
    let e = r.unwrap_err();
    assert!(
        e.contains("d/data changed while it was being archived (it is no longer a regular file)"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_file_replaced_or_resized_after_the_walk_fails_the_scan() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let repo = Repo::init(&env.path("repo"), &laybak::repo::Protection::Plaintext).unwrap();
    let root = env.path("tree");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("f"), b"original").unwrap();

    // Another inode under the same name, same size.
    let found = scan::walk(&root, Source::Upper).unwrap();
    std::fs::write(root.join("g"), b"imposter").unwrap();
    std::fs::rename(root.join("g"), root.join("f")).unwrap();
    let packer = Packer::new(&repo);
    let e = scan::archive(&root, found, &packer, &repo.config, None).unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "f changed while it was being archived (it is another file now)"
    );

    // The same inode, grown.
    let found = scan::walk(&root, Source::Upper).unwrap();
    std::fs::write(root.join("f"), b"imposter and more").unwrap();
    let e = scan::archive(&root, found, &packer, &repo.config, None).unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "f changed while it was being archived (its size went from 8 to 17 bytes)"
    );

    // Gone.
    let found = scan::walk(&root, Source::Upper).unwrap();
    std::fs::remove_file(root.join("f")).unwrap();
    let e = scan::archive(&root, found, &packer, &repo.config, None).unwrap_err();
    assert!(
        format!("{e:#}").starts_with("f changed while it was being archived (cannot reopen it"),
        "{e:#}"
    );
}

#[test]
fn a_directory_swapped_for_a_symlink_after_the_walk_is_not_followed() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let repo = Repo::init(&env.path("repo"), &laybak::repo::Protection::Plaintext).unwrap();
    let root = env.path("tree");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/secret"), b"mine").unwrap();
    // Outside the tree: the same relative layout, the same size.
    let outside = env.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"root").unwrap();

    let found = scan::walk(&root, Source::Upper).unwrap();
    std::fs::rename(root.join("d"), env.path("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
    let packer = Packer::new(&repo);
    let e = scan::archive(&root, found, &packer, &repo.config, None).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.starts_with("d/secret changed while it was being archived (cannot reopen it"),
        "{e}"
    );
    drop(packer);

    // A fresh walk records the symlink as a symlink.
    let layer = scan_into(&repo, &root, Source::Upper).unwrap();
    let d = layer.entries.iter().find(|e| e.path == b"d").unwrap();
    assert!(matches!(d.node, Node::Symlink { .. }));
    assert_eq!(layer.entries.len(), 2);
}

#[test]
fn an_error_about_a_long_or_odd_path_is_one_bounded_line() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let root = env.path("tree");
    std::fs::create_dir(&root).unwrap();
    let (bottom, _) = deep_dirs(&root, LEVELS);
    write_at(&bottom, b"evil\nname", b"x");
    // Set through the descriptor's /proc path: the full path is too long.
    let p = Path::new(&format!(
        "/proc/self/fd/{}",
        rustix::fd::AsRawFd::as_raw_fd(&bottom)
    ))
    .join("evil\nname");
    rustix::fs::lsetxattr(
        &p,
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    drop(bottom);
    let e = match scan::walk(&root, Source::Base) {
        Ok(_) => panic!("an overlay attribute in user data must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.len() < 600, "{} bytes: {e}", e.len());
    assert!(e.starts_with("000xxx"), "{e}");
    assert!(e.contains('…'), "{e}");
    assert!(
        e.contains("xxx/evil\\nname carries the overlay attribute trusted.overlay.opaque"),
        "{e}"
    );
}

/// On an ordinary tree the manifest agrees, entry for entry, with an
/// independent listing made through paths (`tests/common`).
#[test]
fn an_ordinary_tree_scans_as_an_independent_listing_sees_it() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let root = env.path("tree");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("a/one"), b"1").unwrap();
    std::fs::write(root.join("a/b/two"), vec![7u8; 300_000]).unwrap();
    std::fs::write(root.join("zero"), b"").unwrap();
    std::fs::hard_link(root.join("a/one"), root.join("one-again")).unwrap();
    std::fs::hard_link(root.join("a/one"), root.join("a/b/one-more")).unwrap();
    std::os::unix::fs::symlink("a/one", root.join("ln")).unwrap();
    std::fs::hard_link(root.join("ln"), root.join("ln2")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("pipe"),
        FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("null"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"tail", 2 << 20).unwrap();
    drop(sparse);
    std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"bad\xffname")), b"b").unwrap();
    for (p, k, v) in [
        ("a/one", "user.k", &b"v"[..]),
        ("a", "trusted.t", b"dir"),
        ("", "user.root", b"r"),
        ("ln", "trusted.s", b"sym"),
    ] {
        rustix::fs::lsetxattr(root.join(p), k, v, rustix::fs::XattrFlags::empty()).unwrap();
    }
    rustix::fs::chownat(
        rustix::fs::CWD,
        root.join("a/b"),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(5678)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();

    let want = listing(&root);
    let repo = Repo::init(&env.path("repo"), &laybak::repo::Protection::Plaintext).unwrap();
    let layer = scan_into(&repo, &root, Source::Base).unwrap();
    layer.validate().unwrap();
    let mut first_of: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for e in &layer.entries {
        if let Some(g) = e.link {
            first_of.entry(g).or_insert_with(|| e.path.clone());
        }
    }
    let got: BTreeMap<Vec<u8>, Rec> = layer
        .entries
        .iter()
        .map(|e| {
            let (kind, size, target, rdev) = match &e.node {
                Node::Dir { .. } => ('d', 0, None, 0),
                Node::File { size, .. } => ('f', *size, None, 0),
                Node::Symlink { target } => ('l', target.len() as u64, Some(target.clone()), 0),
                Node::Fifo => ('p', 0, None, 0),
                Node::Socket => ('s', 0, None, 0),
                Node::CharDev { rdev } => ('c', 0, None, *rdev),
                Node::BlockDev { rdev } => ('b', 0, None, *rdev),
                Node::Whiteout => panic!("no whiteouts here"),
            };
            let content =
                matches!(e.node, Node::File { .. }).then(|| blake3::hash(&content(&repo, &e.node)));
            let rec = Rec {
                kind,
                mode: e.meta.mode,
                uid: e.meta.uid,
                gid: e.meta.gid,
                mtime: (e.meta.mtime, e.meta.mtime_ns as i64),
                size,
                content,
                target,
                rdev,
                xattrs: e
                    .meta
                    .xattrs
                    .iter()
                    .filter(|(k, _)| !k.starts_with(b"security.selinux"))
                    .cloned()
                    .collect(),
                link_group: e.link.map(|g| first_of[&g].clone()),
            };
            (e.path.clone(), rec)
        })
        .collect();
    assert_same("scan of an ordinary tree", &want, &got);
    let groups: Vec<Option<u32>> = ["a/b/one-more", "a/one", "ln", "ln2", "one-again"]
        .iter()
        .map(|p| {
            layer
                .entries
                .iter()
                .find(|e| e.path == p.as_bytes())
                .unwrap()
                .link
        })
        .collect();
    assert_eq!(groups, [Some(0), Some(0), Some(1), Some(1), Some(0)]);
}

/// A tree large enough to be sorted through runs on disk gives the layer
/// the in-memory sort gives: the same entries in path order (names that
/// sort between a directory and its contents, `d-1` between `d` and
/// `d/x`, among them), hard-link groups numbered in path order across
/// runs, every name of a group carrying the data read once, an inode met
/// once no group; and the layer is written as pages and read back whole.
#[test]
fn a_tree_sorted_through_runs_on_disk_is_the_tree_sorted_in_memory() {
    // Pages of 7 entries: the layer is written as pages and read back.
    // SAFETY: set before any thread starts, in this test's own process
    // (nextest runs each test in one).
    unsafe { std::env::set_var("LAYBAK_PAGE_ENTRIES", "7") };
    let env = Env::new();
    let root = env.path("tree");
    std::fs::create_dir(&root).unwrap();
    for d in 0..12 {
        let dir = root.join(format!("d{}", d % 4)).join(format!("s{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(root.join(format!("d{}-{d}", d % 4))).unwrap();
        std::fs::write(root.join(format!("d{}.{d}", d % 4)), format!("dot {d}")).unwrap();
        for f in 0..40 {
            std::fs::write(dir.join(format!("f{f}")), format!("file {d} {f}")).unwrap();
        }
    }
    // Groups whose names are far apart in the walk and in path order.
    std::fs::hard_link(root.join("d0/s0/f1"), root.join("d3/s11/zz-link")).unwrap();
    std::fs::hard_link(root.join("d0/s0/f1"), root.join("d1-1/first")).unwrap();
    std::fs::hard_link(root.join("d2/s6/f7"), root.join("d0-0/again")).unwrap();
    // An inode with another name outside the tree: no group.
    std::fs::hard_link(root.join("d1/s5/f3"), env.path("outside")).unwrap();

    let repo = Repo::init(&env.path("repo"), &laybak::repo::Protection::Plaintext).unwrap();
    let scan_with = |budget: usize| {
        let dir = tempfile::tempdir().unwrap();
        let spill = laybak::spill::Spill {
            dir: dir.path().into(),
            budget,
        };
        let packer = Packer::new(&repo);
        let (scanned, summary) =
            scan::scan(&root, Source::Base, &packer, &repo.config, None, &spill).unwrap();
        let file = repo
            .stage_entries(&|| Ok(scanned.entries()), &packer)
            .unwrap();
        packer.finish().unwrap();
        let id = repo.put_layer(file).unwrap();
        // Unnamed: nothing left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        (scanned.layer().unwrap(), scanned.runs(), summary, id)
    };
    let (memory, none, summary, mem_id) = scan_with(usize::MAX);
    let (runs, many, _, runs_id) = scan_with(8 << 10);
    assert_eq!(none, 0);
    assert!(many > 10, "only {many} runs");
    memory.validate().unwrap();
    assert_eq!(runs, memory);
    assert_eq!(summary.entries, memory.entries.len() as u64);
    assert_eq!(summary.files, 12 * 40 + 12 + 3);

    let get = |p: &str| {
        memory
            .entries
            .iter()
            .find(|e| e.path == p.as_bytes())
            .unwrap_or_else(|| panic!("{p} missing"))
    };
    let groups: Vec<Option<u32>> = ["d0-0/again", "d0/s0/f1", "d1-1/first", "d2/s6/f7"]
        .iter()
        .map(|p| get(p).link)
        .collect();
    // Numbered in path order: d0-0/again is group 0, d0/s0/f1 group 1.
    assert_eq!(groups, [Some(0), Some(1), Some(1), Some(0)]);
    assert_eq!(get("d3/s11/zz-link").link, Some(1));
    assert_eq!(get("d1/s5/f3").link, None);
    for (a, b) in [("d0/s0/f1", "d3/s11/zz-link"), ("d2/s6/f7", "d0-0/again")] {
        assert_eq!(get(a).node, get(b).node);
        assert_eq!(
            content(&repo, &get(b).node),
            std::fs::read(root.join(a)).unwrap()
        );
    }

    let paged = walk_files(&env.path("repo").join("layers"))
        .iter()
        .filter(|f| std::fs::read(f).unwrap()[7] == laybak::format::LAYER_PAGES)
        .count();
    assert!(paged > 0, "the layer was not written as pages");
    assert_eq!(repo.read_layer(&mem_id).unwrap(), memory);
    assert_eq!(repo.read_layer(&runs_id).unwrap(), memory);
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
