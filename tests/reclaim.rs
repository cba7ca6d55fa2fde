//! forget / squash / prune on real repositories written by real volumes.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

type Listing = BTreeMap<Vec<u8>, Rec>;

fn repo_bytes(d: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        if md.is_dir() {
            n += repo_bytes(&e.path());
        } else {
            n += md.len();
        }
    }
    n
}

fn snapshot(env: &Env, vol: &Path) -> String {
    env.run(&[OsStr::new("snapshot"), os(vol)])
        .ok()
        .stdout
        .trim()
        .to_string()
}

fn ids(env: &Env, repo: &Path) -> Vec<String> {
    let out = env
        .cmd()
        .arg("--repo")
        .arg(repo)
        .args(["snapshots", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn restore(env: &Env, repo: &Path, id: &str, target: &Path) -> Run {
    let a: Vec<&OsStr> = vec![
        OsStr::new("--repo"),
        os(repo),
        OsStr::new("restore"),
        OsStr::new(id),
        os(target),
    ];
    env.run(&a)
}

/// A volume with `n` snapshots of varied changes; returns (ids, restored listings).
fn history(env: &Env, n: usize) -> (PathBuf, Vec<String>, Vec<Listing>) {
    env.init();
    let vol = env.path("vol");
    fs::create_dir_all(vol.join("d/e")).unwrap();
    fs::write(vol.join("d/e/f"), vec![1u8; 300_000]).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let noise: Vec<u8> = (0..1_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(vol.join("big"), noise).unwrap();
    let mut ids = vec![
        env.run(&[OsStr::new("attach"), os(&vol)])
            .ok()
            .stdout
            .trim()
            .to_string(),
    ];
    for i in 1..n {
        let mut big = fs::read(vol.join("big")).unwrap();
        for b in big.iter_mut().skip(i * 997).step_by(400_000) {
            *b = b.wrapping_add(i as u8 | 1);
        }
        fs::write(vol.join("big"), &big).unwrap();
        fs::write(vol.join(format!("f{i}")), format!("file {i}").repeat(1000)).unwrap();
        if i >= 2 {
            fs::remove_file(vol.join(format!("f{}", i - 2))).unwrap_or(());
        }
        match i % 3 {
            0 => {
                fs::remove_dir_all(vol.join("d")).unwrap();
                fs::create_dir(vol.join("d")).unwrap();
                fs::write(vol.join("d/new"), format!("{i}")).unwrap();
            }
            1 => fs::write(vol.join("d/x"), format!("x{i}").repeat(50_000)).unwrap(),
            _ => {
                let _ = fs::remove_file(vol.join("d/x"));
            }
        }
        ids.push(snapshot(env, &vol));
    }
    let mut views = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let t = env.path(&format!("base-{i}"));
        restore(env, &env.repo, id, &t).ok();
        views.push(listing(&t));
    }
    (vol, ids, views)
}

#[test]
fn forget_and_prune_keep_every_kept_point_and_free_what_the_dry_run_said() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let (vol, ids, views) = history(&env, 8);
    let before = repo_bytes(&env.repo);
    let dry = env
        .lb(&[
            "forget",
            "--keep-last",
            "3",
            "--prune",
            "--dry-run",
            "--json",
        ])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&dry).unwrap();
    let announced = (v["prune"]["bytes_freed"].as_i64().unwrap()
        + v["forget"]["bytes_freed"].as_i64().unwrap()) as u64;
    assert!(announced > 10_000, "{dry}");
    assert_eq!(
        repo_bytes(&env.repo),
        before,
        "dry run changed the repository"
    );
    assert_eq!(ids_of(&env, &env.repo), ids, "dry run forgot something");
    env.lb(&["forget", "--keep-last", "3", "--prune"]).ok();
    assert_eq!(
        repo_bytes(&env.repo),
        before - announced,
        "freed differs from the dry run"
    );
    assert_eq!(
        ids_of(&env, &env.repo),
        ids[5..].to_vec(),
        "kept snapshots keep their ids"
    );
    for (i, id) in ids.iter().enumerate() {
        let t = env.path(&format!("after-{i}"));
        let r = restore(&env, &env.repo, id, &t);
        if i < 5 {
            r.fails(1, "no snapshot matches");
        } else {
            r.ok();
            assert_same(&format!("kept snapshot {i}"), &views[i], &listing(&t));
        }
    }
    env.lb(&["check", "--read-data"]).ok();
    // Life goes on: a new snapshot on top of the squashed chain.
    fs::write(vol.join("after"), b"after").unwrap();
    let want = listing(&vol);
    let id = snapshot(&env, &vol);
    let t = env.path("newest");
    restore(&env, &env.repo, &id, &t).ok();
    assert_same("snapshot after forget", &want, &listing(&t));
    // A second prune finds nothing more to do.
    let again = env.lb(&["prune", "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(v["bytes_freed"], 0, "{again}");
}

#[test]
fn squash_until_folds_the_prefix() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let (_vol, ids, views) = history(&env, 6);
    let r = env
        .lb(&["squash", "--volume", "vol", "--until", &ids[3][..12]])
        .ok();
    assert!(r.stdout.contains("3 removed"), "{}", r.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&env.lb(&["snapshots", "--json"]).ok().stdout).unwrap();
    assert_eq!(
        v[0]["layers"].as_array().unwrap().len(),
        1,
        "SNAP is one base layer now"
    );
    for (i, id) in ids.iter().enumerate().skip(3) {
        let t = env.path(&format!("s{i}"));
        restore(&env, &env.repo, id, &t).ok();
        assert_same("after squash", &views[i], &listing(&t));
    }
    env.lb(&["prune"]).ok();
    env.lb(&["check", "--read-data"]).ok();
}

#[test]
fn snapshot_applies_the_volume_policy() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let r = env.run(&[OsStr::new("snapshot"), os(&vol), OsStr::new("--forget")]);
    r.fails(1, "no retention policy");
    env.run(&[
        OsStr::new("policy"),
        os(&vol),
        OsStr::new("--keep-last"),
        OsStr::new("2"),
    ])
    .ok();
    for i in 0..4 {
        fs::write(vol.join("f"), vec![i as u8; 400_000]).unwrap();
        env.run(&[
            OsStr::new("snapshot"),
            os(&vol),
            OsStr::new("--forget"),
            OsStr::new("--prune"),
        ])
        .ok();
    }
    assert_eq!(ids(&env, &env.repo).len(), 2);
    env.lb(&["check", "--read-data"]).ok();
    let t = env.path("t");
    env.lb(&["restore", "latest", t.to_str().unwrap()]).ok();
    assert_eq!(fs::read(t.join("f")).unwrap(), vec![3u8; 400_000]);
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Crash forget+prune at every failpoint and at random moments: the
/// repository stays valid, kept snapshots restore, a rerun finishes.
fn crash_trials(trials: usize) {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let (vol, ids, views) = history(&env, 7);
    env.run(&[OsStr::new("down"), os(&vol)]).ok();
    let points = [
        "forget-layer",
        "forget-plan",
        "forget-rewrite",
        "forget-delete",
        "prune-pack",
        "prune-index",
        "prune-old-index",
        "prune-layer",
        "prune-delete-pack",
    ];
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut failures = Vec::new();
    for trial in 0..trials {
        let repo = env.path(&format!("trial-{trial}"));
        copy_dir(&env.repo, &repo);
        let mut cmd = env.cmd();
        cmd.arg("--repo").arg(&repo).args([
            "forget",
            "--keep-last",
            "2",
            "--keep-tag",
            "none",
            "--prune",
            "--max-unused",
            "0%",
        ]);
        let how = if trial < points.len() {
            cmd.env("LAYBAK_FAILPOINT", points[trial]);
            let out = cmd.output().unwrap();
            assert!(
                !out.status.success(),
                "failpoint {} not reached",
                points[trial]
            );
            format!("abort at {}", points[trial])
        } else {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let mut child = cmd.spawn().unwrap();
            let us = rng.below(40_000);
            std::thread::sleep(std::time::Duration::from_micros(us));
            let _ = child.kill();
            child.wait().unwrap();
            format!("kill -9 after {us} µs")
        };
        let run = |args: &[&str]| {
            let mut a: Vec<&OsStr> = vec![OsStr::new("--repo"), os(&repo)];
            a.extend(args.iter().map(OsStr::new));
            env.run(&a)
        };
        let check = run(&["check", "--read-data"]);
        if check.code != 0 {
            failures.push(format!(
                "trial {trial} ({how}): check failed: {}",
                check.stderr
            ));
            continue;
        }
        for i in 5..7 {
            let t = env.path(&format!("trial-{trial}-r{i}"));
            let r = restore(&env, &repo, &ids[i], &t);
            if r.code != 0 || listing(&t) != views[i] {
                failures.push(format!(
                    "trial {trial} ({how}): snapshot {i} does not restore identically: {}",
                    r.stderr
                ));
            }
        }
        let again = run(&[
            "forget",
            "--keep-last",
            "2",
            "--prune",
            "--max-unused",
            "0%",
        ]);
        if again.code != 0 {
            failures.push(format!(
                "trial {trial} ({how}): rerun failed: {}",
                again.stderr
            ));
            continue;
        }
        if ids_of(&env, &repo) != ids[5..].to_vec() {
            failures.push(format!(
                "trial {trial} ({how}): rerun left {:?}",
                ids_of(&env, &repo)
            ));
        }
        let c = run(&["check", "--read-data"]);
        if c.code != 0 {
            failures.push(format!(
                "trial {trial} ({how}): check after rerun failed: {}",
                c.stderr
            ));
        }
        let _ = fs::remove_dir_all(&repo);
    }
    eprintln!("{trials} crash trials, {} failures", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn ids_of(env: &Env, repo: &Path) -> Vec<String> {
    ids(env, repo)
}

#[test]
fn forget_and_prune_survive_crashes_at_any_moment() {
    let n = std::env::var("LAYBAK_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    crash_trials(n);
}

#[test]
fn snapshots_during_prune_lose_nothing() {
    snapshots_during_prune(None);
}

/// The same with manifests cut into pages of three entries: pages written
/// while prunes run are kept. (The exact interleaving where a prune reads
/// a new layer's pages through an index it loaded before is pinned down by
/// a unit test in `reclaim`.)
#[test]
fn snapshots_with_paged_manifests_during_prune_lose_nothing() {
    snapshots_during_prune(Some("3"));
}

fn snapshots_during_prune(page_entries: Option<&str>) {
    if !need_root() {
        return;
    }
    let mut env = Env::new();
    if let Some(n) = page_entries {
        env.vars.push(("LAYBAK_PAGE_ENTRIES".into(), n.into()));
    }
    let vars = env.vars.clone();
    let (vol, _ids, _views) = history(&env, 3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruner = {
        let stop = stop.clone();
        let mut cmd_repo = env.repo.clone();
        cmd_repo.push("");
        let bin = env!("CARGO_BIN_EXE_laybak");
        let state = env.state.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(bin)
                    .envs(vars.iter().map(|(k, v)| (k, v)))
                    .env("LAYBAK_REPO", &cmd_repo)
                    .env("LAYBAK_STATE_DIR", &state)
                    .env("LAYBAK_PASSWORD", common::PASSWORD)
                    .args([
                        "forget",
                        "--keep-last",
                        "2",
                        "--prune",
                        "--max-unused",
                        "0%",
                    ])
                    .output()
                    .unwrap();
                let code = out.status.code();
                assert!(
                    code == Some(0) || code == Some(11),
                    "prune: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    let mut want = Vec::new();
    for i in 0..12 {
        fs::write(vol.join(format!("w{i}")), vec![i as u8; 200_000 + i * 1000]).unwrap();
        want.push((listing(&vol), snapshot(&env, &vol)));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = pruner.join().unwrap();
    assert!(runs > 0);
    env.lb(&["check", "--read-data"]).ok();
    // The last two are kept whatever the interleaving; they restore exactly.
    for (i, (view, id)) in want.iter().enumerate().skip(10) {
        let t = env.path(&format!("r{i}"));
        restore(&env, &env.repo, id, &t).ok();
        assert_same("snapshot taken during prune", view, &listing(&t));
    }
}

#[test]
fn after_forget_historical_mounts_still_use_local_layers() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let (_vol, ids, views) = history(&env, 6);
    env.lb(&["forget", "--keep-last", "3"]).ok();
    for (i, id) in ids.iter().enumerate().skip(3) {
        let m = env.path(&format!("m{i}"));
        env.lb(&["mount", id, m.to_str().unwrap()]).ok();
        let info = laybak::overlay::find_mount(&m).unwrap().unwrap();
        let opts = format!("{} {}", info.source, info.super_options);
        assert!(
            !opts.contains("/cache/"),
            "snapshot {i} mounted from the cache: {opts}"
        );
        let mut got = listing(&m);
        let mut want = views[i].clone();
        got.remove(&Vec::new());
        want.remove(&Vec::new());
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "snapshot {i}"
        );
        for (k, w) in &want {
            assert_eq!(
                (w.content, w.mode, w.mtime),
                (got[k].content, got[k].mode, got[k].mtime),
                "snapshot {i} {k:?}"
            );
        }
        env.lb(&["umount", m.to_str().unwrap()]).ok();
    }
}
