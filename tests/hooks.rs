//! Quiesce hooks around a snapshot's rotation: `laybak policy --before
//! --after --hook-timeout`.

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;

fn volume(env: &Env) -> std::path::PathBuf {
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    vol
}

fn policy(env: &Env, vol: &Path, args: &[&str]) {
    let mut a = vec![OsStr::new("policy"), os(vol)];
    a.extend(args.iter().map(OsStr::new));
    env.run(&a).ok();
}

fn snapshots(env: &Env) -> usize {
    env.snapshot_ids().len()
}

#[test]
fn hooks_quiesce_a_writer_so_a_busy_volume_is_snapshotted() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let vol = volume(&env);
    // A service holding its log open for writing: it blocks sealing.
    let mut svc = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3>>log; echo started >&3; exec sleep 60")
        .current_dir(&vol)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ])
    .fails(11, "open for writing");
    let marks = env.path("marks");
    fs::create_dir(&marks).unwrap();
    let pid = svc.id();
    policy(
        &env,
        &vol,
        &[
            "--before",
            &format!(
                "kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.05; done; echo dump > \"$LAYBAK_PATH/dump\"; echo $LAYBAK_VOLUME > {}/before",
                marks.display()
            ),
            "--after",
            &format!(
                "echo started-again >> \"$LAYBAK_PATH/log\"; touch {}/after",
                marks.display()
            ),
        ],
    );
    let _reaper = std::thread::spawn(move || svc.wait());
    let n = snapshots(&env);
    env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ])
    .ok();
    assert_eq!(snapshots(&env), n + 1);
    assert_eq!(fs::read_to_string(marks.join("before")).unwrap(), "vol\n");
    assert!(marks.join("after").exists());
    // What `before` wrote is in the snapshot; what `after` wrote is not yet.
    let t = env.path("t");
    env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&t)])
        .ok();
    assert_eq!(fs::read_to_string(t.join("dump")).unwrap(), "dump\n");
    assert_eq!(fs::read_to_string(t.join("log")).unwrap(), "started\n");
    assert_eq!(
        fs::read_to_string(vol.join("log")).unwrap(),
        "started\nstarted-again\n"
    );
}

#[test]
fn a_failing_or_hanging_before_hook_stops_the_snapshot_and_after_still_runs() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let vol = volume(&env);
    let after = env.path("after-ran");
    let n = snapshots(&env);
    policy(
        &env,
        &vol,
        &[
            "--before",
            "exit 3",
            "--after",
            &format!("touch {}", after.display()),
        ],
    );
    env.run(&[OsStr::new("snapshot"), os(&vol)]).fails(
        1,
        "before hook of volume vol (\"exit 3\") failed with exit code 3",
    );
    assert!(after.exists(), "after did not run");
    assert_eq!(snapshots(&env), n);
    fs::remove_file(&after).unwrap();
    policy(&env, &vol, &["--before", "sleep 30", "--hook-timeout", "1"]);
    let start = std::time::Instant::now();
    env.run(&[OsStr::new("snapshot"), os(&vol)])
        .fails(1, "did not finish within 1s and was killed");
    assert!(
        start.elapsed().as_secs() < 20,
        "the timeout did not kill it"
    );
    assert!(after.exists(), "after did not run after a timeout");
    assert_eq!(snapshots(&env), n);
    // Removing the hooks: plain snapshots again.
    policy(&env, &vol, &["--before", "", "--after", ""]);
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    assert_eq!(snapshots(&env), n + 1);
}

#[test]
fn after_runs_when_sealing_fails_and_its_failure_is_reported() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let vol = volume(&env);
    let after = env.path("after-ran");
    policy(
        &env,
        &vol,
        &["--after", &format!("touch {}; exit 4", after.display())],
    );
    let mut w = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3>>held; exec sleep 30")
        .current_dir(&vol)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ]);
    w.kill().unwrap();
    w.wait().unwrap();
    let r = r.fails(11, "open for writing");
    assert!(r.stderr.contains("after hook"), "{}", r.stderr);
    assert!(after.exists());
    // Sealing works, the after hook fails: the snapshot is taken and
    // archived, and the command still fails, saying so.
    let n = snapshots(&env);
    env.run(&[OsStr::new("snapshot"), os(&vol)])
        .fails(1, "was sealed and archived: the after hook of volume vol");
    assert_eq!(snapshots(&env), n + 1);
}

/// systemd stopping the job (SIGTERM) while the `before` hook runs: laybak
/// does not die with the service down — it waits for `before`, skips the
/// sealing, runs `after`, and fails in one line; the next snapshot works.
#[test]
fn a_stop_signal_during_the_hooks_still_runs_after() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    let vol = volume(&env);
    fs::write(vol.join("data"), b"1").unwrap();
    let marks = env.path("marks");
    fs::create_dir(&marks).unwrap();
    let m = marks.display();
    policy(
        &env,
        &vol,
        &[
            "--before",
            &format!("touch {m}/before-started; sleep 1; touch {m}/before-done"),
            "--after",
            &format!("touch {m}/after-ran"),
        ],
    );
    let before = snapshots(&env);
    let child = env
        .cmd()
        .args(["snapshot"])
        .arg(&vol)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !marks.join("before-started").exists() {
        assert!(t.elapsed().as_secs() < 10, "the before hook never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("told to stop") && err.contains("after hook ran"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(marks.join("before-done").exists(), "before was cut short");
    assert!(marks.join("after-ran").exists(), "after did not run");
    assert_eq!(snapshots(&env), before, "a snapshot was taken anyway");
    assert!(laybak::overlay::find_mount(&vol).unwrap().unwrap().fstype == "overlay");
    fs::remove_file(marks.join("after-ran")).unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    assert_eq!(snapshots(&env), before + 1);
    assert!(marks.join("after-ran").exists());
}
