//! Shared harness for the integration tests: an isolated environment
//! (repository, state dir, volumes under one temp dir) driving the real
//! `laybak` binary, and a listing of a directory tree for comparisons.
#![allow(dead_code)]

pub mod s3;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Fail loudly when not root: in CI the test fails, elsewhere it is skipped
/// with a visible message.
pub fn need_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test mounts overlayfs and needs root; CI must run tests as root");
    }
    eprintln!(
        "\n*** SKIPPED: this test mounts overlayfs and needs root; run the tests as root ***\n"
    );
    false
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub state: PathBuf,
    /// Variables every laybak run gets (an S3 store's endpoint and keys).
    pub vars: Vec<(String, String)>,
    /// Run laybak under this host name (in a UTS namespace of its own), as
    /// another machine sharing the repository would.
    pub host: Option<String>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "command failed: {}", self.stderr);
        self
    }
    #[track_caller]
    pub fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(
            self.code, code,
            "unexpected exit; stderr: {} stdout: {}",
            self.stderr, self.stdout
        );
        assert!(
            self.stderr.contains(needle),
            "stderr {:?} does not mention {needle:?}",
            self.stderr
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "error should be one line: {:?}",
            self.stderr
        );
        self
    }
}

/// The password of every repository the tests make (`LAYBAK_PASSWORD`).
pub const PASSWORD: &str = "laybak test password";

/// [`PASSWORD`], for tests that open a repository through the library.
pub fn passwords() -> laybak::password::Given {
    laybak::password::Given(PASSWORD.to_string().into())
}

/// An encrypted repository with [`PASSWORD`] and a cheap KDF.
pub fn protection() -> laybak::repo::Protection {
    laybak::repo::Protection::test(PASSWORD)
}

impl Env {
    pub fn new() -> Env {
        let base = std::env::var_os("LAYBAK_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("lbt")
            .tempdir_in(base)
            .unwrap();
        let repo = dir.path().join("repo");
        let state = dir.path().join("state");
        Env {
            dir,
            repo,
            state,
            vars: Vec::new(),
            host: None,
        }
    }

    /// An environment whose repository lives in `store`, under a prefix
    /// no other test uses.
    pub fn on(store: &s3::Store, tag: &str) -> Env {
        let mut e = Env::new();
        e.repo = PathBuf::from(store.location(&s3::unique(tag)));
        e.vars = store.vars.clone();
        e
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self) -> Command {
        let bin = env!("CARGO_BIN_EXE_laybak");
        let mut c = match &self.host {
            None => Command::new(bin),
            Some(h) => {
                let mut c = Command::new("unshare");
                c.args([
                    "--uts",
                    "sh",
                    "-c",
                    "hostname \"$0\" && exec \"$@\"",
                    h,
                    bin,
                ]);
                c
            }
        };
        // Every repository the tests make is encrypted, with a KDF cheap
        // enough for hundreds of runs of the binary.
        c.env_remove("LAYBAK_FAILPOINT")
            .env_remove("LAYBAK_PASSWORD_FILE")
            .env_remove("LAYBAK_PASSWORD_COMMAND")
            .env("LAYBAK_PASSWORD", PASSWORD)
            .env("LAYBAK_KDF", "64,1")
            .env("LAYBAK_REPO", &self.repo)
            .env("LAYBAK_STATE_DIR", &self.state);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&OsStr]) -> Run {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&OsStr], env: &[(&str, &str)]) -> Run {
        let mut c = self.cmd();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let o: Output = c.output().expect("run laybak");
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn lb(&self, args: &[&str]) -> Run {
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        self.run(&a)
    }

    pub fn init(&self) {
        self.lb(&["init"]).ok();
    }
}

/// Unmount everything below the temp dir (tests clean up even on failure).
impl Drop for Env {
    fn drop(&mut self) {
        let root = self.dir.path().to_path_buf();
        for _ in 0..3 {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut targets: Vec<PathBuf> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .map(|t| PathBuf::from(t.replace("\\040", " ")))
                .filter(|t| t.starts_with(&root))
                .collect();
            if targets.is_empty() {
                break;
            }
            targets.reverse();
            for t in targets {
                let _ = rustix::mount::unmount(&t, rustix::mount::UnmountFlags::DETACH);
            }
        }
        // Volume roots are immutable while attached; let TempDir remove them.
        clear_immutable(&root, 3);
    }
}

/// One entry of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub content: Option<blake3::Hash>,
    pub target: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Smallest path sharing this inode, for hard-link groups of 2+.
    pub link_group: Option<Vec<u8>>,
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    laybak::scan::read_xattrs(p)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(b"trusted.overlay.") && !k.starts_with(b"security.selinux"))
        .collect()
}

/// List a tree: path (relative, bytes; root = empty) → record.
pub fn listing(root: &Path) -> BTreeMap<Vec<u8>, Rec> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((p, rel)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_fifo() {
            'p'
        } else if ft.is_socket() {
            's'
        } else if ft.is_char_device() {
            'c'
        } else {
            'b'
        };
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                if rel.is_empty() && e.file_name() == ".laybak" {
                    continue;
                }
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(e.file_name().as_bytes());
                stack.push((e.path(), r));
            }
        } else {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel.clone(),
            Rec {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                size: if ft.is_dir() { 0 } else { md.len() },
                content: ft
                    .is_file()
                    .then(|| blake3::hash(&std::fs::read(&p).unwrap())),
                target: ft.is_symlink().then(|| {
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                rdev: md.rdev(),
                xattrs: xattrs(&p),
                link_group: None,
            },
        );
    }
    for (_, paths) in inodes {
        if paths.len() > 1 {
            let min = paths.iter().min().unwrap().clone();
            for p in paths {
                out.get_mut(&p).unwrap().link_group = Some(min.clone());
            }
        }
    }
    out
}

/// Assert two listings are equal, reporting the first differences readably.
#[track_caller]
pub fn assert_same(what: &str, want: &BTreeMap<Vec<u8>, Rec>, got: &BTreeMap<Vec<u8>, Rec>) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {:?}", String::from_utf8_lossy(k))),
            Some(g) if g != v => diffs.push(format!(
                "differs {:?}:\n  want {v:?}\n  got  {g:?}",
                String::from_utf8_lossy(k)
            )),
            _ => {}
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            diffs.push(format!("extra {:?}", String::from_utf8_lossy(k)));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(20)].join("\n")
    );
}

pub fn os(p: &Path) -> &OsStr {
    p.as_os_str()
}

fn clear_immutable(dir: &Path, depth: usize) {
    use rustix::fs::{IFlags, Mode, OFlags};
    if let Ok(fd) = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW,
        Mode::empty(),
    ) && let Ok(f) = rustix::fs::ioctl_getflags(&fd)
        && f.contains(IFlags::IMMUTABLE)
    {
        let _ = rustix::fs::ioctl_setflags(&fd, f - IFlags::IMMUTABLE);
    }
    if depth == 0 {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                clear_immutable(&e.path(), depth - 1);
            }
        }
    }
}

/// `cp -a from to` (keeps owners, modes, times, xattrs and hard links).
pub fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// Every non-directory below `d` (empty when `d` does not exist).
pub fn files_below(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_below(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// An unprivileged local account for attack tests, created with `useradd`
/// on first use (the tests run as root). Returns (uid, gid).
pub fn test_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(name)
            .status()
            .expect("run useradd");
        // Another test may have created it at the same moment.
        assert!(st.success() || id("-u").is_some(), "useradd {name} failed");
    }
    (id("-u").expect("uid"), id("-g").expect("gid"))
}

/// A command run as `user` (uid, gid) with no supplementary groups.
pub fn as_user(user: (u32, u32), program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.0))
        .arg(format!("--regid={}", user.1))
        .arg("--clear-groups")
        .arg(program);
    c
}

impl Env {
    /// `laybak snapshots --json` of the environment's repository, parsed.
    pub fn snapshots_json(&self) -> Vec<serde_json::Value> {
        let out = self.lb(&["snapshots", "--json"]).ok().stdout;
        serde_json::from_str::<serde_json::Value>(&out)
            .expect("snapshots --json is JSON")
            .as_array()
            .expect("an array")
            .clone()
    }

    /// Full ids of every snapshot in the repository, oldest first.
    pub fn snapshot_ids(&self) -> Vec<String> {
        self.snapshots_json()
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_string())
            .collect()
    }
}
