//! Faults: damaged repositories, full disks, overlapping cron runs, and
//! kill -9 at random moments under a writer.

mod common;
use common::*;
use laybak::format::LayerId;
use laybak::layer::Node;
use laybak::repo::Repo;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;

type Listing = BTreeMap<Vec<u8>, Rec>;

fn lb_repo(env: &Env, repo: &Path, args: &[&str]) -> Run {
    let mut a: Vec<&OsStr> = vec![OsStr::new("--repo"), os(repo)];
    a.extend(args.iter().map(OsStr::new));
    env.run(&a)
}

fn snapshots(env: &Env, repo: &Path) -> Vec<(String, String, Vec<String>)> {
    let r = lb_repo(env, repo, &["snapshots", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["volume"].as_str().unwrap().to_string(),
                s["layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn flip(p: &Path, at: usize) {
    let mut d = fs::read(p).unwrap();
    let i = at.min(d.len() - 1);
    d[i] ^= 0x40;
    fs::write(p, d).unwrap();
}

fn truncate(p: &Path) {
    let d = fs::read(p).unwrap();
    fs::write(p, &d[..d.len() / 2]).unwrap();
}

/// Two volumes, two snapshots each; returns the restored listing of each
/// snapshot by id.
fn two_volumes(env: &Env) -> BTreeMap<String, Listing> {
    env.init();
    for name in ["va", "vb"] {
        let vol = env.path(name);
        fs::create_dir_all(vol.join("sub")).unwrap();
        fs::write(vol.join("sub/one"), format!("{name} one ").repeat(20_000)).unwrap();
        env.run(&[OsStr::new("attach"), os(&vol)]).ok();
        fs::write(vol.join("two"), format!("{name} two ").repeat(30_000)).unwrap();
        env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
        env.run(&[OsStr::new("down"), os(&vol)]).ok();
    }
    let mut out = BTreeMap::new();
    for (id, _, _) in snapshots(env, &env.repo) {
        let t = env.path(&format!("want-{id}"));
        lb_repo(env, &env.repo, &["restore", &id, t.to_str().unwrap()]).ok();
        out.insert(id, listing(&t));
    }
    out
}

/// After damage: `check` names `needle` and exits 3; every snapshot it does
/// not list as damaged restores identically.
fn assert_contained(
    env: &Env,
    repo: &Path,
    want: &BTreeMap<String, Listing>,
    needle: &str,
    case: &str,
    read_data: bool,
) -> Vec<String> {
    let args: &[&str] = if read_data {
        &["check", "--read-data"]
    } else {
        &["check"]
    };
    let r = lb_repo(env, repo, args);
    assert_eq!(r.code, 3, "{case}: check exit {}: {}", r.code, r.stderr);
    assert!(
        r.stderr.contains(needle),
        "{case}: check output lacks {needle:?}: {}",
        r.stderr
    );
    let damaged: Vec<String> = r
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("damaged snapshot: "))
        .map(str::to_string)
        .collect();
    assert!(
        !damaged.is_empty() || needle.contains("snapshot"),
        "{case}: no snapshot named as damaged: {}",
        r.stderr
    );
    for (id, listing_want) in want {
        if damaged.contains(id) {
            continue;
        }
        let t = env.path(&format!("{case}-{}", &id[..8]));
        let rr = lb_repo(env, repo, &["restore", id, t.to_str().unwrap()]);
        if rr.code == 1 && rr.stderr.contains("no snapshot matches") {
            continue; // the damaged record itself
        }
        assert_eq!(
            rr.code, 0,
            "{case}: undamaged snapshot {id} does not restore: {}",
            rr.stderr
        );
        assert_eq!(
            &listing(&t),
            listing_want,
            "{case}: snapshot {id} restored differently"
        );
    }
    damaged
}

#[test]
fn corruption_of_each_kind_of_file_is_named_and_contained() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let want = two_volumes(&env);
    let snaps = snapshots(&env, &env.repo);
    let repo = Repo::open(&env.repo, &common::passwords()).unwrap();
    // volume va's top layer and a pack holding only its data
    let (a_top_snap, _, a_layers) = snaps
        .iter()
        .find(|s| s.1 == "va" && s.2.len() == 2)
        .unwrap()
        .clone();
    let a_top = LayerId::parse(a_layers.last().unwrap()).unwrap();
    let layer = repo.read_layer(&a_top).unwrap();
    let chunk = layer
        .entries
        .iter()
        .find_map(|e| match &e.node {
            Node::File { extents, .. } if !extents.is_empty() => Some(extents[0].chunks[0].id),
            _ => None,
        })
        .unwrap();
    let loc = repo.locate(&chunk).unwrap().unwrap();
    let pack_rel = laybak::repo::pack_name(&loc.pack);
    let b_snap = snaps.iter().find(|s| s.1 == "vb").unwrap().0.clone();
    let layer_rel = format!("layers/{}", a_top.hex());
    let snap_rel = format!("snapshots/{b_snap}");
    let index_rel: Vec<String> = repo
        .index_ids()
        .unwrap()
        .iter()
        .map(|i| format!("index/{}", i.hex()))
        .collect();
    drop(repo);

    let mut cases = 0;
    let mut run_case = |name: &str,
                        damage: &dyn Fn(&Path),
                        needle: &str,
                        read_data: bool,
                        expect_damaged: Option<&str>| {
        let r = env.path(&format!("case-{name}"));
        copy_dir(&env.repo, &r);
        damage(&r);
        let damaged = assert_contained(&env, &r, &want, needle, name, read_data);
        if let Some(id) = expect_damaged {
            assert!(
                damaged.iter().any(|d| d == id),
                "{name}: {id} not named in {damaged:?}"
            );
            assert!(!damaged.iter().any(|d| want.contains_key(d) && snaps.iter().any(|s| &s.0 == d && s.1 == "vb")), "{name}: volume vb named damaged");
        }
        cases += 1;
    };
    run_case(
        "pack-flip",
        &|r| flip(&r.join(&pack_rel), loc.blob.offset as usize + 3),
        "corrupt",
        true,
        Some(&a_top_snap),
    );
    run_case(
        "pack-truncate",
        &|r| truncate(&r.join(&pack_rel)),
        "has size",
        false,
        Some(&a_top_snap),
    );
    run_case(
        "pack-delete",
        &|r| fs::remove_file(r.join(&pack_rel)).unwrap(),
        "is missing",
        false,
        Some(&a_top_snap),
    );
    run_case(
        "layer-flip",
        &|r| flip(&r.join(&layer_rel), 20),
        "layer",
        false,
        Some(&a_top_snap),
    );
    run_case(
        "layer-truncate",
        &|r| truncate(&r.join(&layer_rel)),
        "layer",
        false,
        Some(&a_top_snap),
    );
    run_case(
        "layer-delete",
        &|r| fs::remove_file(r.join(&layer_rel)).unwrap(),
        "layer",
        false,
        Some(&a_top_snap),
    );
    run_case(
        "snapshot-flip",
        &|r| flip(&r.join(&snap_rel), 50),
        "snapshot",
        false,
        None,
    );
    run_case(
        "snapshot-truncate",
        &|r| truncate(&r.join(&snap_rel)),
        "snapshot",
        false,
        None,
    );
    run_case(
        "index-flip",
        &|r| {
            for i in &index_rel {
                flip(&r.join(i), 30);
            }
        },
        "index",
        false,
        None,
    );
    assert_eq!(cases, 9);

    // A lost index: check names the missing chunks; repair rebuilds it from the packs.
    let r = env.path("case-index-lost");
    copy_dir(&env.repo, &r);
    for i in &index_rel {
        fs::remove_file(r.join(i)).unwrap();
    }
    let c = lb_repo(&env, &r, &["check"]);
    assert_eq!(c.code, 3);
    assert!(c.stderr.contains("chunks are missing"), "{}", c.stderr);
    let rep = lb_repo(&env, &r, &["repair", "index"]).ok();
    assert!(rep.stdout.contains("0 damaged blobs"), "{}", rep.stdout);
    lb_repo(&env, &r, &["check", "--read-data"]).ok();
    for (id, l) in &want {
        let t = env.path(&format!("repaired-{}", &id[..8]));
        lb_repo(&env, &r, &["restore", id, t.to_str().unwrap()]).ok();
        assert_eq!(&listing(&t), l);
    }
    // A deleted snapshot record leaves a consistent repository.
    let r = env.path("case-snapshot-delete");
    copy_dir(&env.repo, &r);
    fs::remove_file(r.join(&snap_rel)).unwrap();
    lb_repo(&env, &r, &["check", "--read-data"]).ok();
    // A damaged config: every command says so in one line.
    let r = env.path("case-config");
    copy_dir(&env.repo, &r);
    flip(&r.join("config"), 12);
    let c = lb_repo(&env, &r, &["snapshots"]);
    assert_ne!(c.code, 0);
    assert!(c.stderr.contains("config is corrupt"), "{}", c.stderr);
    assert_eq!(c.stderr.trim_end().lines().count(), 1);
}

fn mount_tmpfs(dir: &Path, size: &str) {
    fs::create_dir_all(dir).unwrap();
    let opts = std::ffi::CString::new(format!("size={size}")).unwrap();
    rustix::mount::mount(
        "tmpfs",
        dir,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        Some(opts.as_c_str()),
    )
    .unwrap();
}

fn resize_tmpfs(dir: &Path, size: &str) {
    let opts = std::ffi::CString::new(format!("size={size}")).unwrap();
    rustix::mount::mount_remount(dir, rustix::mount::MountFlags::empty(), opts.as_c_str()).unwrap();
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn full_repository_disk_keeps_the_volume_working_and_catches_up_later() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    mount_tmpfs(&env.repo, "3m");
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("small"), b"small").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("big"), noise(6 << 20, 7)).unwrap();
    let r = env.run(&[OsStr::new("snapshot"), os(&vol)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert!(
        r.stderr.contains("next `laybak snapshot` archives it"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    // The volume is mounted and writable; nothing earlier is damaged.
    fs::write(vol.join("after"), b"after").unwrap();
    env.lb(&["check", "--read-data"]).ok();
    let leftovers: Vec<_> = files_below(&env.repo)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    // Space comes back: the next run archives the pending layer too.
    resize_tmpfs(&env.repo, "64m");
    fs::write(vol.join("later"), b"later").unwrap();
    let want = listing(&vol);
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let snaps = snapshots(&env, &env.repo);
    assert_eq!(snaps.len(), 3, "attach + the pending layer + the new one");
    let t = env.path("t");
    env.lb(&["restore", "latest", t.to_str().unwrap()]).ok();
    assert_same("after the disk had room again", &want, &listing(&t));
    env.lb(&["check", "--read-data"]).ok();
}

#[test]
fn full_volume_filesystem_does_not_break_snapshots() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    mount_tmpfs(&vol, "4m");
    fs::write(vol.join("a"), b"a").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // Users fill the disk; their write fails, nothing else does.
    let err = fs::write(vol.join("huge"), noise(8 << 20, 3)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    let _ = fs::remove_file(vol.join("huge"));
    fs::write(vol.join("fits"), noise(1 << 20, 4)).unwrap();
    let want = listing(&vol);
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    assert_same(
        "volume after snapshot on a full-ish disk",
        &want,
        &listing(&vol),
    );
    let t = env.path("t");
    env.lb(&["restore", "latest", t.to_str().unwrap()]).ok();
    assert_same("restore", &want, &listing(&t));
}

#[test]
fn overlapping_cron_runs_never_rotate_one_volume_twice() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("x"), b"x").unwrap();
    // A process in the volume keeps the first run waiting in its unmount
    // loop (longer than the few seconds a second run waits for the lock).
    // A writer keeps the first run waiting (readers no longer would).
    let mut holder = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3>>held; exec sleep 6")
        .current_dir(&vol)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = env
        .cmd()
        .args(["snapshot", "--all", "--wait", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let second = env.lb(&["snapshot", "--all", "--wait", "10"]);
    second.fails(11, "another laybak");
    holder.wait().unwrap();
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshots(&env, &env.repo).len(), 2);
    // A crashed run's lock does not block the next one (flock dies with the
    // process). A change, so that the snapshot scans.
    fs::write(vol.join("y"), b"y").unwrap();
    let r = env.run_env(
        &[OsStr::new("snapshot"), os(&vol)],
        &[("LAYBAK_FAILPOINT", "scan")],
    );
    assert_ne!(r.code, 0);
    env.run(&[OsStr::new("up"), os(&vol)]).ok();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
}

#[test]
fn snapshot_of_one_volume_while_restoring_and_checking_another() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let _ = two_volumes(&env);
    env.run(&[OsStr::new("up"), os(&env.path("va"))]).ok();
    let bin = env!("CARGO_BIN_EXE_laybak");
    let mut restores = Vec::new();
    for i in 0..3 {
        let t = env.path(&format!("par-{i}"));
        restores.push(
            env.cmd()
                .args(["restore", "latest", "--volume", "vb"])
                .arg(&t)
                .spawn()
                .unwrap(),
        );
    }
    let check = env.cmd().args(["check", "--read-data"]).spawn().unwrap();
    for i in 0..5 {
        fs::write(env.path("va").join(format!("n{i}")), noise(300_000, i)).unwrap();
        env.run(&[OsStr::new("snapshot"), os(&env.path("va"))]).ok();
    }
    for mut r in restores {
        assert!(r.wait().unwrap().success());
    }
    let mut check = check;
    assert!(check.wait().unwrap().success());
    let _ = bin;
    env.lb(&["check", "--read-data"]).ok();
}

/// kill -9 of `snapshot` at random moments while a writer keeps changing
/// files: every write that succeeded is there afterwards, the repository
/// checks, every reported snapshot restores, the next snapshot succeeds.
fn kill_trials(trials: usize) {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, Vec<u8>>::new()));
    let writer = {
        let (stop, written, vol) = (stop.clone(), written.clone(), vol.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let name = format!("w{}", n % 50);
                let data = noise(1000 + (n as usize % 7) * 5000, n);
                // Only writes that fully succeeded count.
                if fs::write(vol.join(&name), &data).is_ok() {
                    written.lock().unwrap().insert(name, data);
                }
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut failures = Vec::new();
    let mut found_unmounted = 0;
    for trial in 0..trials {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = rng % 60_000;
        let mut child = env
            .cmd()
            .args(["snapshot", "--wait", "5"])
            .arg(&vol)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(delay));
        let _ = child.kill();
        child.wait().unwrap();
        if laybak::overlay::find_mount(&vol)
            .unwrap()
            .is_none_or(|m| m.fstype != "overlay")
        {
            found_unmounted += 1;
        }
        let up = env.run(&[OsStr::new("up"), os(&vol)]);
        if up.code != 0 {
            failures.push(format!("trial {trial}: up failed: {}", up.stderr));
        }
        if trial % 10 == 9 || trial + 1 == trials {
            // Pause the writer long enough to compare.
            let snapshot_of_writes = written.lock().unwrap().clone();
            for (name, data) in &snapshot_of_writes {
                match fs::read(vol.join(name)) {
                    Ok(d) if d == *data => {}
                    Ok(_) => {} // overwritten since; the newer write is in the map next time
                    Err(e) => failures.push(format!("trial {trial}: {name} lost: {e}")),
                }
            }
            let c = env.lb(&["check", "--read-data"]);
            if c.code != 0 {
                failures.push(format!("trial {trial}: check: {}", c.stderr));
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let final_writes = written.lock().unwrap().clone();
    for (name, data) in &final_writes {
        if fs::read(vol.join(name)).ok().as_ref() != Some(data) {
            failures.push(format!("final: {name} lost or wrong"));
        }
    }
    let want = listing(&vol);
    let last = env.run(&[OsStr::new("snapshot"), os(&vol)]);
    if last.code != 0 {
        failures.push(format!("final snapshot failed: {}", last.stderr));
    }
    let t = env.path("final");
    env.lb(&["restore", "latest", t.to_str().unwrap()]).ok();
    assert_same("final snapshot", &want, &listing(&t));
    for (i, (id, _, _)) in snapshots(&env, &env.repo).iter().enumerate() {
        let t = env.path(&format!("r{i}"));
        let r = env.lb(&["restore", id, t.to_str().unwrap()]);
        if r.code != 0 {
            failures.push(format!("snapshot {id} does not restore: {}", r.stderr));
        }
    }
    let pending: usize = fs::read_dir(env.state.join("volumes"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    // vol.json and vol.lock; temp files of killed runs are cleaned up.
    if pending > 2 {
        failures.push(format!("{pending} files left in the state dir"));
    }
    eprintln!(
        "{trials} kill -9 trials ({found_unmounted} left the volume unmounted for `up` to repair, {} snapshots recorded, {pending} files in the state dir), {} failures",
        snapshots(&env, &env.repo).len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kill_snapshot_at_random_moments_under_a_writer() {
    let n = std::env::var("LAYBAK_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    kill_trials(n);
}

#[test]
fn kill_restore_at_random_moments() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    for i in 0..40 {
        fs::write(
            vol.join(format!("f{i}")),
            noise(100_000 + i * 3000, i as u64),
        )
        .unwrap();
    }
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let want = listing(&vol);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let trials = 25;
    let mut interrupted = 0;
    for trial in 0..trials {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let t = env.path(&format!("t{trial}"));
        let mut cmd = env.cmd();
        cmd.args(["restore", "latest"]).arg(&t);
        if trial % 5 == 0 {
            cmd.env("LAYBAK_FAILPOINT", "restore-structure");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(rng % 30_000));
        let _ = child.kill();
        if !child.wait().unwrap().success() {
            interrupted += 1;
        }
        // The repository is untouched; a fresh restore is complete.
        env.lb(&["check"]).ok();
        let again = env.path(&format!("again{trial}"));
        env.lb(&["restore", "latest", again.to_str().unwrap()]).ok();
        assert_same("restore after a killed restore", &want, &listing(&again));
        let _ = fs::remove_dir_all(&again);
    }
    eprintln!("{trials} restore kill trials, {interrupted} interrupted, 0 failures");
    assert!(interrupted > 0);
    env.lb(&["check", "--read-data"]).ok();
}
