//! Encryption at rest, through the real binary: nothing of a volume is
//! readable in its repository, every flipped byte is caught, passwords and
//! keys behave, hosts share a repository, and plaintext repositories keep
//! working.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

/// Every file below `d`, with its bytes (a volume's lock file, an empty
/// file that `flock` uses, is not state).
fn contents(d: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_below(d)
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn with_repo<'a>(repo: &'a Path, args: &[&'a str]) -> Vec<&'a OsStr> {
    let mut a: Vec<&OsStr> = vec![OsStr::new("--repo"), os(repo)];
    a.extend(args.iter().map(|s| OsStr::new(*s)));
    a
}

const MARKER: &str = "ZQX-laybak-plaintext-marker-7391";
/// A host name that must not appear either (key files, locks, records).
const HOST: &str = "zqx-host-marker-5528";

#[test]
fn nothing_written_into_a_volume_appears_in_the_repository() {
    if !need_root() {
        return;
    }
    let mut env = Env::new();
    env.host = Some(HOST.into());
    env.init();
    // The marker as a volume name, directory and file names, a symlink
    // target, an xattr name and value, compressible and incompressible
    // content, and a tag.
    let vol = env.path(MARKER);
    let dir = vol.join(format!("dir-{MARKER}"));
    fs::create_dir_all(&dir).unwrap();
    let text = format!("{MARKER}\n").repeat(20_000);
    fs::write(dir.join(format!("file-{MARKER}")), &text).unwrap();
    let mut noise: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    noise[1_000_000..1_000_000 + MARKER.len()].copy_from_slice(MARKER.as_bytes());
    fs::write(vol.join("noise"), &noise).unwrap();
    std::os::unix::fs::symlink(format!("../{MARKER}"), vol.join("link")).unwrap();
    let xf = vol.join("x");
    fs::write(&xf, "x").unwrap();
    let name = std::ffi::CString::new(format!("user.{MARKER}")).unwrap();
    let path = std::ffi::CString::new(xf.to_str().unwrap()).unwrap();
    rustix::fs::setxattr(
        path.as_c_str(),
        name.as_c_str(),
        MARKER.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    env.run(&[
        OsStr::new("attach"),
        os(&vol),
        OsStr::new("--tag"),
        OsStr::new(MARKER),
    ])
    .ok();
    fs::write(vol.join(format!("second-{MARKER}")), &text[..5000]).unwrap();
    fs::remove_file(vol.join("x")).unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    // A plan, then a prune that repacks, so every kind of file is there.
    env.lb(&[
        "forget",
        "--keep-last",
        "1",
        "--prune",
        "--max-unused",
        "0%",
    ])
    .ok();
    let files = contents(&env.repo);
    for kind in ["config", "keys", "index", "layers", "snapshots", "packs"] {
        assert!(
            files
                .keys()
                .any(|p| p.strip_prefix(&env.repo).unwrap().starts_with(kind)),
            "no {kind} file written"
        );
    }
    // Neither the marker nor the plain blake3 of any file's content.
    let plain_ids: Vec<blake3::Hash> = [text.as_bytes(), &noise[..]]
        .iter()
        .map(|d| blake3::hash(d))
        .collect();
    for (p, b) in &files {
        assert!(
            !contains(b, MARKER.as_bytes()),
            "{} holds the marker",
            p.display()
        );
        assert!(
            !contains(b, HOST.as_bytes()),
            "{} holds the host name",
            p.display()
        );
        assert!(
            !contains(b, MARKER.to_uppercase().as_bytes()),
            "{}",
            p.display()
        );
        for id in &plain_ids {
            assert!(
                !contains(b, id.as_bytes()),
                "{} holds a plain id",
                p.display()
            );
            assert!(!contains(b, id.to_hex().as_bytes()), "{}", p.display());
        }
        assert!(
            p.file_name().unwrap().to_str().unwrap().len() >= 6,
            "{}",
            p.display()
        );
        if b.len() >= 8 {
            assert_eq!(&b[..6], b"LAYBAK", "{}", p.display());
            assert_eq!(b[7], 3, "{} is not format version 3", p.display());
        }
    }
    // The local blob cache holds keyed ids only.
    for (p, b) in contents(&env.state.join("cache")) {
        for id in &plain_ids {
            assert!(
                !contains(&b, id.as_bytes()),
                "{} holds a plain id",
                p.display()
            );
        }
    }
    // And it all comes back.
    let t = env.path("t");
    env.lb(&["restore", "latest", t.to_str().unwrap()]).ok();
    assert_eq!(
        fs::read(t.join(format!("dir-{MARKER}/file-{MARKER}"))).unwrap(),
        text.as_bytes()
    );
    assert_eq!(fs::read(t.join("noise")).unwrap(), noise);
    env.lb(&["check", "--read-data"]).ok();
}

#[test]
fn a_flipped_byte_anywhere_is_detected() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    env.run_env(
        &[OsStr::new("key"), OsStr::new("add")],
        &[("LAYBAK_NEW_PASSWORD", "other key")],
    )
    .ok();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    for i in 0..5u32 {
        fs::write(
            vol.join(format!("f{i}")),
            vec![i as u8; 40_000 + i as usize],
        )
        .unwrap();
    }
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("g"), "more").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    env.run(&[OsStr::new("down"), os(&vol)]).ok();
    let files: Vec<PathBuf> = files_below(&env.repo)
        .into_iter()
        .filter(|p| !p.starts_with(env.repo.join("locks")))
        .collect();
    assert!(files.len() >= 10, "{files:?}");
    let mut cases = 0;
    for f in &files {
        let len = fs::metadata(f).unwrap().len() as usize;
        for at in [0, 7, 8, 9, 20, len / 2, len - 17, len - 1] {
            let at = at.min(len - 1);
            let r = env.path("flipped");
            let _ = fs::remove_dir_all(&r);
            copy_dir(&env.repo, &r);
            let target = r.join(f.strip_prefix(&env.repo).unwrap());
            let mut b = fs::read(&target).unwrap();
            b[at] ^= 0x04;
            fs::write(&target, &b).unwrap();
            let run = env.run(&with_repo(&r, &["check", "--read-data"]));
            assert_ne!(
                run.code,
                0,
                "flip at {at} of {} went unnoticed: {}",
                f.display(),
                run.stdout
            );
            cases += 1;
        }
    }
    assert!(cases >= 80, "{cases}");
    // A record copied under another snapshot's name is refused: the name
    // is bound into it.
    let snaps = files_below(&env.repo.join("snapshots"));
    assert_eq!(snaps.len(), 2);
    let r = env.path("swapped");
    copy_dir(&env.repo, &r);
    let a = r.join(snaps[0].strip_prefix(&env.repo).unwrap());
    let b = r.join(snaps[1].strip_prefix(&env.repo).unwrap());
    fs::copy(&a, &b).unwrap();
    let run = env.run(&with_repo(&r, &["check"]));
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("failed authentication"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_wrong_or_missing_password_changes_nothing() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), "one").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("b"), "pending").unwrap();
    let before = (contents(&env.repo), contents(&env.state));
    let t = env.path("t");
    let commands: Vec<Vec<&OsStr>> = vec![
        vec![OsStr::new("snapshot"), os(&vol)],
        vec![OsStr::new("snapshots")],
        vec![OsStr::new("restore"), OsStr::new("latest"), os(&t)],
        vec![
            OsStr::new("forget"),
            OsStr::new("--keep-last"),
            OsStr::new("1"),
        ],
        vec![OsStr::new("prune")],
        vec![OsStr::new("check")],
        vec![OsStr::new("key"), OsStr::new("add")],
    ];
    for args in &commands {
        let r = env.run_env(
            args,
            &[("LAYBAK_PASSWORD", "not it"), ("LAYBAK_NEW_PASSWORD", "x")],
        );
        r.fails(14, "wrong password");
        // No password at all, and no terminal to ask on.
        let mut c = std::process::Command::new("setsid");
        c.arg("-w").arg(env!("CARGO_BIN_EXE_laybak")).args(args);
        for (k, v) in env.cmd().get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let o = c.env_remove("LAYBAK_PASSWORD").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(14), "{args:?}: {err}");
        assert!(err.contains("--password-file"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(!t.exists());
    let after = (contents(&env.repo), contents(&env.state));
    for (b, a) in [(&before.0, &after.0), (&before.1, &after.1)] {
        let changed: Vec<_> = b
            .iter()
            .filter(|(p, d)| a.get(*p) != Some(d))
            .map(|(p, _)| p)
            .chain(a.keys().filter(|p| !b.contains_key(*p)))
            .collect();
        assert!(changed.is_empty(), "a wrong password changed {changed:?}");
    }
    // The pending change is still in the volume, and the right password
    // snapshots it.
    let file = env.path("pw");
    fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let r = env.run_env(
        &[OsStr::new("snapshot"), os(&vol), OsStr::new("--json")],
        &[
            ("LAYBAK_PASSWORD", "not it"),
            ("LAYBAK_PASSWORD_FILE", file.to_str().unwrap()),
        ],
    );
    r.ok();
    env.lb(&["restore", "latest", t.to_str().unwrap()]).ok();
    assert_eq!(fs::read(t.join("b")).unwrap(), b"pending");
    // A password command works too; a failing one says so.
    env.run_env(
        &[OsStr::new("snapshots")],
        &[("LAYBAK_PASSWORD_COMMAND", &format!("echo '{PASSWORD}'"))],
    )
    .ok();
    let r = env.run_env(
        &[OsStr::new("snapshots")],
        &[("LAYBAK_PASSWORD_COMMAND", "false")],
    );
    assert_eq!(r.code, 14, "{}", r.stderr);
    assert!(r.stderr.contains("password command"), "{}", r.stderr);
    // A password file that is not there, or a failing command: exit 14
    // and the volume is not touched (no seal, no rotation).
    fs::write(vol.join("c"), "pending too").unwrap();
    let before = (contents(&env.repo), contents(&env.state));
    for (k, v) in [
        ("LAYBAK_PASSWORD_FILE", "/nonexistent/laybak-password"),
        ("LAYBAK_PASSWORD_COMMAND", "exit 3"),
    ] {
        env.run_env(&[OsStr::new("snapshot"), os(&vol)], &[(k, v)])
            .fails(14, "password");
    }
    assert!(before == (contents(&env.repo), contents(&env.state)));
}

#[test]
fn keys_can_be_added_removed_and_changed() {
    let env = Env::new();
    env.init();
    let list = |pw: &str| -> Vec<(bool, String)> {
        let r = env.run_env(
            &[OsStr::new("key"), OsStr::new("list"), OsStr::new("--json")],
            &[("LAYBAK_PASSWORD", pw)],
        );
        let v: serde_json::Value = serde_json::from_str(&r.ok().stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["current"].as_bool().unwrap(),
                    k["id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let first = list(PASSWORD);
    assert_eq!(first.len(), 1);
    let k1 = first[0].1.clone();
    // Removing the only key is refused.
    env.lb(&["key", "remove", &k1[..8]]).fails(1, "last key");
    let pwfile = env.path("new");
    fs::write(&pwfile, "second password\n").unwrap();
    env.lb(&[
        "key",
        "add",
        "--new-password-file",
        pwfile.to_str().unwrap(),
    ])
    .ok();
    let both = list("second password");
    assert_eq!(both.len(), 2);
    let k2 = both.iter().find(|k| k.0).unwrap().1.clone();
    assert_ne!(k1, k2);
    // Either password opens it; the key in use cannot be removed.
    env.lb(&["snapshots"]).ok();
    env.lb(&["key", "remove", &k1])
        .fails(1, "the one this password opened");
    env.run_env(
        &[OsStr::new("key"), OsStr::new("remove"), OsStr::new(&k1)],
        &[("LAYBAK_PASSWORD", "second password")],
    )
    .ok();
    env.lb(&["snapshots"]).fails(14, "wrong password");
    // passwd: the new password opens it, the old one no longer does.
    env.run_env(
        &[OsStr::new("key"), OsStr::new("passwd")],
        &[
            ("LAYBAK_PASSWORD", "second password"),
            ("LAYBAK_NEW_PASSWORD", "third"),
        ],
    )
    .ok();
    env.run_env(
        &[OsStr::new("snapshots")],
        &[("LAYBAK_PASSWORD", "second password")],
    )
    .fails(14, "wrong password");
    let now = list("third");
    assert_eq!(now.len(), 1);
    assert!(!now.iter().any(|k| k.1 == k2 || k.1 == k1));
    // Bad input: an empty new password, an unknown key.
    env.run_env(
        &[OsStr::new("key"), OsStr::new("add")],
        &[("LAYBAK_PASSWORD", "third"), ("LAYBAK_NEW_PASSWORD", "")],
    )
    .fails(1, "empty");
    env.run_env(
        &[
            OsStr::new("key"),
            OsStr::new("remove"),
            OsStr::new("abcdef"),
        ],
        &[("LAYBAK_PASSWORD", "third")],
    )
    .fails(1, "no key matches");
    assert_eq!(list("third").len(), 1);
}

#[test]
fn two_hosts_share_a_repository_with_their_own_keys() {
    if !need_root() {
        return;
    }
    let mut a = Env::new();
    a.host = Some("lbt-alpha".into());
    a.init();
    a.run_env(
        &[OsStr::new("key"), OsStr::new("add")],
        &[("LAYBAK_NEW_PASSWORD", "beta's own")],
    )
    .ok();
    let mut b = Env::new();
    b.repo = a.repo.clone();
    b.host = Some("lbt-beta".into());
    let shared: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut vols = Vec::new();
    for (e, pw) in [(&a, PASSWORD), (&b, "beta's own")] {
        let vol = e.path("home");
        fs::create_dir(&vol).unwrap();
        fs::write(vol.join("shared.bin"), &shared).unwrap();
        fs::write(vol.join("own"), e.host.clone().unwrap()).unwrap();
        let r = e.run_env(
            &[OsStr::new("attach"), os(&vol), OsStr::new("--json")],
            &[("LAYBAK_PASSWORD", pw)],
        );
        let v: serde_json::Value = serde_json::from_str(&r.ok().stdout).unwrap();
        vols.push(v);
    }
    // The second host's copy of the shared file was already there: keyed
    // ids are the repository's, not the host's or the key's.
    assert!(vols[0]["summary"]["new_bytes"].as_u64().unwrap() > 100_000);
    assert!(
        vols[1]["summary"]["new_bytes"].as_u64().unwrap() < 10_000,
        "{}",
        vols[1]
    );
    for (e, pw) in [(&a, PASSWORD), (&b, "beta's own")] {
        let snaps = e.run_env(
            &[OsStr::new("snapshots"), OsStr::new("--json")],
            &[("LAYBAK_PASSWORD", pw)],
        );
        let v: serde_json::Value = serde_json::from_str(&snaps.ok().stdout).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        for s in v.as_array().unwrap() {
            let t = e.path(&format!("from-{}", s["hostname"].as_str().unwrap()));
            e.run_env(
                &[
                    OsStr::new("restore"),
                    OsStr::new(s["id"].as_str().unwrap()),
                    os(&t),
                ],
                &[("LAYBAK_PASSWORD", pw)],
            )
            .ok();
            assert_eq!(fs::read(t.join("shared.bin")).unwrap(), shared);
            assert_eq!(
                fs::read_to_string(t.join("own")).unwrap(),
                s["hostname"].as_str().unwrap()
            );
        }
    }
    b.run_env(
        &[OsStr::new("check"), OsStr::new("--read-data")],
        &[("LAYBAK_PASSWORD", "beta's own")],
    )
    .ok();
}

#[test]
fn plaintext_repositories_keep_working_and_say_so() {
    if !need_root() {
        return;
    }
    // A repository made by laybak 0.1 (the v1 fixture) takes new volumes
    // and snapshots, still in plaintext, readable by 0.1.
    let env = Env::new();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1"),
        &env.repo,
    );
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), "new data").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("b"), "more").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    for (p, b) in contents(&env.repo) {
        assert!(b[7] <= 2, "{} has version {}", p.display(), b[7]);
    }
    assert!(
        files_below(&env.repo)
            .iter()
            .any(|p| contains(&fs::read(p).unwrap(), b"new data"))
    );
    let r = env.lb(&["check", "--read-data"]).ok();
    assert!(r.stdout.contains("plaintext repository"), "{}", r.stdout);
    assert!(
        r.stderr.contains("the repository is plaintext"),
        "{}",
        r.stderr
    );
    env.lb(&["key", "list"]).fails(1, "plaintext");
    // `init --no-encryption` says what it means.
    let p = env.path("plain");
    env.run(&[
        OsStr::new("init"),
        OsStr::new("--repo"),
        os(&p),
        OsStr::new("--no-encryption"),
    ])
    .ok();
    let r = env.run(&[
        OsStr::new("init"),
        OsStr::new("--repo"),
        os(&env.path("plain2")),
        OsStr::new("--no-encryption"),
    ]);
    assert!(r.stderr.contains("can read every file"), "{}", r.stderr);
    assert_eq!(fs::read(p.join("config")).unwrap()[7], 1);
}

#[test]
fn a_replaced_config_never_makes_laybak_write_in_the_clear() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), "secret one").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // Whoever holds the storage swaps in a plaintext config.
    let p = env.path("plain");
    env.run(&[
        OsStr::new("init"),
        OsStr::new("--repo"),
        os(&p),
        OsStr::new("--no-encryption"),
    ])
    .ok();
    fs::copy(p.join("config"), env.repo.join("config")).unwrap();
    fs::write(vol.join("b"), "secret two").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)])
        .fails(1, "plaintext config");
    // And with the key files gone too, the volume remembers.
    fs::remove_dir_all(env.repo.join("keys")).unwrap();
    let r = env.run(&[OsStr::new("snapshot"), os(&vol)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("is plaintext now"), "{}", r.stderr);
    for (p, b) in contents(&env.repo) {
        assert!(!contains(&b, b"secret"), "{} is in the clear", p.display());
    }
}

#[test]
fn repository_fixture_v3_still_restores() {
    let env = Env::new();
    let fixture = env.path("repo-v3");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v3"),
        &fixture,
    );
    for (p, b) in contents(&fixture) {
        assert_eq!(b[7], 3, "{}", p.display());
    }
    let run = |pw: &str, args: &[&str]| {
        env.run_env(&with_repo(&fixture, args), &[("LAYBAK_PASSWORD", pw)])
    };
    run("laybak fixture v3", &["check", "--read-data"]).ok();
    let out = run("second key", &["snapshots", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["tags"][0], "base");
    assert_eq!(v[1]["tags"][0], "renamed");
    let t = env.path("r");
    run(
        "laybak fixture v3",
        &["restore", v[1]["id"].as_str().unwrap(), t.to_str().unwrap()],
    )
    .ok();
    for i in 0..3 {
        assert_eq!(
            fs::read(t.join(format!("x/2023-archive/img{i}"))).unwrap(),
            format!("image {i}\n").as_bytes()
        );
    }
    assert_eq!(fs::read(t.join("x/2023-archive/new")).unwrap(), b"new\n");
    assert_eq!(fs::read(t.join("pictures/top")).unwrap(), b"top\n");
    assert!(!t.join("photos").exists());
    run("laybak fixture v2", &["snapshots"]).fails(14, "wrong password");
}

#[test]
fn a_key_file_of_another_repository_is_named_and_skipped() {
    let env = Env::new();
    env.init();
    let other = env.path("other");
    env.run(&[OsStr::new("init"), OsStr::new("--repo"), os(&other)])
        .ok();
    // Same password, other master key: laybak must not take it for ours.
    for f in files_below(&other.join("keys")) {
        fs::copy(&f, env.repo.join("keys").join(f.file_name().unwrap())).unwrap();
    }
    for _ in 0..3 {
        env.lb(&["snapshots"]).ok();
    }
    let r = env.lb(&["check"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not this repository's"), "{}", r.stderr);
    env.lb(&["key", "list"]).fails(1, "not this repository's");
    // Only the foreign key left: said so, not "wrong password".
    for f in files_below(&env.repo.join("keys")) {
        if !other.join("keys").join(f.file_name().unwrap()).exists() {
            fs::remove_file(&f).unwrap();
        }
    }
    let r = env.lb(&["snapshots"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("config is corrupt"), "{}", r.stderr);
}

#[test]
fn a_slow_password_source_does_not_hold_the_volume() {
    // A password command that takes its time (a vault, a prompt) must not
    // keep the volume locked: other snapshots of it go on meanwhile.
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("home");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), "one").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("b"), "two").unwrap();
    let started = env.path("started");
    let go = env.path("go");
    let cmd = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done; echo '{PASSWORD}'",
        started.display(),
        go.display()
    );
    // However the test ends, the password command is let go.
    struct Release(std::path::PathBuf);
    impl Drop for Release {
        fn drop(&mut self) {
            let _ = fs::write(&self.0, "");
        }
    }
    let release = Release(go.clone());
    let mut slow = env.cmd();
    slow.args([OsStr::new("snapshot"), os(&vol)])
        .env_remove("LAYBAK_PASSWORD")
        .env("LAYBAK_PASSWORD_COMMAND", &cmd);
    let slow = slow
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !started.exists() {
        assert!(t0.elapsed().as_secs() < 60, "password command never ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The slow run is waiting for its password: this one is not locked out.
    let other = env.run(&[OsStr::new("snapshot"), os(&vol)]);
    drop(release);
    other.ok();
    let o = slow.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = env.path("out");
    let ids = env.snapshot_ids();
    assert_eq!(ids.len(), 3, "{ids:?}");
    env.run(&[
        OsStr::new("restore"),
        OsStr::new(ids.last().unwrap()),
        os(&t),
    ])
    .ok();
    assert_eq!(fs::read_to_string(t.join("b")).unwrap(), "two");
}

#[test]
fn repository_fixtures_v4_still_restore() {
    // Paged layer manifests (format version 4), encrypted and plaintext,
    // made by tests/fixtures/make-repo-v4.sh with pages of three entries.
    let env = Env::new();
    for name in ["repo-v4", "repo-v4-plain"] {
        let fixture = env.path(name);
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
            &fixture,
        );
        let paged = contents(&fixture)
            .into_iter()
            .filter(|(p, b)| p.starts_with(fixture.join("layers")) && b[7] == 4)
            .count();
        assert_eq!(paged, 2, "{name}");
        let run = |args: &[&str]| {
            env.run_env(
                &with_repo(&fixture, args),
                &[("LAYBAK_PASSWORD", "laybak fixture v4")],
            )
        };
        let out = run(&["check", "--read-data"]).ok().stdout;
        assert!(
            out.contains(if name == "repo-v4" {
                "encrypted"
            } else {
                "plaintext"
            }),
            "{out}"
        );
        let out = run(&["snapshots", "--json"]).ok().stdout;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["tags"][0], "base");
        assert_eq!(v[1]["tags"][0], "third");
        let t = env.path(&format!("{name}-out"));
        run(&["restore", v[1]["id"].as_str().unwrap(), t.to_str().unwrap()]).ok();
        for i in 0..3 {
            assert_eq!(
                fs::read(t.join(format!("x/2023-archive/img{i}"))).unwrap(),
                format!("image {i}\n").as_bytes()
            );
        }
        assert_eq!(fs::read(t.join("x/2023-archive/new")).unwrap(), b"new\n");
        assert_eq!(fs::read(t.join("x/third")).unwrap(), b"third\n");
        assert_eq!(fs::read(t.join("pictures/top")).unwrap(), b"top\n");
        assert!(!t.join("photos").exists());
        let b = env.path(&format!("{name}-base"));
        run(&["restore", v[0]["id"].as_str().unwrap(), b.to_str().unwrap()]).ok();
        assert_eq!(fs::read(b.join("photos/2023/img1")).unwrap(), b"image 1\n");
    }
}
