//! Bad input: each case gets one line naming the problem, a non-zero exit,
//! and changes nothing. Plus damaged and hostile repositories.

mod common;
use common::*;
use laybak::format::{FileKind, Time};
use laybak::layer::{DirKind, Entry, Layer, Meta, Node};
use laybak::repo::{Repo, Snapshot, Summary};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Every file below `dir` with its content hash and metadata.
/// Lock files come and go (even read-only commands take a shared lock), so
/// `locks/` is left out.
fn fingerprint(dir: &Path) -> BTreeMap<Vec<u8>, Rec> {
    let mut l = if dir.exists() {
        listing(dir)
    } else {
        BTreeMap::new()
    };
    l.retain(|k, _| !k.starts_with(b"locks"));
    l
}

/// Replace the temp dir and ids so messages compare across runs.
fn redact(s: &str, tmp: &Path) -> String {
    let s = s.replace(tmp.to_str().unwrap(), "[TMP]");
    let mut out = String::new();
    let mut run = String::new();
    for ch in s.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_hexdigit() && !ch.is_ascii_uppercase() {
            run.push(ch);
            continue;
        }
        if run.len() >= 8 && run.chars().any(|c| c.is_ascii_digit()) {
            out.push_str("[ID]");
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(ch);
    }
    out.pop();
    out
}

struct Case {
    args: Vec<String>,
    code: i32,
    needle: &'static str,
}

fn case(args: &[&str], code: i32, needle: &'static str) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
        code,
        needle,
    }
}

#[test]
fn misuse_table() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("f"), b"data").unwrap();
    env.lb(&["attach", vol.to_str().unwrap()]).ok();
    fs::write(vol.join("g"), b"more").unwrap();
    // A second volume so `latest` is ambiguous, and enough snapshots for an
    // ambiguous one-character prefix.
    let other = env.path("other");
    fs::create_dir(&other).unwrap();
    env.lb(&["attach", other.to_str().unwrap()]).ok();
    // Every snapshot in the repository counts (the attaches' too), so the
    // prefix is chosen once exactly two of them share it.
    let mut n = 0;
    let ambiguous = loop {
        fs::write(other.join("x"), n.to_string()).unwrap();
        n += 1;
        env.lb(&["snapshot", other.to_str().unwrap()]).ok();
        let ids = env.snapshot_ids();
        let twice = ids
            .iter()
            .map(|i| &i[..1])
            .find(|p| ids.iter().filter(|i| i.starts_with(*p)).count() == 2);
        if let Some(p) = twice {
            break p.to_string();
        }
    };
    let plain = env.path("plain");
    fs::create_dir(&plain).unwrap();
    fs::write(plain.join("p"), b"p").unwrap();
    let file = env.path("afile");
    fs::write(&file, b"x").unwrap();
    let full = env.path("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"x").unwrap();
    let newer = env.path("newer-repo");
    fs::create_dir(&newer).unwrap();
    let mut cfg = fs::read(env.repo.join("config")).unwrap();
    cfg[7] = 99;
    fs::write(newer.join("config"), cfg).unwrap();
    let withstore = env.path("withstore");
    fs::create_dir_all(withstore.join(".laybak")).unwrap();
    let whiteouty = env.path("whiteouty");
    fs::create_dir(&whiteouty).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        whiteouty.join("dev0"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let xattry = env.path("xattry");
    fs::create_dir(&xattry).unwrap();
    fs::write(xattry.join("f"), b"f").unwrap();
    rustix::fs::lsetxattr(
        xattry.join("f"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let notmounted = env.path("notmounted");
    fs::create_dir(&notmounted).unwrap();

    let p = |p: &Path| p.to_str().unwrap().to_string();
    let (vol_s, plain_s, file_s, full_s) = (p(&vol), p(&plain), p(&file), p(&full));
    let missing = p(&env.path("missing"));
    let repo_s = p(&env.repo);
    let cases = vec![
        case(&["snapshot", &plain_s], 1, "is not a laybak volume"),
        case(&["status", &plain_s], 1, "is not a laybak volume"),
        case(&["down", &plain_s], 1, "is not a laybak volume"),
        case(&["detach", &plain_s], 1, "is not a laybak volume"),
        case(&["attach", &vol_s], 1, "already attached as laybak volume"),
        case(&["attach", &file_s], 1, "is not a directory"),
        case(&["attach", &missing], 1, "does not exist"),
        case(&["attach", &p(&withstore)], 1, "already contains .laybak"),
        case(&["attach", &p(&whiteouty)], 1, "character device 0/0"),
        case(&["attach", &p(&xattry)], 1, "trusted.overlay.opaque"),
        case(
            &["attach", &plain_s, "--name", "bad/name"],
            1,
            "not a usable volume name",
        ),
        case(&["attach", &plain_s, "--name", "vol"], 1, "already exists"),
        case(&["attach", &plain_s, "--tag", "a,b"], 1, "not usable"),
        case(&["init"], 1, "already a laybak repository"),
        case(&["snapshots", "--repo", &missing], 10, "no repository at"),
        case(
            &["snapshots", "--repo", &plain_s],
            10,
            "not a laybak repository",
        ),
        case(&["snapshots", "--repo", &p(&newer)], 1, "upgrade laybak"),
        case(
            &["restore", "0000000000", &p(&env.path("t1"))],
            1,
            "no snapshot matches",
        ),
        case(
            &["restore", &ambiguous, &p(&env.path("t2"))],
            1,
            "ambiguous",
        ),
        case(
            &["restore", "xyz!", &p(&env.path("t3"))],
            1,
            "is not a snapshot id",
        ),
        case(
            &["restore", "latest", &p(&env.path("t4"))],
            1,
            "add --volume",
        ),
        case(
            &["restore", "latest", &full_s, "--volume", "vol"],
            1,
            "not empty",
        ),
        case(
            &["restore", "latest", &file_s, "--volume", "vol"],
            1,
            "not a directory",
        ),
        case(
            &[
                "restore",
                "latest",
                &p(&env.path("t5")),
                "--volume",
                "vol",
                "--path",
                "nope",
            ],
            1,
            "not in the snapshot",
        ),
        case(
            &[
                "restore",
                "latest",
                &p(&env.path("t6")),
                "--volume",
                "vol",
                "--path",
                "../etc",
            ],
            1,
            "not a clean relative path",
        ),
        case(
            &["mount", "latest", &full_s, "--volume", "vol"],
            1,
            "must be an empty directory",
        ),
        case(&["umount", &p(&notmounted)], 1, "nothing is mounted"),
        case(&["umount", &vol_s], 1, "use `laybak down`"),
        case(&["snapshot"], 2, "required"),
        case(&["snapshot", &vol_s, "--wait", "soon"], 2, "invalid value"),
        case(&["frobnicate"], 2, "unrecognized subcommand"),
        case(&["diff", "latest"], 2, "required"),
    ];
    assert!(cases.len() >= 25);
    let mut messages = Vec::new();
    for c in &cases {
        let before = (
            fingerprint(&env.repo),
            fingerprint(&plain),
            fingerprint(&vol),
            fingerprint(&env.state),
        );
        let args: Vec<&std::ffi::OsStr> = c.args.iter().map(std::ffi::OsStr::new).collect();
        let r = env.run(&args);
        messages.push(format!(
            "{} (exit {}): {}",
            c.args[0],
            r.code,
            redact(r.stderr.trim_end(), env.dir.path())
                .replace(&format!("\"{ambiguous}\""), "\"[PREFIX]\"")
        ));
        assert_eq!(
            r.code, c.code,
            "{:?}: exit {}; stderr {}",
            c.args, r.code, r.stderr
        );
        assert!(
            r.stderr.contains(c.needle),
            "{:?}: stderr {:?} lacks {:?}",
            c.args,
            r.stderr,
            c.needle
        );
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{:?}: not one line: {:?}",
            c.args,
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{:?}: printed {:?}", c.args, r.stdout);
        let after = (
            fingerprint(&env.repo),
            fingerprint(&plain),
            fingerprint(&vol),
            fingerprint(&env.state),
        );
        assert!(before == after, "{:?} changed something", c.args);
    }
    // The messages themselves are reviewed: any change shows up as a diff.
    insta::assert_snapshot!("misuse_messages", messages.join("\n"));
    // Refused attaches left their directories as they were.
    assert!(!whiteouty.join(".laybak").exists() && !xattry.join(".laybak").exists());
    let _ = repo_s;
}

#[test]
fn without_root_mounting_commands_say_so() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let d = env.path("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for args in [
        vec!["attach", d.to_str().unwrap()],
        vec!["snapshot", "--all"],
        vec!["up", "--all"],
        vec!["mount", "latest", d.to_str().unwrap()],
    ] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_laybak"))
            .args(&args)
            .env("LAYBAK_REPO", &env.repo)
            .env("LAYBAK_STATE_DIR", &env.state)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(12), "{args:?}: {err}");
        assert!(err.contains("needs root"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1);
    }
    assert!(fs::read_dir(&d).unwrap().next().is_none());
}

#[test]
fn redirect_and_metacopy_in_an_upper_are_refused() {
    if !need_root() {
        return;
    }
    // A redirect the kernel would not follow (a relative value with a
    // slash) and a metadata-only copy-up: neither is archived.
    for (attr, value, needle) in [
        (
            "trusted.overlay.redirect",
            &b"x/y"[..],
            "not a redirect the kernel follows",
        ),
        ("trusted.overlay.metacopy", b"/x", "metacopy=on"),
    ] {
        let env = Env::new();
        env.init();
        let vol = env.path("vol");
        fs::create_dir(&vol).unwrap();
        env.lb(&["attach", vol.to_str().unwrap()]).ok();
        fs::create_dir(vol.join("d")).unwrap();
        // Plant the artefact in the upper directly (through the backing bind).
        let upper_d = env.state.join("backing/vol/.laybak/l/2/d");
        rustix::fs::lsetxattr(&upper_d, attr, value, rustix::fs::XattrFlags::empty()).unwrap();
        let before = fingerprint(&env.repo);
        let r = env.lb(&["snapshot", vol.to_str().unwrap()]);
        assert_eq!(r.code, 1);
        assert!(r.stderr.contains(needle), "{}", r.stderr);
        assert!(before == fingerprint(&env.repo), "repository changed");
        let sealed = env.state.join("backing/vol/.laybak/l/2/d");
        assert!(sealed.is_dir(), "the sealed layer lost its contents");
        assert!(laybak::overlay::find_mount(&vol).unwrap().unwrap().fstype == "overlay");
    }
}

#[test]
fn check_read_data_finds_a_flipped_byte_and_names_the_snapshot() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("f"), vec![5u8; 100_000]).unwrap();
    let id = env
        .lb(&["attach", vol.to_str().unwrap()])
        .ok()
        .stdout
        .trim()
        .to_string();
    env.lb(&["check", "--read-data"]).ok();
    let packs: Vec<_> = files_below(&env.repo.join("packs"));
    assert_eq!(packs.len(), 1);
    let mut data = fs::read(&packs[0]).unwrap();
    data[20] ^= 0x01;
    fs::write(&packs[0], &data).unwrap();
    // Structure alone does not read data; --read-data does.
    env.lb(&["check"]).ok();
    let r = env.lb(&["check", "--read-data"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("corrupt"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("damaged snapshot: {id}")),
        "{}",
        r.stderr
    );
    let t = env.path("t");
    let r = env.lb(&["restore", &id, t.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is corrupt"), "{}", r.stderr);
    // A deleted snapshot record's manifest is still fine; a truncated manifest is named.
    let layers = files_below(&env.repo.join("layers"));
    let m = fs::read(&layers[0]).unwrap();
    fs::write(&layers[0], &m[..m.len() / 2]).unwrap();
    let r = env.lb(&["check"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("layer manifest"), "{}", r.stderr);
}

fn entry(path: &str, node: Node) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        node,
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
        link: None,
    }
}

/// Write a layer without validation (as an attacker would) and a snapshot
/// pointing at it.
fn plant(repo_path: &Path, layers: &[Layer]) -> String {
    let repo = Repo::open(repo_path, &common::passwords()).unwrap();
    let mut ids = Vec::new();
    for l in layers {
        let data = repo.encode_layer(l).unwrap();
        ids.push(laybak::format::LayerId(
            repo.write_file(FileKind::Layer, data).unwrap(),
        ));
    }
    let snap = Snapshot {
        time: Time::now(),
        volume: "evil".into(),
        hostname: "h".into(),
        tags: vec![],
        parent: None,
        layers: ids,
        summary: Summary::default(),
    };
    repo.write_snapshot(&snap).unwrap().hex()
}

#[test]
fn crafted_manifests_never_write_outside_the_target() {
    let env = Env::new();
    env.init();
    let outside = env.path("outside");
    fs::create_dir(&outside).unwrap();
    let root = entry(
        "",
        Node::Dir {
            kind: DirKind::Merge,
        },
    );
    let file = |p: &str| {
        entry(
            p,
            Node::File {
                size: 0,
                extents: vec![],
            },
        )
    };
    let evil_paths = [
        "../outside/pwned",
        "/tmp/pwned-abs",
        "a/../../outside/x",
        "a//b",
        "x\0y",
    ];
    for p in evil_paths {
        let id = plant(
            &env.repo,
            &[Layer {
                entries: vec![root.clone(), file(p)],
            }],
        );
        let t = env.path(&format!("t-{}", id));
        let r = env.lb(&["restore", &id, t.to_str().unwrap()]);
        assert_eq!(r.code, 1, "{p:?} was accepted");
        assert!(
            r.stderr.contains("unsafe path") || r.stderr.contains("no parent"),
            "{p:?}: {}",
            r.stderr
        );
    }
    // Duplicate entries and a child under a symlink in the same layer.
    let dup = plant(
        &env.repo,
        &[Layer {
            entries: vec![root.clone(), file("a"), file("a")],
        }],
    );
    let r = env.lb(&["restore", &dup, env.path("t-dup").to_str().unwrap()]);
    assert!(
        r.code == 1 && r.stderr.contains("duplicated"),
        "{}",
        r.stderr
    );
    let link = entry(
        "a",
        Node::Symlink {
            target: outside.as_os_str().as_encoded_bytes().to_vec(),
        },
    );
    let under = plant(
        &env.repo,
        &[Layer {
            entries: vec![root.clone(), link.clone(), file("a/x")],
        }],
    );
    let r = env.lb(&["restore", &under, env.path("t-under").to_str().unwrap()]);
    assert!(
        r.code == 1 && r.stderr.contains("no parent"),
        "{}",
        r.stderr
    );
    // Across layers: a symlink replacing a directory hides the old children.
    let lower = Layer {
        entries: vec![
            root.clone(),
            entry(
                "a",
                Node::Dir {
                    kind: DirKind::Merge,
                },
            ),
            file("a/x"),
        ],
    };
    let upper = Layer {
        entries: vec![root.clone(), link.clone()],
    };
    let id = plant(&env.repo, &[lower, upper]);
    let t = env.path("t-cross");
    env.lb(&["restore", &id, t.to_str().unwrap()]).ok();
    assert!(
        fs::symlink_metadata(t.join("a"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // The writer itself refuses to go through a symlink even when handed
    // items that bypass restack.
    let repo = Repo::open(&env.repo, &common::passwords()).unwrap();
    let t = env.path("t-direct");
    fs::create_dir(&t).unwrap();
    let fx = file("a/x");
    let items = [
        laybak::materialize::Item {
            entry: &root,
            link: None,
        },
        laybak::materialize::Item {
            entry: &link,
            link: None,
        },
        laybak::materialize::Item {
            entry: &fx,
            link: None,
        },
    ];
    let err = laybak::materialize::write_tree(
        &repo,
        &laybak::materialize::prepare_target(&t).unwrap(),
        &items,
        laybak::materialize::Target::Plain,
        laybak::materialize::Safety::default(),
        None,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("refusing to write below a"),
        "{err:#}"
    );
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written outside"
    );
    assert!(!Path::new("/tmp/pwned-abs").exists());
    // Device nodes restored without root: refused, and said so.
    if rustix::process::geteuid().is_root() {
        let dev = plant(
            &env.repo,
            &[Layer {
                entries: vec![
                    root.clone(),
                    entry("null", Node::CharDev { rdev: (1 << 8) | 3 }),
                ],
            }],
        );
        let t = env.path("t-dev");
        fs::create_dir(&t).unwrap();
        std::os::unix::fs::chown(&t, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(
            env.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        // Repositories are their owner's alone: hand this one to the user.
        let st = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(&env.repo)
            .status()
            .unwrap();
        assert!(st.success());
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_laybak"))
            .env("LAYBAK_PASSWORD", common::PASSWORD)
            .arg("--repo")
            .arg(&env.repo)
            .args(["restore", &dev])
            .arg(&t)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("device node null") && err.contains("needs root"),
            "{err}"
        );
    }
}

#[test]
fn repository_fixture_v1_still_restores() {
    let env = Env::new();
    // Work on a copy: even reading takes a (transient) lock in the repository.
    let fixture = env.path("repo-v1");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1"))
        .arg(&fixture)
        .status()
        .unwrap();
    assert!(st.success());
    let r = env
        .cmd()
        .arg("--repo")
        .arg(&fixture)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = env
        .cmd()
        .arg("--repo")
        .arg(&fixture)
        .args(["snapshots", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["tags"][0], "base");
    assert_eq!(v[1]["tags"][0], "second");
    for (i, snap) in v.as_array().unwrap().iter().enumerate() {
        let t = env.path(&format!("r{i}"));
        let r = env
            .cmd()
            .arg("--repo")
            .arg(&fixture)
            .args(["restore", snap["id"].as_str().unwrap()])
            .arg(&t)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(fs::read(t.join("hello.txt")).unwrap(), b"hello\n");
        assert_eq!(
            fs::read_link(t.join("link")).unwrap(),
            Path::new("hello.txt")
        );
        assert_eq!(fs::read(t.join("dir/big")).unwrap(), vec![b'z'; 300_000]);
        use std::os::unix::fs::MetadataExt;
        let h = fs::metadata(t.join("hello.txt")).unwrap();
        assert_eq!(h.ino(), fs::metadata(t.join("hardlink")).unwrap().ino());
        assert_eq!((h.mtime(), h.mtime_nsec()), (981173106, 123456789));
        let x = laybak::scan::read_xattrs(&t.join("hello.txt")).unwrap();
        assert!(
            x.contains(&(b"user.color".to_vec(), b"blue".to_vec())),
            "{x:?}"
        );
        assert_eq!(t.join("dir/sub/gone").exists(), i == 0);
        assert_eq!(t.join("new").exists(), i == 1);
    }
}

#[test]
fn read_only_repository_reads_work_and_writes_say_why() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), b"a").unwrap();
    env.lb(&["attach", vol.to_str().unwrap()]).ok();
    // A read-only view of the repository (as from read-only media).
    let ro = env.path("ro-repo");
    fs::create_dir(&ro).unwrap();
    let mount = |args: &[&std::ffi::OsStr]| {
        let st = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "mount {args:?}");
    };
    mount(&["--bind".as_ref(), env.repo.as_os_str(), ro.as_os_str()]);
    mount(&["-o".as_ref(), "remount,bind,ro".as_ref(), ro.as_os_str()]);
    let ro_s = ro.to_str().unwrap();
    let before = fingerprint(&env.repo);
    assert!(
        env.lb(&["--repo", ro_s, "snapshots"])
            .ok()
            .stdout
            .contains("vol")
    );
    env.lb(&["--repo", ro_s, "check", "--read-data"]).ok();
    let t = env.path("t");
    env.lb(&["--repo", ro_s, "restore", "latest", t.to_str().unwrap()])
        .ok();
    assert_eq!(fs::read(t.join("a")).unwrap(), b"a");
    for args in [
        vec!["--repo", ro_s, "forget", "--keep-last", "1"],
        vec!["--repo", ro_s, "prune"],
        vec!["--repo", ro_s, "repair", "index"],
    ] {
        let r = env.lb(&args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(
            r.stderr.contains("Read-only file system"),
            "{args:?}: {}",
            r.stderr
        );
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            r.stderr
        );
    }
    assert!(before == fingerprint(&env.repo));
    let _ = rustix::mount::unmount(&ro, rustix::mount::UnmountFlags::empty());
}

#[test]
fn repository_fixture_v2_still_restores() {
    let env = Env::new();
    let fixture = env.path("repo-v2");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v2"))
        .arg(&fixture)
        .status()
        .unwrap();
    assert!(st.success());
    // The renamed layer is the one format version 2 file; the rest is 1.
    let versions: Vec<u8> = fs::read_dir(fixture.join("layers"))
        .unwrap()
        .map(|e| fs::read(e.unwrap().path()).unwrap()[7])
        .collect();
    assert!(
        versions.contains(&2) && versions.contains(&1),
        "{versions:?}"
    );
    let run = |args: &[&str]| {
        let r = env
            .cmd()
            .arg("--repo")
            .arg(&fixture)
            .args(args)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        r.stdout
    };
    run(&["check", "--read-data"]);
    let v: serde_json::Value = serde_json::from_slice(&run(&["snapshots", "--json"])).unwrap();
    assert_eq!(v[0]["tags"][0], "base");
    assert_eq!(v[1]["tags"][0], "renamed");
    let t = env.path("r");
    run(&["restore", v[1]["id"].as_str().unwrap(), t.to_str().unwrap()]);
    for i in 0..3 {
        assert_eq!(
            fs::read(t.join(format!("x/2023-archive/img{i}"))).unwrap(),
            format!("image {i}\n").as_bytes()
        );
    }
    assert_eq!(fs::read(t.join("x/2023-archive/new")).unwrap(), b"new\n");
    assert_eq!(fs::read(t.join("pictures/top")).unwrap(), b"top\n");
    assert!(!t.join("photos").exists() && !t.join("pictures/2023").exists());
}
