//! End-to-end tests of the real `laybak` binary on real overlay mounts.

mod common;
use common::*;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Deterministic xorshift PRNG (the seed is printed on failure).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        // Partly compressible: runs of a repeated byte between random ones.
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let r = self.next();
            if r % 3 == 0 {
                v.extend(std::iter::repeat_n(
                    (r >> 8) as u8,
                    ((r >> 16) % 64) as usize,
                ));
            } else {
                v.extend_from_slice(&r.to_le_bytes());
            }
        }
        v.truncate(n);
        v
    }
}

fn files_in(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut files = Vec::new();
    let mut dirs = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        dirs.push(d.clone());
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            }
        }
    }
    files.sort();
    dirs.sort();
    (files, dirs)
}

fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Whether `a` is `b` or inside it.
fn within(a: &Path, b: &Path) -> bool {
    a.starts_with(b)
}

/// One random directory rename on the mounted volume, as `mv` and package
/// managers do: to a new name in the same or another directory, over an
/// empty directory, an exchange of two directories, or a directory made in
/// this layer. `rename(2)` must succeed in place (no EXDEV).
fn rename_op(rng: &mut Rng, root: &Path, n: &mut u32) {
    let (_, dirs) = files_in(root);
    let dirs: Vec<PathBuf> = dirs.into_iter().filter(|d| d != root).collect();
    *n += 1;
    if dirs.is_empty() {
        return;
    }
    let a = dirs[rng.below(dirs.len())].clone();
    let (_, all) = files_in(root);
    let to_parent: Vec<&PathBuf> = all.iter().filter(|d| !within(d, &a)).collect();
    let into = to_parent[rng.below(to_parent.len())].clone();
    let rename = |from: &Path, to: &Path| {
        if let Err(e) = fs::rename(from, to) {
            // Only a redirect longer than redirect_max (256) may fall back.
            assert!(
                e.raw_os_error() == Some(libc_exdev()) && from.as_os_str().len() > 200,
                "rename {} -> {}: {e}",
                from.display(),
                to.display()
            );
        }
    };
    match rng.below(5) {
        0 => rename(&a, &a.with_file_name(format!("r{n}"))),
        1 => rename(&a, &into.join(format!("r{n}"))),
        2 => {
            let b = dirs[rng.below(dirs.len())].clone();
            if !within(&a, &b) && !within(&b, &a) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &a,
                    rustix::fs::CWD,
                    &b,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap_or_else(|e| panic!("exchange {} {}: {e}", a.display(), b.display()));
            }
        }
        3 => {
            let empty = into.join(format!("e{n}"));
            fs::create_dir(&empty).unwrap();
            rename(&a, &empty);
        }
        _ => {
            let fresh = into.join(format!("p{n}"));
            fs::create_dir(&fresh).unwrap();
            fs::write(fresh.join("f"), rng.bytes(300)).unwrap();
            rename(&fresh, &a.with_file_name(format!("q{n}")));
        }
    }
}

fn libc_exdev() -> i32 {
    rustix::io::Errno::XDEV.raw_os_error()
}

/// One random operation on the mounted volume.
fn random_op(rng: &mut Rng, root: &Path, n: &mut u32) {
    let (files, dirs) = files_in(root);
    let dir = dirs[rng.below(dirs.len())].clone();
    *n += 1;
    let fresh = dir.join(format!("n{n}"));
    let pick = |rng: &mut Rng| (!files.is_empty()).then(|| files[rng.below(files.len())].clone());
    match rng.below(19) {
        0 | 1 => {
            let size = if rng.below(10) == 0 {
                300_000 + rng.below(900_000)
            } else {
                rng.below(20_000)
            };
            fs::write(&fresh, rng.bytes(size)).unwrap();
        }
        2 => {
            if let Some(f) = pick(rng) {
                let size = rng.below(30_000);
                fs::write(&f, rng.bytes(size)).unwrap();
            }
        }
        3 => {
            if let Some(f) = pick(rng) {
                let k = 1 + rng.below(5000);
                let extra = rng.bytes(k);
                fs::OpenOptions::new()
                    .append(true)
                    .open(&f)
                    .unwrap()
                    .write_all(&extra)
                    .unwrap();
            }
        }
        4 => {
            if let Some(f) = pick(rng) {
                let len = fs::metadata(&f).unwrap().len();
                fs::OpenOptions::new()
                    .write(true)
                    .open(&f)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            }
        }
        5 => {
            if let Some(f) = pick(rng) {
                fs::remove_file(f).unwrap();
            }
        }
        6 => {
            if dir != root {
                fs::remove_dir_all(&dir).unwrap();
                fs::create_dir(&dir).unwrap();
                fs::write(dir.join("again"), rng.bytes(100)).unwrap();
            }
        }
        7 => {
            fs::create_dir(&fresh).unwrap();
            fs::write(fresh.join("inner"), rng.bytes(500)).unwrap();
        }
        8 => {
            if let Some(f) = pick(rng) {
                let mode = [0o600, 0o644, 0o755, 0o4755, 0o640][rng.below(5)];
                fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        9 => {
            if let Some(f) = pick(rng) {
                let id = 1000 + rng.below(5) as u32;
                std::os::unix::fs::lchown(&f, Some(id), Some(id + 1)).unwrap();
            }
        }
        10 => {
            let target = ["n1", "../x", "/etc/passwd", "dangling"][rng.below(4)];
            std::os::unix::fs::symlink(target, &fresh).unwrap();
        }
        11 => {
            if let Some(f) = pick(rng) {
                fs::hard_link(&f, &fresh).unwrap();
            }
        }
        12 => {
            if let Some(f) = pick(rng) {
                let k = 1 + rng.below(40);
                let v = rng.bytes(k);
                rustix::fs::lsetxattr(&f, "user.test", &v, rustix::fs::XattrFlags::empty())
                    .unwrap();
            }
        }
        13 => {
            if let Some(f) = pick(rng) {
                let _ = rustix::fs::lremovexattr(&f, "user.test");
            }
        }
        14 => {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &fresh,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .unwrap();
        }
        15 => {
            let f = fs::File::create(&fresh).unwrap();
            f.set_len(8 << 20).unwrap();
            f.write_all_at(&rng.bytes(5000), 3 << 20).unwrap();
        }
        16 => {
            let mut name = format!("bin{n}-").into_bytes();
            name.extend_from_slice(&[0xff, 0xfe, b'x', 0x80]);
            fs::write(dir.join(OsStr::from_bytes(&name)), rng.bytes(64)).unwrap();
        }
        17 => {
            if let Some(f) = pick(rng) {
                fs::rename(&f, &fresh).unwrap();
            }
        }
        _ => {
            if let Some(f) = pick(rng) {
                set_mtime(
                    &f,
                    1_600_000_000 + rng.below(1_000_000) as i64,
                    rng.below(1_000_000_000) as i64,
                );
            }
        }
    }
}

fn snapshot_id(env: &Env, vol: &Path) -> String {
    let r = env.run(&[OsStr::new("snapshot"), os(vol)]).ok();
    let id = r.stdout.trim().to_string();
    assert_eq!(id.len(), 64, "snapshot prints only the id: {:?}", r.stdout);
    id
}

fn random_rounds(seed: u64, rounds: usize, ops: usize) {
    random_rounds_with(seed, rounds, ops, None)
}

fn random_rounds_with(seed: u64, rounds: usize, ops: usize, max_layers: Option<&str>) {
    random_rounds_opts(seed, rounds, ops, max_layers, false, &[])
}

fn random_rounds_opts(
    seed: u64,
    rounds: usize,
    ops: usize,
    max_layers: Option<&str>,
    renames: bool,
    vars: &[(&str, &str)],
) {
    if !need_root() {
        return;
    }
    eprintln!("seed {seed}");
    let mut env = Env::new();
    for (k, v) in vars {
        env.vars.push((k.to_string(), v.to_string()));
    }
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    let mut rng = Rng(seed);
    let mut n = 0;
    for _ in 0..20 {
        random_op(&mut rng, &vol, &mut n);
    }
    let mut expected = vec![listing(&vol)];
    let mut attach = vec![OsStr::new("attach"), os(&vol)];
    if let Some(m) = max_layers {
        attach.extend([OsStr::new("--max-layers"), OsStr::new(m)]);
    }
    let r = env.run(&attach).ok();
    let mut ids = vec![r.stdout.trim().to_string()];
    assert_same(
        "merged view right after attach",
        &expected[0],
        &listing(&vol),
    );
    let mut renamed = 0;
    for _ in 0..rounds {
        for _ in 0..ops {
            if renames && rng.below(3) == 0 {
                rename_op(&mut rng, &vol, &mut n);
            } else {
                random_op(&mut rng, &vol, &mut n);
            }
        }
        expected.push(listing(&vol));
        if renames {
            let st = env.run(&[OsStr::new("status"), os(&vol)]).ok().stdout;
            renamed += st.lines().filter(|l| l.starts_with("> ")).count();
        }
        if renames && ids.len() == 3 {
            let r = env
                .run(&[
                    OsStr::new("snapshot"),
                    os(&vol),
                    OsStr::new("--tag"),
                    OsStr::new("mid"),
                ])
                .ok();
            ids.push(r.stdout.trim().to_string());
        } else {
            ids.push(snapshot_id(&env, &vol));
        }
        assert_same(
            "merged view across rotation",
            expected.last().unwrap(),
            &listing(&vol),
        );
    }
    assert!(
        !renames || renamed > 0,
        "no directory was renamed in place (status shows none)"
    );
    // From the repository alone: take the volume down and hide its state.
    env.run(&[OsStr::new("down"), os(&vol)]).ok();
    let empty_state = env.path("no-state");
    for (i, (id, want)) in ids.iter().zip(&expected).enumerate() {
        let target = env.path(&format!("restore-{i}"));
        let r = env
            .cmd()
            .env("LAYBAK_STATE_DIR", &empty_state)
            .args(["restore", id.as_str()])
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "restore {i}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_same(
            &format!("seed {seed}: snapshot {i} restored"),
            want,
            &listing(&target),
        );
    }
    env.lb(&["check", "--read-data"]).ok();
    if vars.iter().any(|(k, _)| *k == "LAYBAK_PAGE_ENTRIES") {
        let paged = files_below(&env.repo.join("layers"))
            .iter()
            .filter(|f| fs::read(f).unwrap()[7] == laybak::format::LAYER_PAGES)
            .count();
        assert!(paged > 0, "no layer manifest was written as pages");
    }
    if renames {
        // Squash renamed layers away, below a kept snapshot (into a base)
        // and between two kept ones (a layer with redirects of its own):
        // every kept snapshot still restores as recorded.
        env.lb(&["forget", "--keep-last", "2", "--keep-tag", "mid", "--prune"])
            .ok();
        let n = ids.len();
        for i in [3, n - 2, n - 1] {
            let target = env.path(&format!("kept-{i}"));
            env.cmd()
                .env("LAYBAK_STATE_DIR", &empty_state)
                .args(["restore", ids[i].as_str()])
                .arg(&target)
                .output()
                .unwrap();
            assert_same(
                &format!("seed {seed}: snapshot {i} restored after forget"),
                &expected[i],
                &listing(&target),
            );
        }
        env.lb(&["check", "--read-data"]).ok();
    }
    // Back up, and a historical mount of an early snapshot matches too.
    env.run(&[OsStr::new("up"), os(&vol)]).ok();
    let m = env.path("m1");
    // (After the forget above, snapshot 3 is the oldest one left.)
    let early = if renames { 3 } else { 1 };
    env.run(&[OsStr::new("mount"), OsStr::new(&ids[early]), os(&m)])
        .ok();
    assert_mounted_as(&m, &expected[early]);
    env.run(&[OsStr::new("umount"), os(&m)]).ok();
    if renames {
        // From the repository alone: layers materialized into a fresh
        // state dir's cache, renamed directories with their redirects.
        let fresh = env.path("fresh-state");
        let m2 = env.path("m2");
        let n = ids.len();
        let r = env
            .cmd()
            .env("LAYBAK_STATE_DIR", &fresh)
            .args(["mount", ids[n - 1].as_str()])
            .arg(&m2)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_mounted_as(&m2, &expected[n - 1]);
        let r = env
            .cmd()
            .env("LAYBAK_STATE_DIR", &fresh)
            .arg("umount")
            .arg(&m2)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    // Detach leaves the current contents as a plain directory.
    let last = listing(&vol);
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    assert!(
        laybak::overlay::find_mount(&vol)
            .unwrap()
            .is_none_or(|m| m.fstype != "overlay")
    );
    assert_same("after detach", &last, &listing(&vol));
    assert!(!vol.join(".laybak").exists());
}

/// A read-only historical mount at `m` shows `want` (the top layer's root
/// aside: compare contents only).
#[track_caller]
fn assert_mounted_as(m: &Path, want: &std::collections::BTreeMap<Vec<u8>, Rec>) {
    let mut mounted = listing(m);
    let mut want = want.clone();
    mounted.remove(&Vec::new());
    want.remove(&Vec::new());
    for (k, w) in &want {
        let g = mounted
            .get(k)
            .unwrap_or_else(|| panic!("mount lacks {:?}", String::from_utf8_lossy(k)));
        assert_eq!(
            (w.kind, w.content, &w.target, w.mode, w.uid, w.mtime),
            (g.kind, g.content, &g.target, g.mode, g.uid, g.mtime),
            "mounted {:?}",
            String::from_utf8_lossy(k)
        );
    }
    assert_eq!(mounted.len(), want.len());
}

/// Directory renames in place (overlay redirects) against the kernel: the
/// view recorded at each snapshot is what a restore from the repository
/// alone gives, across rotations, merges of renamed layers into fresh ones
/// (`--max-layers 3`), a historical mount and detach. More seeds:
/// `LAYBAK_RENAME_SEEDS=N`.
#[test]
fn random_directory_renames_restore_identically() {
    let extra: u64 = std::env::var("LAYBAK_RENAME_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for k in 0..1 + extra {
        random_rounds_opts(0x5eed_0000 + k, 8, 25, Some("3"), true, &[]);
    }
}

/// The same with the strict rotation (unmount, fold into the base, mount):
/// a layer with renamed directories is folded by building a fresh base.
#[test]
fn random_directory_renames_with_strict_rotation() {
    random_rounds_opts(
        0xfeed_0001,
        8,
        25,
        Some("2"),
        true,
        &[("LAYBAK_FORCE_MOUNT2", "1")],
    );
}

/// The same with layer manifests cut into pages of three entries (format
/// version 4), so every command meets paged layers: attach, snapshots,
/// restore from the repository alone, squash and prune, historical
/// mounts from the cache, detach; and every scan sorts its entries through
/// runs on disk (a run budget of 2,000 bytes).
#[test]
fn random_directory_renames_with_paged_manifests() {
    random_rounds_opts(
        0x9a9e_0001,
        8,
        25,
        Some("3"),
        true,
        &[("LAYBAK_PAGE_ENTRIES", "3"), ("LAYBAK_RUN_BYTES", "2000")],
    );
}

#[test]
fn random_operations_restore_identically_seed_1() {
    random_rounds(0x9e3779b97f4a7c15, 6, 25);
}

#[test]
fn random_operations_restore_identically_seed_2() {
    random_rounds(0xdeadbeefcafef00d, 6, 25);
}

#[test]
fn random_operations_restore_identically_seed_3() {
    random_rounds(12345678901234567, 4, 60);
}

/// A short live chain: every rotation merges two layers into a fresh one
/// (by hard links), and the merged chain must show exactly the kernel's view.
#[test]
fn random_operations_with_merged_layers_keep_the_view() {
    random_rounds_with(0x05ee_d0f3_e46e, 12, 20, Some("3"));
}

#[test]
fn whiteouts_opaque_dirs_and_status() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir_all(vol.join("d/sub")).unwrap();
    fs::write(vol.join("d/sub/f"), b"1").unwrap();
    fs::write(vol.join("keep"), b"k").unwrap();
    fs::write(vol.join("gone"), b"g").unwrap();
    let first = env
        .run(&[OsStr::new("attach"), os(&vol)])
        .ok()
        .stdout
        .trim()
        .to_string();
    fs::remove_file(vol.join("gone")).unwrap();
    fs::remove_dir_all(vol.join("d")).unwrap();
    fs::create_dir(vol.join("d")).unwrap();
    fs::write(vol.join("d/new"), b"n").unwrap();
    fs::write(vol.join("keep"), b"k2").unwrap();
    fs::write(vol.join("added"), b"a").unwrap();
    let st = env.run(&[OsStr::new("status"), os(&vol)]).ok().stdout;
    let lines: Vec<&str> = st.lines().collect();
    for want in ["- gone", "R d", "M keep", "+ added", "+ d/new"] {
        assert!(lines.contains(&want), "status lacks {want:?}: {st}");
    }
    let second = snapshot_id(&env, &vol);
    assert!(
        env.run(&[OsStr::new("status"), os(&vol)])
            .ok()
            .stdout
            .is_empty()
    );
    let d = env.lb(&["diff", &first, &second, "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&d).unwrap();
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        list("added").contains(&"added".to_string())
            && list("added").contains(&"d/new".to_string())
    );
    assert!(
        list("deleted").contains(&"gone".to_string())
            && list("deleted").contains(&"d/sub/f".to_string())
    );
    assert!(list("modified").contains(&"keep".to_string()));
    let t = env.path("r");
    env.run(&[OsStr::new("restore"), OsStr::new(&second), os(&t)])
        .ok();
    assert_eq!(fs::read(t.join("d/new")).unwrap(), b"n");
    assert!(!t.join("d/sub").exists() && !t.join("gone").exists());
    let t2 = env.path("r2");
    env.run(&[
        OsStr::new("restore"),
        OsStr::new(&second[..10]),
        os(&t2),
        OsStr::new("--path"),
        OsStr::new("d"),
    ])
    .ok();
    assert!(t2.join("d/new").exists() && !t2.join("keep").exists());
    let json = env.lb(&["snapshots", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let s1 = &v[1];
    assert_eq!(s1["id"], second.as_str());
    assert_eq!(s1["parent"], first.as_str());
    assert_eq!(s1["layers"].as_array().unwrap().len(), 2);
    assert_eq!(s1["volume"], "vol");
    assert!(s1["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s1["summary"]["whiteouts"], 1);
}

#[test]
fn busy_volume_names_the_holder_and_stays_mounted() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // A writer blocks the freeze: named, and nothing changes.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3>>log; exec sleep 30")
        .current_dir(&vol)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    fs::write(vol.join("written"), b"w").unwrap();
    let r = env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ]);
    child.kill().unwrap();
    child.wait().unwrap();
    let r = r.fails(11, &format!("pid {} (sleep): file", child.id()));
    assert!(r.stderr.contains("open for writing"), "{}", r.stderr);
    assert_eq!(fs::read(vol.join("written")).unwrap(), b"w");
    assert!(laybak::overlay::find_mount(&vol).unwrap().unwrap().fstype == "overlay");
    snapshot_id(&env, &vol);
    // With strict rotation (0.1's), any use blocks, a working directory too.
    env.run(&[
        OsStr::new("policy"),
        os(&vol),
        OsStr::new("--rotation"),
        OsStr::new("strict"),
    ])
    .ok();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(&vol)
        .spawn()
        .unwrap();
    // (A snapshot of an unchanged volume never rotates, so never waits.)
    let r = env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ]);
    r.ok();
    fs::write(vol.join("changed"), b"c").unwrap();
    let r = env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ]);
    child.kill().unwrap();
    child.wait().unwrap();
    r.fails(11, &format!("pid {} (sleep): cwd", child.id()));
    snapshot_id(&env, &vol);
}

#[test]
fn unreachable_repository_keeps_the_layer_and_next_run_archives_it() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("one"), b"1").unwrap();
    let r = env.run_env(
        &[OsStr::new("snapshot"), os(&vol)],
        &[("LAYBAK_FAILPOINT", "pack-write:error")],
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("next `laybak snapshot` archives it"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    fs::write(vol.join("two"), b"2").unwrap();
    // The repository goes away entirely, then comes back.
    let moved = env.path("repo-away");
    fs::rename(&env.repo, &moved).unwrap();
    let r = env.run(&[OsStr::new("snapshot"), os(&vol)]);
    assert_ne!(r.code, 0);
    fs::rename(&moved, &env.repo).unwrap();
    fs::write(vol.join("three"), b"3").unwrap();
    snapshot_id(&env, &vol);
    let v: serde_json::Value =
        serde_json::from_str(&env.lb(&["snapshots", "--json"]).ok().stdout).unwrap();
    let snaps = v.as_array().unwrap();
    assert_eq!(snaps.len(), 4, "attach + three sealed layers, none lost");
    for (i, want) in [
        (1, vec!["one"]),
        (2, vec!["one", "two"]),
        (3, vec!["one", "two", "three"]),
    ] {
        let t = env.path(&format!("r{i}"));
        env.lb(&[
            "restore",
            snaps[i]["id"].as_str().unwrap(),
            t.to_str().unwrap(),
        ])
        .ok();
        let mut names: Vec<String> = fs::read_dir(&t)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut w: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        w.sort();
        assert_eq!(names, w, "snapshot {i}");
    }
    env.lb(&["check", "--read-data"]).ok();
}

#[test]
fn crash_at_every_snapshot_failpoint_loses_nothing() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("base"), b"b").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // `frozen` and `beneath` are inside the gap-free swap: after `up` the
    // volume must be writable again (the next round writes into it).
    let points = [
        "before-unmount",
        "frozen",
        "beneath",
        "unmounted",
        "state-rotated",
        "remounted",
        "scan",
        "pack-write",
        "index-write",
        "manifest-write",
        "snapshot-write",
        "snapshot-written",
    ];
    let mut written = Vec::new();
    for (i, fp) in points.iter().enumerate() {
        let name = format!("f{i}");
        fs::write(vol.join(&name), name.as_bytes()).unwrap();
        written.push(name);
        let r = env.run_env(
            &[OsStr::new("snapshot"), os(&vol)],
            &[("LAYBAK_FAILPOINT", fp)],
        );
        assert_ne!(r.code, 0, "failpoint {fp} was not reached");
        assert!(
            r.stderr.contains(&format!("failpoint {fp}")),
            "{fp}: {}",
            r.stderr
        );
        env.run(&[OsStr::new("up"), os(&vol)]).ok();
        for w in &written {
            assert_eq!(
                fs::read(vol.join(w)).unwrap(),
                w.as_bytes(),
                "after crash at {fp}"
            );
        }
        env.lb(&["check", "--read-data"]).ok();
    }
    snapshot_id(&env, &vol);
    // One record per sealed layer: no duplicates from crashed runs.
    let v: serde_json::Value =
        serde_json::from_str(&env.lb(&["snapshots", "--json"]).ok().stdout).unwrap();
    let mut tops: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["layers"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let n = tops.len();
    tops.sort();
    tops.dedup();
    assert_eq!(tops.len(), n, "two snapshot records for one layer");
    // Every snapshot restores, and the newest has every write.
    let v: serde_json::Value =
        serde_json::from_str(&env.lb(&["snapshots", "--json"]).ok().stdout).unwrap();
    for (i, s) in v.as_array().unwrap().iter().enumerate() {
        env.lb(&[
            "restore",
            s["id"].as_str().unwrap(),
            env.path(&format!("r{i}")).to_str().unwrap(),
        ])
        .ok();
    }
    let last = env.path(&format!("r{}", v.as_array().unwrap().len() - 1));
    for w in &written {
        assert_eq!(fs::read(last.join(w)).unwrap(), w.as_bytes());
    }
    assert_eq!(fs::read(last.join("base")).unwrap(), b"b");
}

#[test]
fn live_chain_is_folded_and_stays_bounded() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("f"), b"0").unwrap();
    env.run(&[
        OsStr::new("attach"),
        os(&vol),
        OsStr::new("--max-layers"),
        OsStr::new("3"),
    ])
    .ok();
    let mut ids = Vec::new();
    let mut views = Vec::new();
    for i in 1..=6 {
        fs::write(vol.join("f"), i.to_string()).unwrap();
        fs::create_dir_all(vol.join(format!("d{i}"))).unwrap();
        if i > 1 {
            fs::remove_dir(vol.join(format!("d{}", i - 1))).unwrap();
        }
        views.push(listing(&vol));
        if i == 5 {
            // Crash in the middle of a merge (the chain is at its bound by
            // now): nothing is lost, the next snapshot merges again.
            let r = env.run_env(
                &[OsStr::new("snapshot"), os(&vol)],
                &[("LAYBAK_FAILPOINT", "merge")],
            );
            assert!(
                r.stderr.contains("failpoint merge"),
                "merge not reached: {}",
                r.stderr
            );
            env.run(&[OsStr::new("up"), os(&vol)]).ok();
            assert_same(
                "after a crash during a fold",
                views.last().unwrap(),
                &listing(&vol),
            );
            let count = |env: &Env| -> Vec<String> {
                let out = env.lb(&["snapshots", "--json"]).ok().stdout;
                serde_json::from_str::<serde_json::Value>(&out)
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["id"].as_str().unwrap().to_string())
                    .collect()
            };
            let n = count(&env).len();
            // The crash came before the swap: the next snapshot seals the
            // same upper, once.
            snapshot_id(&env, &vol);
            let all = count(&env);
            assert_eq!(
                all.len(),
                n + 1,
                "one snapshot for the crashed run's changes"
            );
            ids.push(all[n].clone());
        } else {
            ids.push(snapshot_id(&env, &vol));
        }
        let info = laybak::overlay::find_mount(&vol).unwrap().unwrap();
        let lowers = info.super_options.matches("lowerdir").count();
        assert!(
            lowers <= 3,
            "chain has {lowers} lowers: {}",
            info.super_options
        );
        assert_same("after fold", views.last().unwrap(), &listing(&vol));
    }
    // Early snapshots are no longer local as single layers: mount from the repository.
    let m = env.path("m");
    env.run(&[OsStr::new("mount"), OsStr::new(&ids[1]), os(&m)])
        .ok();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"2");
    assert!(m.join("d2").is_dir() && !m.join("d1").exists());
    env.run(&[OsStr::new("umount"), os(&m)]).ok();
    for (i, id) in ids.iter().enumerate() {
        let t = env.path(&format!("r{i}"));
        env.run(&[OsStr::new("restore"), OsStr::new(id), os(&t)])
            .ok();
        assert_same("restore after folds", &views[i], &listing(&t));
    }
}

#[test]
fn attach_of_a_mount_point_moves_instead_of_copying() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &vol,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .unwrap();
    fs::write(vol.join("big"), vec![7u8; 1 << 20]).unwrap();
    let ino = fs::metadata(vol.join("big")).unwrap().ino();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    assert_eq!(
        fs::metadata(vol.join("big")).unwrap().ino(),
        ino,
        "data was copied, not moved"
    );
    let backing = env.state.join("backing/vol/.laybak/l/1/big");
    assert_eq!(fs::metadata(backing).unwrap().ino(), ino);
    fs::write(vol.join("x"), b"x").unwrap();
    snapshot_id(&env, &vol);
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    assert_eq!(fs::read(vol.join("x")).unwrap(), b"x");
    assert_eq!(fs::metadata(vol.join("big")).unwrap().ino(), ino);
}

#[test]
fn legacy_mount2_path_works_too() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), b"1").unwrap();
    let legacy = [("LAYBAK_FORCE_MOUNT2", "1")];
    env.run_env(&[OsStr::new("attach"), os(&vol)], &legacy).ok();
    fs::write(vol.join("a"), b"2").unwrap();
    for _ in 0..2 {
        let r = env
            .run_env(&[OsStr::new("snapshot"), os(&vol)], &legacy)
            .ok();
        assert_eq!(r.stdout.trim().len(), 64);
    }
    let info = laybak::overlay::find_mount(&vol).unwrap().unwrap();
    assert!(
        info.super_options.contains("lowerdir="),
        "{}",
        info.super_options
    );
    assert!(info.super_options.contains("redirect_dir=on"));
    let m = env.path("m");
    env.run_env(
        &[OsStr::new("mount"), OsStr::new("latest"), os(&m)],
        &legacy,
    )
    .ok();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"2");
    env.run(&[OsStr::new("umount"), os(&m)]).ok();
}

#[test]
fn crashed_attach_and_detach_resume_without_loss() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir_all(vol.join("d")).unwrap();
    for i in 0..5 {
        fs::write(vol.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    fs::write(vol.join("d/g"), b"g").unwrap();
    let before = listing(&vol);
    let r = env.run_env(
        &[OsStr::new("attach"), os(&vol)],
        &[("LAYBAK_FAILPOINT", "attach-moved")],
    );
    assert_ne!(r.code, 0);
    env.run(&[OsStr::new("up"), os(&vol)]).ok();
    assert_same("attach finished by up", &before, &listing(&vol));
    // The base layer was never archived: the next snapshot does it.
    fs::write(vol.join("f9"), b"9").unwrap();
    snapshot_id(&env, &vol);
    fs::remove_file(vol.join("f0")).unwrap();
    fs::write(vol.join("d/g"), b"g2").unwrap();
    snapshot_id(&env, &vol);
    fs::write(vol.join("top"), b"t").unwrap();
    let want = listing(&vol);
    for fp in ["detach-fold", "detach-move"] {
        let r = env.run_env(
            &[OsStr::new("detach"), os(&vol)],
            &[("LAYBAK_FAILPOINT", fp)],
        );
        assert_ne!(r.code, 0, "{fp} not reached");
    }
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    assert_same("detach resumed after crashes", &want, &listing(&vol));
    assert!(!vol.join(".laybak").exists());
    env.lb(&["check", "--read-data"]).ok();
}

#[test]
fn big_and_sparse_files_restore_exactly_and_stay_sparse() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    let mut rng = Rng(77);
    // 40 MiB of mixed data: restored by several threads at once.
    let big: Vec<u8> = (0..40)
        .flat_map(|i| {
            if i % 3 == 0 {
                vec![i as u8; 1 << 20]
            } else {
                rng.bytes(1 << 20)
            }
        })
        .collect();
    fs::write(vol.join("big"), &big).unwrap();
    rustix::fs::lsetxattr(
        vol.join("big"),
        "user.k",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::os::unix::fs::lchown(vol.join("big"), Some(1234), Some(4321)).unwrap();
    fs::set_permissions(vol.join("big"), fs::Permissions::from_mode(0o640)).unwrap();
    set_mtime(&vol.join("big"), 1_234_567_890, 123_456_789);
    // 1 GiB apparent, three data islands.
    let f = fs::File::create(vol.join("sparse")).unwrap();
    f.set_len(1 << 30).unwrap();
    for (len, off) in [(6000, 0u64), (106_000, 300 << 20), (6000, (1 << 30) - 8192)] {
        f.write_all_at(&rng.bytes(len), off).unwrap();
    }
    drop(f);
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // Copy-up of the big file after a 1 MiB change stores only changed chunks.
    let mut changed = big.clone();
    changed[20 << 20..21 << 20].copy_from_slice(&rng.bytes(1 << 20));
    fs::OpenOptions::new()
        .write(true)
        .open(vol.join("big"))
        .unwrap()
        .write_all_at(&changed[20 << 20..21 << 20], 20 << 20)
        .unwrap();
    let want = listing(&vol);
    let id = snapshot_id(&env, &vol);
    let v: serde_json::Value =
        serde_json::from_str(&env.lb(&["snapshots", "--json"]).ok().stdout).unwrap();
    let added = v[1]["summary"]["new_bytes"].as_u64().unwrap();
    assert!(
        added < 8 << 20,
        "a 1 MiB change in a 40 MiB file stored {added} bytes"
    );
    let t = env.path("t");
    env.run(&[OsStr::new("restore"), OsStr::new(&id), os(&t)])
        .ok();
    assert_same("big and sparse", &want, &listing(&t));
    let md = fs::metadata(t.join("sparse")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() * 512 < 4 << 20,
        "sparse file restored dense: {} blocks",
        md.blocks()
    );
}

/// Hard links with `index=off`: a copy-up (chmod, append) through one name
/// of a file that existed at the last snapshot splits the group — only that
/// name changes. Snapshots record exactly what users saw: the group before,
/// two files after; links made within one layer stay links.
#[test]
fn hard_links_are_recorded_as_users_see_them() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), b"shared").unwrap();
    fs::hard_link(vol.join("a"), vol.join("b")).unwrap();
    fs::hard_link(vol.join("a"), vol.join("c")).unwrap();
    let first = env
        .run(&[OsStr::new("attach"), os(&vol)])
        .ok()
        .stdout
        .trim()
        .to_string();
    let before = listing(&vol);
    assert_eq!(before[&b"a"[..]].link_group, Some(b"a".to_vec()));
    // Copy-up through one name: that name alone changes.
    fs::set_permissions(vol.join("a"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(vol.join("b"))
        .unwrap()
        .write_all(b"+b")
        .unwrap();
    fs::write(vol.join("x"), b"new").unwrap();
    fs::hard_link(vol.join("x"), vol.join("y")).unwrap();
    let after = listing(&vol);
    assert_eq!(fs::read(vol.join("c")).unwrap(), b"shared");
    assert_eq!(fs::read(vol.join("b")).unwrap(), b"shared+b");
    assert_eq!(after[&b"a"[..]].mode, 0o600);
    assert_ne!(after[&b"c"[..]].mode, 0o600);
    for n in ["a", "b", "c"] {
        assert_eq!(after[n.as_bytes()].link_group, None, "{n} split off");
    }
    assert_eq!(after[&b"y"[..]].link_group, Some(b"x".to_vec()));
    let second = snapshot_id(&env, &vol);
    for (id, want, t) in [(&first, &before, "r1"), (&second, &after, "r2")] {
        let target = env.path(t);
        env.run(&[OsStr::new("restore"), OsStr::new(id), os(&target)])
            .ok();
        assert_same(&format!("restore {t}"), want, &listing(&target));
    }
}

/// `pip install --upgrade` in a volume: pip stashes the old version's
/// directories by renaming them; every such rename must run in place (no
/// EXDEV, which would make pip copy them), and the upgraded tree restores.
/// The wheels are made here, so no network is needed.
#[test]
fn pip_upgrade_renames_directories_in_place() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let wheels = env.path("wheels");
    fs::create_dir(&wheels).unwrap();
    let make = r#"
import sys, zipfile, os
out = sys.argv[1]
for v in ("1.0", "2.0"):
    with zipfile.ZipFile(os.path.join(out, f"demo-{v}-py3-none-any.whl"), "w") as z:
        files = {
            "demo/__init__.py": f"VERSION = {v!r}\n",
            "demo/sub/data.txt": "x" * 100000 + v,
            f"demo-{v}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: demo\nVersion: {v}\n",
            f"demo-{v}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: laybak-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        rec = "".join(f"{n},,\n" for n in files) + f"demo-{v}.dist-info/RECORD,,\n"
        files[f"demo-{v}.dist-info/RECORD"] = rec
        for n, c in files.items():
            z.writestr(n, c)
"#;
    let ok = std::process::Command::new("python3")
        .args(["-c", make])
        .arg(&wheels)
        .status()
        .is_ok_and(|s| s.success());
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    let venv = vol.join("venv");
    let have_venv = ok
        && std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
    if !have_venv {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 -m venv is needed (apt-get install python3-venv)"
        );
        eprintln!("SKIPPED: python3 -m venv is not available here");
        return;
    }
    let py = venv.join("bin/python");
    let pip = |version: &str, log: &Path| {
        // Record every rename that fails with EXDEV (shutil.move would then
        // quietly copy).
        let wrapper = r#"
import errno, os, runpy, sys
log, orig = sys.argv.pop(1), os.rename
def rename(a, b, *k, **kw):
    try:
        return orig(a, b, *k, **kw)
    except OSError as e:
        if e.errno == errno.EXDEV:
            open(log, "a").write(f"{a}\n")
        raise
os.rename = rename
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__")
"#;
        let out = std::process::Command::new(&py)
            .args(["-c", wrapper])
            .arg(log)
            .args(["install", "--upgrade", "--no-index", "--find-links"])
            .arg(&wheels)
            .arg(format!("demo=={version}"))
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install demo=={version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let log = env.path("exdev.log");
    pip("1.0", &log);
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    pip("2.0", &log);
    assert!(
        !log.exists(),
        "renames fell back to copying: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let v = std::process::Command::new(&py)
        .args(["-c", "import demo; print(demo.VERSION)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), "2.0");
    let want = listing(&vol);
    let id = snapshot_id(&env, &vol);
    let target = env.path("r");
    env.run(&[OsStr::new("restore"), OsStr::new(&id), os(&target)])
        .ok();
    assert_same("restored after pip upgrade", &want, &listing(&target));
}

/// A snapshot of a volume where nothing changed is only a record naming the
/// previous snapshot's layers (no rotation); any change, even to the root's
/// mode or mtime, takes the full way; both restore as the volume looked.
#[test]
fn unchanged_volume_snapshot_is_a_record_of_the_same_layers() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), b"1").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("b"), b"2").unwrap();
    let s1 = snapshot_id(&env, &vol);
    let s2 = snapshot_id(&env, &vol);
    assert_ne!(s1, s2);
    let snaps = env.snapshots_json();
    let find = |id: &str| snaps.iter().find(|s| s["id"] == id).unwrap().clone();
    assert_eq!(find(&s1)["layers"], find(&s2)["layers"], "{snaps:?}");
    assert_eq!(find(&s2)["parent"], s1.as_str());
    // A change to the root alone (create and remove a name: a new mtime).
    fs::write(vol.join("tmp"), b"t").unwrap();
    fs::remove_file(vol.join("tmp")).unwrap();
    let want = listing(&vol);
    let s3 = snapshot_id(&env, &vol);
    let snaps = env.snapshots_json();
    let find = |id: &str| snaps.iter().find(|s| s["id"] == id).unwrap().clone();
    assert_ne!(find(&s2)["layers"], find(&s3)["layers"]);
    for (id, t) in [(&s2, "r2"), (&s3, "r3")] {
        let target = env.path(t);
        env.run(&[OsStr::new("restore"), OsStr::new(id), os(&target)])
            .ok();
        if t == "r3" {
            assert_same("root mtime change", &want, &listing(&target));
        }
        assert_eq!(fs::read(target.join("b")).unwrap(), b"2");
    }
    env.lb(&["check", "--read-data"]).ok();
}

/// `status` names a directory renamed in place once, with where it was;
/// the whiteout left at the old name is part of that line.
#[test]
fn status_shows_renamed_directories() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir_all(vol.join("old/sub")).unwrap();
    fs::create_dir(vol.join("x")).unwrap();
    fs::write(vol.join("old/sub/f"), b"f").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::rename(vol.join("old"), vol.join("new")).unwrap();
    fs::rename(vol.join("new/sub"), vol.join("x/moved")).unwrap();
    let st = env.run(&[OsStr::new("status"), os(&vol)]).ok().stdout;
    let lines: Vec<&str> = st.lines().collect();
    assert!(lines.contains(&"> new (from old)"), "{st}");
    assert!(lines.contains(&"> x/moved (from old/sub)"), "{st}");
    assert!(!lines.iter().any(|l| l.starts_with("- ")), "{st}");
    let json = env
        .run(&[OsStr::new("status"), os(&vol), OsStr::new("--json")])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|c| c["change"] == "renamed" && c["path"] == "new" && c["from"] == "old"),
        "{json}"
    );
}
