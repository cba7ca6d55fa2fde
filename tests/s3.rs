//! Repositories on real S3 stores (a 3-node Garage cluster and Ceph RGW on
//! loopback, started by `.ci/s3_up.sh`): one backend contract for every
//! store and the local directory, the whole command set on Garage, bad
//! input, nodes going down, and several hosts sharing one repository.

mod common;
use common::s3::{self, Store};
use common::*;
use laybak::backend::{Backend, Created, ErrorKind, LocalBackend};
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

fn contract(name: &str, b: &dyn Backend) {
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    b.put("packs/ab/one", b"hello world").unwrap();
    b.put("packs/cd/two", &big).unwrap();
    b.put("snapshots/x", b"1").unwrap();
    assert_eq!(b.get("packs/ab/one").unwrap(), b"hello world", "{name}");
    assert_eq!(b.get("packs/cd/two").unwrap(), big, "{name}");
    assert_eq!(
        b.get_range("packs/ab/one", 6, 5).unwrap(),
        b"world",
        "{name}"
    );
    assert_eq!(
        b.get_range("packs/cd/two", 5_000_000, 7).unwrap(),
        &big[5_000_000..5_000_007],
        "{name}"
    );
    assert!(
        b.get_range("packs/ab/one", 6, 6).is_err(),
        "{name}: short range"
    );
    let e = b.get("packs/ab/none").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{name}: {e}");
    let listed: Vec<(String, u64)> = b
        .list("packs")
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.size))
        .collect();
    assert_eq!(
        listed,
        vec![("ab/one".into(), 11), ("cd/two".into(), big.len() as u64)],
        "{name}"
    );
    // A listed prefix is a directory: `snapshots` does not list `snapshotsx`.
    b.put("snapshotsx/y", b"2").unwrap();
    assert_eq!(b.list("snapshots").unwrap().len(), 1, "{name}");
    assert!(b.list("nothing").unwrap().is_empty(), "{name}");
    assert!(b.exists("snapshots/x").unwrap(), "{name}");
    assert!(!b.exists("snapshots/y").unwrap(), "{name}");
    // Sequential create-if-absent is honoured everywhere (racing ones only
    // where atomic_create says so).
    assert_eq!(
        b.put_if_absent("locks/a", b"1").unwrap(),
        Created::Yes,
        "{name}"
    );
    assert_eq!(
        b.put_if_absent("locks/a", b"2").unwrap(),
        Created::Existed,
        "{name}"
    );
    assert_eq!(b.get("locks/a").unwrap(), b"1", "{name}");
    // Overwrite is atomic and visible at once.
    b.put("snapshots/x", b"rewritten").unwrap();
    assert_eq!(b.get("snapshots/x").unwrap(), b"rewritten", "{name}");
    // Many writers at once.
    std::thread::scope(|s| {
        for t in 0..16 {
            s.spawn(move || {
                let d = vec![t as u8; 100_000 + t];
                b.put(&format!("index/p{t:02}"), &d).unwrap();
                assert_eq!(b.get(&format!("index/p{t:02}")).unwrap(), d);
            });
        }
    });
    assert_eq!(b.list("index").unwrap().len(), 16, "{name}");
    b.delete("snapshots/x").unwrap();
    b.delete("snapshots/x").unwrap();
    assert!(!b.exists("snapshots/x").unwrap(), "{name}");
    assert!(b.get("../etc/passwd").is_err(), "{name}");
}

#[test]
fn backend_contract_holds_on_local_garage_and_ceph() {
    let d = tempfile::tempdir().unwrap();
    contract("local", &LocalBackend::new(d.path()));
    for st in s3::stores() {
        let t = Instant::now();
        contract(&st.name, &st.backend(&s3::unique("contract")));
        eprintln!("{}: contract in {:?}", st.name, t.elapsed());
        // A missing bucket is never "absent": not for a read, a lookup or
        // a delete.
        let mut cfg = st.config("x");
        cfg.bucket = s3::unique("no-such-bucket");
        let gone = laybak::backend::s3::S3Backend::new(&cfg).unwrap();
        let name = &st.name;
        assert_ne!(
            gone.get("config").unwrap_err().kind(),
            ErrorKind::NotFound,
            "{name}"
        );
        assert!(
            gone.exists("config").is_err(),
            "{name}: exists in a missing bucket"
        );
        assert!(
            gone.delete("config").is_err(),
            "{name}: delete in a missing bucket"
        );
        assert!(
            gone.list("snapshots").is_err(),
            "{name}: list in a missing bucket"
        );
    }
}

fn garage() -> Option<Store> {
    s3::store("garage")
}

fn write_files(dir: &Path, round: u32) {
    fs::create_dir_all(dir.join("sub/deep")).unwrap();
    for i in 0..20u32 {
        let data: Vec<u8> = (0..(3000 * (i + 1)))
            .map(|j| (j * 31 + i + round) as u8)
            .collect();
        fs::write(dir.join(format!("sub/f{i}")), data).unwrap();
    }
    fs::write(dir.join(format!("round-{round}")), round.to_string()).unwrap();
    fs::write(
        dir.join("sub/deep/log"),
        format!("line {round}\n").repeat(round as usize + 1),
    )
    .unwrap();
}

fn restore_to(env: &Env, id: &str, target: &Path, extra: &[(&str, &str)]) -> Run {
    env.run_env(&[OsStr::new("restore"), OsStr::new(id), os(target)], extra)
}

#[test]
fn every_command_works_on_an_s3_repository() {
    if !need_root() {
        return;
    }
    let Some(st) = garage() else { return };
    let env = Env::on(&st, "commands");
    env.init();
    // A second init refuses, one line.
    env.lb(&["init"]).fails(1, "already a laybak repository");
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    write_files(&vol, 0);
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let mut trees = vec![listing(&vol)];
    for round in 1..=3 {
        write_files(&vol, round);
        fs::remove_file(vol.join(format!("round-{}", round - 1))).unwrap();
        env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
        trees.push(listing(&vol));
    }
    let ids = env.snapshot_ids();
    assert_eq!(ids.len(), 4);
    // Restore every snapshot from the repository alone (no local state).
    let empty_state = env.path("no-state");
    for (id, want) in ids.iter().zip(&trees) {
        let target = env.path(&format!("r-{id}"));
        restore_to(
            &env,
            id,
            &target,
            &[("LAYBAK_STATE_DIR", empty_state.to_str().unwrap())],
        )
        .ok();
        assert_same(&format!("restore of {id}"), want, &listing(&target));
    }
    let d = env.lb(&["diff", &ids[0], &ids[3]]).ok();
    assert!(d.stdout.contains("round-3"), "{}", d.stdout);
    // A historical mount from the repository (not the local store).
    let mnt = env.path("mnt");
    env.run_env(
        &[OsStr::new("mount"), OsStr::new(&ids[1]), os(&mnt)],
        &[("LAYBAK_STATE_DIR", empty_state.to_str().unwrap())],
    )
    .ok();
    assert_same("mount", &trees[1], &listing(&mnt));
    env.run_env(
        &[OsStr::new("umount"), os(&mnt)],
        &[("LAYBAK_STATE_DIR", empty_state.to_str().unwrap())],
    )
    .ok();
    env.lb(&["check", "--read-data"]).ok();
    env.lb(&["forget", "--keep-last", "2", "--prune"]).ok();
    let left = env.snapshot_ids();
    assert_eq!(left, ids[2..].to_vec());
    env.lb(&["repair", "index"]).ok();
    env.lb(&["check", "--read-data"]).ok();
    for (id, want) in left.iter().zip(&trees[2..]) {
        let target = env.path(&format!("again-{id}"));
        restore_to(&env, id, &target, &[]).ok();
        assert_same(
            &format!("restore of {id} after forget"),
            want,
            &listing(&target),
        );
    }
    env.lb(&["squash", "--volume", "vol", "--until", &left[1]])
        .ok();
    env.lb(&["prune"]).ok();
    env.lb(&["check", "--read-data"]).ok();
    // The volume keeps working on top of the repository.
    fs::write(vol.join("after"), b"x").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let target = env.path("last");
    restore_to(&env, "latest", &target, &[]).ok();
    assert_same("latest", &listing(&vol), &listing(&target));
}

#[test]
fn bad_s3_input_fails_in_one_line_and_changes_nothing() {
    for st in s3::stores()
        .into_iter()
        .filter(|s| s.name != "garage-faults")
    {
        let t = Instant::now();
        let prefix = s3::unique("bad");
        let env = Env::on(&st, "bad");
        env.init();
        let quick = [("LAYBAK_RETRY_SECS", "1")];
        let run = |vars: &[(&str, &str)], args: &[&str]| {
            let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
            let mut v: Vec<(&str, &str)> = quick.to_vec();
            v.extend_from_slice(vars);
            env.run_env(&a, &v)
        };
        let name = st.name.as_str();
        run(&[("AWS_SECRET_ACCESS_KEY", "wrong")], &["snapshots"]).fails(1, "check the access key");
        run(
            &[("AWS_ACCESS_KEY_ID", "GK000000000000000000000000")],
            &["snapshots"],
        )
        .fails(1, "HTTP 403");
        let missing = format!("s3://no-such-bucket-{prefix}/x");
        let r = run(&[], &["--repo", &missing, "snapshots"]);
        assert_ne!(r.code, 0, "{name}");
        assert!(
            r.stderr.contains("not a laybak repository") || r.stderr.contains("bucket"),
            "{name}: {}",
            r.stderr
        );
        let r = run(&[], &["--repo", &missing, "init"]);
        assert_ne!(r.code, 0, "{name}: init into a missing bucket");
        assert!(
            r.stderr.contains("NoSuchBucket") || r.stderr.contains("HTTP 40"),
            "{name}: {}",
            r.stderr
        );
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{name}: {}",
            r.stderr
        );
        run(
            &[("AWS_ENDPOINT_URL", "http://127.0.0.1:1")],
            &["snapshots"],
        )
        .fails(13, "127.0.0.1:1");
        // A prefix holding something that is not a laybak repository.
        let other = st.backend(&prefix);
        other.put("notes.txt", b"mine").unwrap();
        let loc = st.location(&prefix);
        run(&[], &["--repo", &loc, "snapshots"]).fails(10, "not a laybak repository");
        run(&[], &["--repo", &loc, "init"]).fails(1, "is not empty");
        assert_eq!(other.get("notes.txt").unwrap(), b"mine");
        assert!(
            !other.exists("config").unwrap(),
            "{name}: init wrote into a foreign prefix"
        );
        // The repository itself is unchanged by all of this.
        env.lb(&["check"]).ok();
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{name}: {:?}",
            t.elapsed()
        );
    }
}

/// Starts the nodes it stopped again, even when the test fails.
struct Stopped<'a>(&'a Store, Vec<usize>);

impl Stopped<'_> {
    fn stop(&mut self, i: usize) {
        self.0.stop_node(i);
        self.1.push(i);
    }
    fn start_all(&mut self) {
        for i in self.1.drain(..) {
            self.0.start_node(i);
        }
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.start_all();
    }
}

#[test]
fn garage_nodes_going_down_lose_nothing() {
    if !need_root() {
        return;
    }
    let Some(st) = s3::store("garage-faults") else {
        return;
    };
    let env = Env::on(&st, "faults");
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    write_files(&vol, 0);
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let snap = |secs: &str| {
        env.run_env(
            &[OsStr::new("snapshot"), os(&vol)],
            &[("LAYBAK_RETRY_SECS", secs)],
        )
    };
    let mut nodes = Stopped(&st, Vec::new());
    // One of three down: a quorum of two remains; everything works.
    nodes.stop(2);
    let mut trees = vec![listing(&vol)];
    for round in 1..=3 {
        write_files(&vol, round);
        snap("60").ok();
        trees.push(listing(&vol));
    }
    let t = env.path("one-down");
    restore_to(&env, "latest", &t, &[]).ok();
    assert_same(
        "restore with a node down",
        trees.last().unwrap(),
        &listing(&t),
    );
    // Two down: no quorum. One line, exit 13, the layer stays pending, and
    // the volume stays mounted and writable.
    nodes.stop(1);
    write_files(&vol, 4);
    let pending = listing(&vol);
    snap("3").fails(13, "the next `laybak snapshot` archives it");
    fs::write(vol.join("while-down"), b"still writable").unwrap();
    let want = listing(&vol);
    // Back up: the next snapshot rides out the cluster's recovery and
    // archives the pending layer, then the new one.
    nodes.start_all();
    let r = snap("180").ok();
    assert!(!r.stdout.trim().is_empty());
    let ids = env.snapshot_ids();
    assert_eq!(
        ids.len(),
        6,
        "attach, three rounds, the pending layer, the new one"
    );
    for (id, tree, what) in [
        (&ids[4], &pending, "the pending layer"),
        (&ids[5], &want, "the newest"),
    ] {
        let t = env.path(&format!("after-{id}"));
        restore_to(&env, id, &t, &[]).ok();
        assert_same(what, tree, &listing(&t));
    }
    env.lb(&["check", "--read-data"]).ok();
}

#[test]
fn hosts_share_one_repository_while_another_forgets_and_prunes() {
    if !need_root() {
        return;
    }
    let Some(st) = garage() else { return };
    let mut a = Env::on(&st, "hosts");
    a.host = Some("lbt-host-a".into());
    let other = |name: &str| {
        let mut e = Env::new();
        e.repo = a.repo.clone();
        e.vars = st.vars.clone();
        e.host = Some(name.into());
        e
    };
    let (b, c) = (other("lbt-host-b"), other("lbt-host-c"));
    a.init();
    const ROUNDS: u32 = 5;
    // The same volume name on both hosts: two histories.
    let hosts = [&a, &b];
    for e in hosts {
        let vol = e.path("data");
        fs::create_dir(&vol).unwrap();
        write_files(&vol, 0);
        e.run(&[OsStr::new("attach"), os(&vol)]).ok();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let (results, prunes) = std::thread::scope(|s| {
        let workers: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(h, e)| {
                let e = *e;
                s.spawn(move || {
                    let vol = e.path("data");
                    let mut out = Vec::new();
                    for round in 1..=ROUNDS {
                        write_files(&vol, round * 10 + h as u32);
                        let r = e.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
                        out.push((r.stdout.trim().to_string(), listing(&vol)));
                    }
                    out
                })
            })
            .collect();
        let pruner = s.spawn(|| {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                c.lb(&["forget", "--keep-last", "2", "--prune"]).ok();
                n += 1;
            }
            n
        });
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (results, pruner.join().unwrap())
    });
    assert!(prunes >= 1, "forget --prune never ran");
    c.lb(&["check", "--read-data"]).ok();
    c.lb(&["forget", "--keep-last", "2", "--prune"]).ok();
    c.lb(&["check", "--read-data"]).ok();
    let snaps = c.snapshots_json();
    for (h, name) in ["lbt-host-a", "lbt-host-b"].iter().enumerate() {
        let mine: Vec<&str> = snaps
            .iter()
            .filter(|s| s["hostname"] == *name)
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        let want: Vec<&str> = results[h][ROUNDS as usize - 2..]
            .iter()
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(mine, want, "{name} keeps its own newest two");
        for (id, tree) in &results[h][ROUNDS as usize - 2..] {
            let t = c.path(&format!("r-{id}"));
            restore_to(&c, id, &t, &[]).ok();
            assert_same(&format!("{name} {id}"), tree, &listing(&t));
        }
    }
    eprintln!("{prunes} forget --prune runs next to the snapshots");
}
