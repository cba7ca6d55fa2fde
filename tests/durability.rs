//! Power-cut safety of the write protocol, checked on the real binary with
//! strace: every file that appears under its final name in the repository
//! or the state directory was fsynced under its temporary name before the
//! rename, and its directory was fsynced after it. Data that only reached
//! the page cache therefore never decides what a reader finds after a
//! power cut: either the old name set, or the new, complete file.

mod common;
use common::*;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;

#[derive(Debug)]
enum Ev {
    Open { fd: i32, path: String },
    Fsync { fd: i32 },
    Rename { from: String, to: String },
}

/// Join strace's split lines (`call(... <unfinished ...>` then
/// `<... call resumed>...`) per thread, so concurrent threads parse.
fn join_unfinished(text: &str) -> Vec<String> {
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(tid.to_string(), head.to_string());
        } else if rest.starts_with("<... ") {
            if let (Some(head), Some((_, tail))) =
                (pending.remove(tid), rest.split_once(" resumed>"))
            {
                out.push(format!("{tid} {head}{tail}"));
            }
        } else {
            out.push(line.to_string());
        }
    }
    out
}

fn parse(line: &str) -> Option<Ev> {
    let (_tid, rest) = line.split_once(' ')?;
    let rest = rest.trim();
    let ret: i64 = rest
        .rsplit_once("= ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let arg = |s: &str| s.split('"').nth(1).map(str::to_string);
    if rest.starts_with("openat(") && ret >= 0 {
        return Some(Ev::Open {
            fd: ret as i32,
            path: arg(rest)?,
        });
    }
    if (rest.starts_with("fsync(") || rest.starts_with("fdatasync(")) && ret == 0 {
        let fd = rest.split('(').nth(1)?.split(')').next()?.parse().ok()?;
        return Some(Ev::Fsync { fd });
    }
    if (rest.starts_with("rename(")
        || rest.starts_with("renameat(")
        || rest.starts_with("renameat2("))
        && ret == 0
    {
        let q: Vec<&str> = rest.split('"').collect();
        return Some(Ev::Rename {
            from: q.get(1)?.to_string(),
            to: q.get(3)?.to_string(),
        });
    }
    None
}

#[test]
fn every_rename_is_preceded_by_a_file_fsync_and_followed_by_a_directory_fsync() {
    if !need_root() {
        return;
    }
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "strace is required in CI");
        eprintln!("\n*** SKIPPED: strace is not installed (apt-get install strace) ***\n");
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir(&vol).unwrap();
    for i in 0..20 {
        fs::write(vol.join(format!("f{i}")), vec![i as u8; 50_000 + i * 1000]).unwrap();
    }
    let trace = env.path("trace");
    let mut runs = Vec::new();
    let strace = |args: &[&OsStr], out: &std::path::Path| {
        let mut c = std::process::Command::new("strace");
        c.args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(out)
        .arg(env!("CARGO_BIN_EXE_laybak"))
        .args(args)
        .env("LAYBAK_REPO", &env.repo)
        .env("LAYBAK_STATE_DIR", &env.state)
        .env("LAYBAK_PASSWORD", common::PASSWORD);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    strace(
        &[OsStr::new("attach"), os(&vol)],
        &trace.with_extension("1"),
    );
    runs.push(trace.with_extension("1"));
    fs::write(vol.join("f3"), b"changed").unwrap();
    strace(
        &[OsStr::new("snapshot"), os(&vol)],
        &trace.with_extension("2"),
    );
    runs.push(trace.with_extension("2"));
    strace(
        &[
            OsStr::new("forget"),
            OsStr::new("--keep-last"),
            OsStr::new("1"),
            OsStr::new("--prune"),
        ],
        &trace.with_extension("3"),
    );
    runs.push(trace.with_extension("3"));
    let root = env.dir.path().to_str().unwrap().to_string();
    let mut checked = 0;
    for run in runs {
        let text = fs::read_to_string(&run).unwrap();
        let evs: Vec<Ev> = join_unfinished(&text)
            .iter()
            .filter_map(|l| parse(l))
            .collect();
        // One process (threads share its fd table): resolve every fsync to
        // the path its fd named at that moment.
        let mut fd_path: HashMap<i32, String> = HashMap::new();
        let mut synced: Vec<(usize, String)> = Vec::new();
        for (i, ev) in evs.iter().enumerate() {
            match ev {
                Ev::Open { fd, path, .. } => {
                    fd_path.insert(*fd, path.clone());
                }
                Ev::Fsync { fd, .. } => {
                    if let Some(p) = fd_path.get(fd) {
                        synced.push((i, p.clone()));
                    }
                }
                Ev::Rename { .. } => {}
            }
        }
        for (i, ev) in evs.iter().enumerate() {
            let Ev::Rename { from, to } = ev else {
                continue;
            };
            // Lock files are deliberately not durable: a lock that a power
            // cut erases belonged to a process that died with it.
            // The local blob cache is rebuilt when it is found damaged.
            if !to.starts_with(&root)
                || !from.contains(".tmp.")
                || to.contains("/locks/")
                || to.contains("/cache/index-")
            {
                continue;
            }
            assert!(
                synced.iter().any(|(j, p)| *j < i && p == from),
                "{}: {to} was renamed into place without an fsync of {from}",
                run.display()
            );
            let dir = std::path::Path::new(to)
                .parent()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            assert!(
                synced.iter().any(|(j, p)| *j > i && *p == dir),
                "{}: no fsync of {dir} after renaming {to}",
                run.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} renames seen: is strace tracing the right calls?"
    );
    eprintln!("{checked} atomic renames verified");
}
