//! Rotation without a gap: a prober that stats, reads, creates and appends
//! by path in the volume every ~0.5 ms while snapshots run, as a service
//! would. `LAYBAK_ROTATIONS=N` runs more snapshots (30 in CI).

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default, Debug)]
struct Seen {
    ops: u64,
    missing: u64,
    erofs: u64,
    other: Vec<String>,
    appended: u64,
}

#[test]
fn a_prober_never_sees_the_volume_missing_across_snapshots() {
    if !need_root() {
        return;
    }
    let rotations: usize = std::env::var("LAYBAK_ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    fs::write(vol.join("probe"), b"here").unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut note = |r: std::io::Result<()>, what: &str| {
                    seen.ops += 1;
                    match r {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(2) => seen.missing += 1,
                        Err(e) if e.raw_os_error() == Some(30) => seen.erofs += 1,
                        Err(e) => seen.other.push(format!("{what}: {e}")),
                    }
                };
                note(fs::metadata(vol.join("probe")).map(|_| ()), "stat");
                note(
                    fs::read(vol.join("probe")).and_then(|d| {
                        if d == b"here" {
                            Ok(())
                        } else {
                            Err(std::io::Error::other("wrong content"))
                        }
                    }),
                    "read",
                );
                note(
                    fs::write(vol.join(format!("new-{}", n % 50)), b"x"),
                    "create",
                );
                let r = fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(vol.join("log"))
                    .and_then(|mut f| writeln!(f, "{n}"));
                if r.is_ok() {
                    seen.appended += 1;
                }
                note(r, "append");
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            (seen, n)
        })
    };
    for _ in 0..rotations {
        env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, _) = prober.join().unwrap();
    eprintln!("{rotations} snapshots: {seen:?}");
    assert!(seen.ops > 1000, "the prober barely ran: {seen:?}");
    assert_eq!(seen.missing, 0, "the volume was missing: {seen:?}");
    assert!(seen.other.is_empty(), "{:?}", seen.other);
    // Every append that returned success is in the log, exactly once.
    let log = fs::read_to_string(vol.join("log")).unwrap();
    assert_eq!(log.lines().count() as u64, seen.appended);
    // The latest snapshot plus the live upper hold the whole log.
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let t = env.path("t");
    env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&t)])
        .ok();
    assert_eq!(fs::read_to_string(t.join("log")).unwrap(), log);
}

#[test]
fn a_writer_through_a_bind_mount_blocks_sealing_and_never_writes_into_a_sealed_layer() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let bind = env.path("bind");
    fs::create_dir(&bind).unwrap();
    let st = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&vol)
        .arg(&bind)
        .status()
        .unwrap();
    assert!(st.success());
    let mut w = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bind.join("db"))
        .unwrap();
    writeln!(w, "one").unwrap();
    let r = env.run(&[
        OsStr::new("snapshot"),
        os(&vol),
        OsStr::new("--wait"),
        OsStr::new("0"),
    ]);
    r.fails(11, "open for writing");
    drop(w);
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    // The bind mount shows the frozen generation: writing through it fails
    // instead of landing in the sealed layer.
    let e = fs::write(bind.join("late"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(30), "{e}");
    fs::write(vol.join("live"), b"y").unwrap();
    let t = env.path("t");
    env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&t)])
        .ok();
    assert_eq!(fs::read(t.join("db")).unwrap(), b"one\n");
    assert!(!t.join("late").exists());
    std::process::Command::new("umount")
        .arg(&bind)
        .status()
        .unwrap();
}

#[test]
fn layers_merge_under_a_process_that_stays_in_an_old_view() {
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
    fs::write(vol.join("f"), b"1").unwrap();
    fs::create_dir(vol.join("d1")).unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(&vol)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    // A change, so that the snapshot rotates (an unchanged volume does not)
    // and leaves the holder in the old generation.
    fs::write(vol.join("g"), b"g").unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    let frozen = std::path::PathBuf::from(format!("/proc/{}/cwd", holder.id()));
    for i in 2..10 {
        fs::write(vol.join("f"), i.to_string()).unwrap();
        fs::remove_dir(vol.join(format!("d{}", i - 1))).unwrap();
        fs::create_dir(vol.join(format!("d{i}"))).unwrap();
        env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
        let info = laybak::overlay::find_mount(&vol).unwrap().unwrap();
        assert!(
            info.super_options.matches("lowerdir").count() <= 3,
            "{}",
            info.super_options
        );
        // The old view never changes under its process.
        assert_eq!(fs::read(frozen.join("f")).unwrap(), b"1");
        assert!(frozen.join("d1").is_dir());
        assert_eq!(fs::read(vol.join("f")).unwrap(), i.to_string().as_bytes());
    }
    let retired = env.state.join("backing/vol/.laybak/retired");
    assert!(
        fs::read_dir(&retired).unwrap().next().is_some(),
        "nothing was merged"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    env.run(&[OsStr::new("snapshot"), os(&vol)]).ok();
    assert!(
        fs::read_dir(&retired).unwrap().next().is_none(),
        "retired layers outlived their last user"
    );
    let t = env.path("t");
    env.run(&[OsStr::new("restore"), OsStr::new("latest"), os(&t)])
        .ok();
    assert_eq!(fs::read(t.join("f")).unwrap(), b"9");
    assert!(t.join("d9").is_dir() && !t.join("d8").exists());
}
