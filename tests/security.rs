//! The trust boundary: unprivileged users of a volume (and anyone who can
//! write a restore or mount target) must never steer root's laybak. Each
//! test runs the real binary as root against a real unprivileged account
//! (`useradd`, `setpriv`) that attacks as the security review did, asserts
//! the safe outcome, and asserts that the attack really ran.
//!
//! Races are bounded so CI stays fast; `LAYBAK_RACE_TRIALS=N` runs more.

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const ALICE: &str = "lbt-alice";

fn trials(default: usize) -> usize {
    std::env::var("LAYBAK_RACE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An environment whose temp dir other users can traverse, plus alice's
/// own writable directory in it.
fn setup() -> (Env, (u32, u32), PathBuf) {
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let alice = test_user(ALICE);
    let home = env.path("alice");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(alice.0), Some(alice.1)).unwrap();
    (env, alice, home)
}

/// A Python attacker running as `user` until `stop` exists; it prints the
/// number of loop iterations it ran when it stops.
struct Attacker {
    child: Child,
    stop: PathBuf,
}

impl Attacker {
    fn start(user: (u32, u32), stop: &Path, body: &str, args: &[&OsStr]) -> Attacker {
        let script = format!(
            "import os, sys, ctypes\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             def exchange(a, b):\n    return libc.renameat2(-100, a.encode(), -100, b.encode(), 2)\n\
             stop = sys.argv[1]\n\
             n = 0\n\
             while not os.path.exists(stop):\n    n += 1\n{}\n\
             print(n)\n",
            body.lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let child = as_user(user, "/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(stop)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start attacker");
        // Let it get going before the victim starts.
        std::thread::sleep(std::time::Duration::from_millis(50));
        Attacker {
            child,
            stop: stop.to_path_buf(),
        }
    }

    /// Stop it and return how many iterations it ran.
    fn finish(mut self) -> u64 {
        fs::write(&self.stop, b"").unwrap();
        let child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "attacker failed");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("attacker count")
    }
}

impl Drop for Attacker {
    // A failing test must not leave its attacker looping.
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn every_file_below(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// A volume holding what an attacker wants: a setuid-root program, a
/// root-only secret, a device node.
fn valuable_volume(env: &Env) -> PathBuf {
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("suid"), b"#!/bin/sh\necho root\n").unwrap();
    fs::set_permissions(vol.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    // The same, created first by a restore, with many files after it: the
    // window in which an old restore reopened it by name.
    fs::write(vol.join("0suid"), b"#!/bin/sh\necho root\n").unwrap();
    fs::set_permissions(vol.join("0suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    for i in 0..300 {
        fs::write(vol.join(format!("f{i:03}")), b"filler").unwrap();
    }
    fs::write(vol.join("secret"), b"TOPSECRET").unwrap();
    fs::set_permissions(vol.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(vol.join("d")).unwrap();
    fs::write(vol.join("d/f"), b"data").unwrap();
    let st = Command::new("mknod")
        .arg(vol.join("null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success());
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    vol
}

#[test]
fn state_layers_and_repository_are_root_only_and_old_installs_are_tightened() {
    if !need_root() {
        return;
    }
    let (env, alice, home) = setup();
    let vol = valuable_volume(&env);
    // Modes.
    assert_eq!(mode(&env.state), 0o700);
    for d in ["volumes", "backing"] {
        assert_eq!(mode(&env.state.join(d)), 0o700, "{d}");
    }
    let store = env.state.join("backing/vol/.laybak");
    assert_eq!(mode(&store), 0o700);
    assert_eq!(fs::metadata(&store).unwrap().uid(), 0);
    for p in every_file_below(&env.repo) {
        let m = fs::symlink_metadata(&p).unwrap();
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.mode() & 0o777, want, "{}", p.display());
    }
    assert_eq!(mode(&env.repo), 0o700);
    // Alice reaches none of it, and cannot restore root's data with a
    // state dir of her own.
    for p in [
        env.state.join("backing/vol/.laybak/l/1"),
        env.repo.join("config"),
        env.repo.join("snapshots"),
    ] {
        let o = as_user(alice, "ls").arg(&p).output().unwrap();
        assert!(!o.status.success(), "alice listed {}", p.display());
    }
    let out = home.join("stolen");
    let o = as_user(alice, env!("CARGO_BIN_EXE_laybak"))
        .arg("--repo")
        .arg(&env.repo)
        .arg("--state-dir")
        .arg(home.join("state"))
        .args(["restore", "latest"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.join("secret").exists());
    // While the volume is down its store is visible at the volume path,
    // and still root's alone.
    env.run(&[OsStr::new("down"), os(&vol)]).ok();
    let o = as_user(alice, "ls")
        .arg(vol.join(".laybak"))
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "alice listed the store of a down volume"
    );
    env.run(&[OsStr::new("up"), os(&vol)]).ok();
    // An install from before: world-readable everything. The next run
    // tightens it.
    for (p, m) in [
        (env.state.clone(), 0o755),
        (env.state.join("backing"), 0o755),
        (store.clone(), 0o755),
        (env.repo.clone(), 0o755),
        (env.repo.join("config"), 0o644),
        (env.repo.join("snapshots"), 0o755),
    ] {
        fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
    }
    env.lb(&["snapshots"]).ok();
    assert_eq!(mode(&env.state), 0o700);
    assert_eq!(mode(&env.state.join("backing")), 0o700);
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&env.repo), 0o700);
    assert_eq!(mode(&env.repo.join("config")), 0o600);
    assert_eq!(mode(&env.repo.join("snapshots")), 0o700);
}

#[test]
fn restore_into_a_users_directory_gives_them_neither_root_nor_root_files() {
    if !need_root() {
        return;
    }
    let (env, alice, home) = setup();
    valuable_volume(&env);
    let payload = home.join("payload");
    fs::write(&payload, b"PAYLOAD-PAYLOAD-PAYLOAD").unwrap();
    std::os::unix::fs::chown(&payload, Some(alice.0), Some(alice.1)).unwrap();
    for trial in 0..trials(3) {
        let target = home.join(format!("r{trial}"));
        let st = as_user(alice, "mkdir").arg(&target).status().unwrap();
        assert!(st.success());
        // The attack of the review: replace restored names by hard links
        // to her own file, so root writes data, owner and mode into it.
        let attacker = Attacker::start(
            alice,
            &home.join(format!("stop{trial}")),
            "for name in ('0suid', 'secret'):\n    \
                 p = os.path.join(sys.argv[2], name)\n    \
                 try:\n        st = os.lstat(p)\n    except OSError:\n        continue\n    \
                 if st.st_uid == 0 and st.st_nlink == 1:\n        \
                     try:\n            os.unlink(p)\n            os.link(sys.argv[3], p)\n        except OSError:\n            pass",
            &[os(&target), os(&payload)],
        );
        let r = env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&target)]);
        let ran = attacker.finish();
        assert!(ran > 0, "the attacker never ran");
        let pm = fs::metadata(&payload).unwrap();
        assert_eq!(pm.uid(), alice.0, "root chowned alice's file");
        assert_eq!(pm.mode() & 0o6000, 0, "alice's file became setuid");
        assert_eq!(fs::read(&payload).unwrap(), b"PAYLOAD-PAYLOAD-PAYLOAD");
        // Safe outcomes only: the restore either refused (she got
        // something into the directory first) or wrote it root-only.
        if r.code != 0 {
            assert!(r.stderr.contains("not empty"), "{}", r.stderr);
        } else {
            assert!(
                r.stderr.contains("belonged to another user"),
                "{}",
                r.stderr
            );
            assert_eq!(fs::read(target.join("secret")).unwrap(), b"TOPSECRET");
            assert_eq!(mode(&target.join("secret")), 0o600);
            assert_eq!(fs::metadata(target.join("secret")).unwrap().uid(), 0);
            assert!(!target.join("null").exists(), "device restored for a user");
        }
        for p in every_file_below(&target) {
            let m = fs::symlink_metadata(&p).unwrap();
            if !m.is_dir() {
                assert_eq!(m.mode() & 0o6000, 0, "setuid restored: {}", p.display());
            }
            if m.uid() == alice.0 && m.is_file() {
                assert!(!fs::read(&p).unwrap().starts_with(b"TOPSECRET"));
            }
        }
    }
}

#[test]
fn restore_and_mount_targets_flipped_to_symlinks_never_land_elsewhere() {
    if !need_root() {
        return;
    }
    let (env, alice, home) = setup();
    valuable_volume(&env);
    // Root's directory the attacker wants written into (or mounted over).
    let prize = env.path("prize");
    fs::create_dir(&prize).unwrap();
    fs::set_permissions(&prize, fs::Permissions::from_mode(0o700)).unwrap();
    let n = trials(8);
    let attacker = Attacker::start(
        alice,
        &home.join("stop"),
        "for i in range(int(sys.argv[3])):\n    \
             t = os.path.join(sys.argv[2], 't%d' % i)\n    \
             try:\n        os.mkdir(t + '.d')\n    except OSError:\n        pass\n    \
             try:\n        os.symlink(sys.argv[4], t + '.l')\n    except OSError:\n        pass\n    \
             try:\n        os.rename(t + '.d', t)\n        os.rename(t, t + '.d')\n    except OSError:\n        pass\n    \
             try:\n        os.rename(t + '.l', t)\n        exchange(t, t + '.d')\n        exchange(t, t + '.d')\n        os.rename(t, t + '.l')\n    except OSError:\n        pass",
        &[os(&home), OsStr::new(&(2 * n).to_string()), os(&prize)],
    );
    let (mut restored, mut mounted) = (0, 0);
    for i in 0..n {
        let t = home.join(format!("t{i}"));
        let r = env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&t)]);
        restored += usize::from(r.code == 0);
        let m = home.join(format!("t{}", n + i));
        let r = env.run(&[OsStr::new("mount"), OsStr::new("latest"), os(&m)]);
        if r.code == 0 {
            mounted += 1;
            let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
            let line = info
                .lines()
                .find(|l| l.contains("laybak-snapshot:"))
                .expect("the mount is listed");
            for opt in ["ro", "nosuid", "nodev"] {
                assert!(
                    line.split(' ').nth(5).unwrap().split(',').any(|o| o == opt),
                    "{line}"
                );
            }
            // The directory it landed on (the attacker may have renamed
            // names around it; a mount point itself cannot be renamed).
            let at = PathBuf::from(line.split(' ').nth(4).unwrap());
            assert!(at.starts_with(&home), "mounted at {}", at.display());
            let u = env.run(&[OsStr::new("umount"), os(&at)]);
            if u.code != 0 {
                let recs: Vec<_> = fs::read_dir(env.state.join("mounts"))
                    .map(|r| r.map(|e| e.unwrap().file_name()).collect())
                    .unwrap_or_default();
                panic!(
                    "{}\nmounts: {:?}\nrecords: {recs:?}",
                    u.stderr,
                    info.lines()
                        .filter(|l| l.contains("laybak"))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    let ran = attacker.finish();
    assert!(ran > 0, "the attacker never ran");
    eprintln!("{ran} attacker rounds; {restored} restores and {mounted} mounts got through");
    assert!(
        fs::read_dir(&prize).unwrap().next().is_none(),
        "something was written into root's directory"
    );
    assert_eq!(fs::metadata(&prize).unwrap().uid(), 0);
    assert_eq!(mode(&prize), 0o700);
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(prize.to_str().unwrap()),
        "root's directory was mounted over"
    );
}

#[test]
fn umount_unmounts_only_what_laybak_mount_made() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), b"a").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let t = env.path("tmpfs");
    fs::create_dir(&t).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&t)
            .status()
            .unwrap()
            .success()
    );
    env.run(&[OsStr::new("umount"), os(&t)])
        .fails(1, "`laybak mount` did not make");
    let backing = env.state.join("backing/vol");
    env.run(&[OsStr::new("umount"), os(&backing)])
        .fails(1, "`laybak mount` did not make");
    env.run(&[OsStr::new("umount"), os(&vol)])
        .fails(1, "is a volume");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for p in [&t, &backing, &vol] {
        assert!(
            info.contains(p.to_str().unwrap()),
            "{} was unmounted",
            p.display()
        );
    }
    assert_eq!(fs::read(vol.join("a")).unwrap(), b"a");
    let m = env.path("m");
    env.run(&[OsStr::new("mount"), OsStr::new("latest"), os(&m)])
        .ok();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"a");
    env.run(&[OsStr::new("umount"), os(&m)]).ok();
    assert!(!m.join("a").exists());
    Command::new("umount").arg(&t).status().unwrap();
}

#[test]
fn historical_mounts_never_change_and_detach_waits_for_them() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::create_dir(vol.join("dir")).unwrap();
    fs::write(vol.join("dir/x"), b"x").unwrap();
    fs::write(vol.join("a"), b"v0").unwrap();
    env.run(&[
        OsStr::new("attach"),
        os(&vol),
        OsStr::new("--max-layers"),
        OsStr::new("2"),
    ])
    .ok();
    fs::write(vol.join("a"), b"v1").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let m = env.path("m");
    env.run(&[OsStr::new("mount"), OsStr::new("latest"), os(&m)])
        .ok();
    let layers = |env: &Env| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&env.lb(&["volumes", "--json"]).ok().stdout).unwrap();
        v[0]["layers"].as_u64().unwrap()
    };
    fs::write(vol.join("a"), b"v2").unwrap();
    fs::remove_dir_all(vol.join("dir")).unwrap();
    for _ in 0..3 {
        env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    }
    // Merges kept the chain bounded without touching the mounted layers.
    assert!(layers(&env) <= 2, "the chain grew: {}", layers(&env));
    assert_eq!(fs::read(m.join("a")).unwrap(), b"v1");
    assert_eq!(fs::read(m.join("dir/x")).unwrap(), b"x");
    env.run(&[OsStr::new("detach"), os(&vol)])
        .fails(11, "laybak umount");
    assert_eq!(fs::read(m.join("a")).unwrap(), b"v1");
    env.run(&[OsStr::new("umount"), os(&m)]).ok();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    assert!(layers(&env) <= 2);
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    assert_eq!(fs::read(vol.join("a")).unwrap(), b"v2");
    assert!(!vol.join("dir").exists());
}

#[test]
fn concurrent_attach_of_two_directories_with_one_name_attaches_one() {
    if !need_root() {
        return;
    }
    for _ in 0..trials(2) {
        let env = Env::new();
        env.init();
        let dirs: Vec<PathBuf> = ["c1", "c2"]
            .iter()
            .map(|c| {
                let d = env.path(c).join("data");
                fs::create_dir_all(&d).unwrap();
                for i in 0..200 {
                    fs::write(d.join(format!("{c}-{i}")), c.as_bytes()).unwrap();
                }
                d
            })
            .collect();
        let kids: Vec<Child> = dirs
            .iter()
            .map(|d| {
                env.cmd()
                    .arg("attach")
                    .arg(d)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = kids
            .into_iter()
            .map(|k| k.wait_with_output().unwrap())
            .collect();
        let ok: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        assert_eq!(ok.len(), 1, "exactly one attach succeeds");
        let (win, lose) = (ok[0], 1 - ok[0]);
        let err = String::from_utf8_lossy(&outs[lose].stderr);
        assert!(err.contains("a volume named data already exists"), "{err}");
        // The loser was not touched; the winner holds its own files only.
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&dirs[lose]).len(), 200);
        assert!(!dirs[lose].join(".laybak").exists());
        let w = names(&dirs[win]);
        assert_eq!(w.len(), 200);
        let prefix = if win == 0 { "c1-" } else { "c2-" };
        assert!(w.iter().all(|n| n.starts_with(prefix)));
        env.run(&[OsStr::new("detach"), os(&dirs[win])]).ok();
    }
}

#[test]
fn quiet_volumes_mount_from_the_repository() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), b"a").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // No changes: identical manifests, one layer id twice in the chain.
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    // Another host (no local layers): every layer comes from the cache.
    let other = env.path("other-state");
    let m = env.path("m");
    let r = env.run(&[
        OsStr::new("--state-dir"),
        os(&other),
        OsStr::new("mount"),
        OsStr::new("latest"),
        os(&m),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fs::read(m.join("a")).unwrap(), b"a");
    env.run(&[
        OsStr::new("--state-dir"),
        os(&other),
        OsStr::new("umount"),
        os(&m),
    ])
    .ok();
    // A single-layer view (the first snapshot) is read-only too.
    let first = env.snapshot_ids()[0].clone();
    env.run(&[
        OsStr::new("--state-dir"),
        os(&other),
        OsStr::new("mount"),
        OsStr::new(&first),
        os(&m),
    ])
    .ok();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"a");
    assert!(
        fs::write(m.join("b"), b"b").is_err(),
        "a snapshot view is writable"
    );
    env.run(&[
        OsStr::new("--state-dir"),
        os(&other),
        OsStr::new("umount"),
        os(&m),
    ])
    .ok();
}

#[test]
fn a_users_own_dot_laybak_does_not_break_detach() {
    if !need_root() {
        return;
    }
    let (env, alice, _home) = setup();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    std::os::unix::fs::chown(&vol, Some(alice.0), Some(alice.1)).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let st = as_user(alice, "sh")
        .arg("-c")
        .arg(format!(
            "mkdir {0}/.laybak && echo mine > {0}/.laybak/note",
            vol.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    assert_eq!(fs::read(vol.join(".laybak/note")).unwrap(), b"mine\n");
    assert_eq!(fs::metadata(vol.join(".laybak")).unwrap().uid(), alice.0);
    let names: Vec<_> = fs::read_dir(&vol)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(".laybak")]);
}

#[test]
fn a_shell_left_in_a_volume_does_not_keep_it_from_being_snapshotted() {
    if !need_root() {
        return;
    }
    let (env, alice, _home) = setup();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::set_permissions(&vol, fs::Permissions::from_mode(0o777)).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("before"), b"1").unwrap();
    let mut shell = as_user(alice, "sh")
        .arg("-c")
        .arg("cd \"$0\" && exec sleep 60")
        .arg(&vol)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("1"),
    ])
    .ok();
    // Her shell keeps the frozen view of the snapshot's moment: readable,
    // read-only; the volume itself goes on, writable, for everyone else.
    let cwd = PathBuf::from(format!("/proc/{}/cwd", shell.id()));
    assert_eq!(fs::read(cwd.join("before")).unwrap(), b"1");
    let e = fs::write(cwd.join("stale"), b"x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(30),
        "EROFS through the old view: {e}"
    );
    fs::write(vol.join("after"), b"2").unwrap();
    assert!(!cwd.join("after").exists());
    // While she is inside it, the old view's layers are not folded away
    // and detach waits, naming her shell.
    env.run(&[OsStr::new("detach"), os(&vol)])
        .fails(11, &format!("pid {} (sleep)", shell.id()));
    let _ = shell.kill();
    let _ = shell.wait();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    assert_eq!(fs::read(vol.join("after")).unwrap(), b"2");
}

#[test]
fn attach_refuses_bad_places_before_moving_anything() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir_all(vol.join("sub")).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let with_file = |name: &str| -> PathBuf {
        let d = env.path(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("keep"), b"keep").unwrap();
        d
    };
    let untouched = |d: &Path| {
        assert!(d.join("keep").exists(), "{} was moved", d.display());
        assert!(!d.join(".laybak").exists(), "{} got a store", d.display());
    };
    env.run(&[OsStr::new("attach"), os(&vol.join("sub"))])
        .fails(1, "is inside laybak volume vol");
    env.run(&[OsStr::new("attach"), os(env.dir.path())])
        .fails(1, "contains laybak volume vol");
    // A directory holding a mount point.
    let mp = with_file("mp");
    fs::create_dir(mp.join("m")).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(mp.join("m"))
            .status()
            .unwrap()
            .success()
    );
    env.run(&[OsStr::new("attach"), os(&mp)])
        .fails(1, "contains the mount point");
    Command::new("umount").arg(mp.join("m")).status().unwrap();
    untouched(&mp);
    // The repository or the state dir inside the directory, or it inside them.
    let holds_repo = with_file("holds-repo");
    let r2 = holds_repo.join("repo");
    env.run(&[OsStr::new("--repo"), os(&r2), OsStr::new("init")])
        .ok();
    env.run(&[
        OsStr::new("--repo"),
        os(&r2),
        OsStr::new("attach"),
        os(&holds_repo),
    ])
    .fails(1, "contains the repository");
    untouched(&holds_repo);
    let holds_state = with_file("holds-state");
    env.run(&[
        OsStr::new("--state-dir"),
        os(&holds_state.join("st")),
        OsStr::new("attach"),
        os(&holds_state),
    ])
    .fails(1, "contains laybak's state dir");
    untouched(&holds_state);
    let inside_repo = env.repo.join("x");
    fs::create_dir(&inside_repo).unwrap();
    env.run(&[OsStr::new("attach"), os(&inside_repo)])
        .fails(1, "is inside the repository");
    fs::remove_dir(&inside_repo).unwrap();
    // Inside an overlay laybak did not make.
    let (lo, ov) = (with_file("lo"), env.path("ov"));
    fs::create_dir_all(lo.join("inner")).unwrap();
    fs::create_dir(&ov).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={}:{}",
                lo.display(),
                env.path("mp").display()
            ))
            .arg(&ov)
            .status()
            .unwrap()
            .success()
    );
    env.run(&[OsStr::new("attach"), os(&ov.join("inner"))])
        .fails(1, "inside an overlay mount");
    Command::new("umount").arg(&ov).status().unwrap();
    untouched(&lo);
}

#[test]
fn restore_can_refuse_devices_and_setuid() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    valuable_volume(&env);
    let full = env.path("full");
    env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&full)])
        .ok();
    assert_eq!(mode(&full.join("suid")), 0o4755);
    assert!(full.join("null").exists());
    let safe = env.path("safe");
    let r = env
        .run(&[
            OsStr::new("restore"),
            OsStr::new("latest"),
            os(&safe),
            OsStr::new("--no-devices"),
            OsStr::new("--no-setuid"),
        ])
        .ok();
    assert!(r.stderr.contains("1 device nodes left out"), "{}", r.stderr);
    assert_eq!(mode(&safe.join("suid")), 0o755);
    assert!(!safe.join("null").exists());
    assert_eq!(fs::read(safe.join("secret")).unwrap(), b"TOPSECRET");
}

#[test]
fn names_with_control_characters_cannot_fake_lines() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("evil\nM fake"), b"x").unwrap();
    let out = env.run(&[OsStr::new("status"), os(&vol)]).ok().stdout;
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(out.contains("evil\\nM fake"), "{out:?}");
    let json = env
        .run(&[OsStr::new("status"), os(&vol), OsStr::new("--json")])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["path"], "evil\nM fake");
}

#[test]
fn a_tree_deeper_than_path_max_is_archived_restored_and_detached() {
    if !need_root() {
        return;
    }
    let (env, alice, _home) = setup();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    std::os::unix::fs::chown(&vol, Some(alice.0), Some(alice.1)).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // Built with chdir in a loop, as a user would: 30 levels of 200 bytes.
    let build_deep = || {
        let st = as_user(alice, "/usr/bin/python3")
            .arg("-c")
            .arg(
                "import os, sys\nos.chdir(sys.argv[1])\nfor i in range(30):\n    \
                 n = ('%02d' % i) * 100\n    os.mkdir(n)\n    os.chdir(n)\n\
                 open('deep', 'w').write('bottom')\n",
            )
            .arg(&vol)
            .status()
            .unwrap();
        assert!(st.success());
    };
    build_deep();
    env.run(&[OsStr::new("status"), os(&vol)]).ok();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let t = env.path("t");
    env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&t)])
        .ok();
    let check = |root: &Path| {
        let script = "import os, sys\nos.chdir(sys.argv[1])\nfor i in range(30):\n    \
                      os.chdir(('%02d' % i) * 100)\nprint(open('deep').read())\n";
        let o = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(root)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("bottom"));
    };
    check(&t);
    // A change deep down is "modified", its existing parents not "added".
    let st = as_user(alice, "/usr/bin/python3")
        .arg("-c")
        .arg(
            "import os, sys\nos.chdir(sys.argv[1])\nfor i in range(30):\n    \
             os.chdir(('%02d' % i) * 100)\nopen('deep', 'a').write('!')\n",
        )
        .arg(&vol)
        .status()
        .unwrap();
    assert!(st.success());
    let status = env.run(&[OsStr::new("status"), os(&vol)]).ok().stdout;
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(
        status.starts_with("M ") && status.trim_end().ends_with("/deep"),
        "{status}"
    );
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    // Deleting it later does not leave a layer that can never be archived.
    fs::remove_dir_all(vol.join("00".repeat(100))).unwrap();
    build_deep();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    env.run(&[OsStr::new("detach"), os(&vol)]).ok();
    check(&vol);
}

#[test]
fn forget_evicts_cached_layers_of_forgotten_snapshots_but_not_mounted_ones() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("secret"), b"v1").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("secret"), b"v2").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    fs::write(vol.join("other"), b"o").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let ids = env.snapshot_ids();
    // Another host's state dir: both older snapshots come from the cache.
    let other = env.path("other");
    let with_other = |args: &[&OsStr]| {
        let mut a = vec![OsStr::new("--state-dir"), os(&other)];
        a.extend_from_slice(args);
        env.run(&a)
    };
    let (m1, m2) = (env.path("m1"), env.path("m2"));
    with_other(&[OsStr::new("mount"), OsStr::new(&ids[0]), os(&m1)]).ok();
    with_other(&[OsStr::new("mount"), OsStr::new(&ids[1]), os(&m2)]).ok();
    with_other(&[OsStr::new("umount"), os(&m1)]).ok();
    let cached = || -> usize {
        fs::read_dir(other.join("cache"))
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                laybak::format::Id::parse(n.to_str().unwrap().split('.').next().unwrap()).is_some()
            })
            .count()
    };
    let before = cached();
    assert!(before >= 2, "{before} cached layers");
    // Forget everything but the newest: the older layers are squashed
    // away, but the mount m2 still stacks them from the cache: they stay.
    with_other(&[
        OsStr::new("forget"),
        OsStr::new("--keep-last"),
        OsStr::new("1"),
    ])
    .ok();
    assert_eq!(cached(), before, "a mounted layer was evicted");
    assert_eq!(fs::read(m2.join("secret")).unwrap(), b"v2");
    with_other(&[OsStr::new("umount"), os(&m2)]).ok();
    with_other(&[
        OsStr::new("forget"),
        OsStr::new("--keep-last"),
        OsStr::new("1"),
    ])
    .ok();
    assert!(cached() < before, "nothing was evicted");
    let v = env.snapshots_json();
    let kept: std::collections::HashSet<String> = v[0]["layers"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    for e in fs::read_dir(other.join("cache")).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        let id = n.split('.').next().unwrap().to_string();
        if laybak::format::Id::parse(&id).is_some() {
            assert!(kept.contains(&id), "forgotten layer {n} still cached");
        }
    }
}

#[test]
fn the_layer_cache_is_bounded_by_size() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("a"), vec![b'a'; 100_000]).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    fs::write(vol.join("b"), vec![b'b'; 100_000]).unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let other = env.path("other");
    let m = env.path("m");
    let lb = |args: &[&str]| {
        let mut a = vec![OsStr::new("--state-dir"), os(&other)];
        a.extend(args.iter().map(OsStr::new));
        env.run(&a).ok()
    };
    let layers = || -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(other.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let ids = env.snapshot_ids();
    let ms = m.to_str().unwrap();
    lb(&["mount", &ids[1], ms]);
    lb(&["umount", ms]);
    assert_eq!(layers().len(), 2);
    // A tiny bound: everything not under a live mount goes, the mounted
    // snapshot's layer stays.
    lb(&["mount", &ids[0], ms, "--cache-max", "1K"]);
    assert_eq!(fs::read(m.join("a")).unwrap().len(), 100_000);
    let left = layers();
    assert_eq!(left.len(), 1, "{left:?}");
    lb(&["umount", ms]);
}
