//! Real programs in a volume: what they do to a directory must work as on a
//! plain one (directory renames in place above all), and what they leave
//! must restore from the repository. Each needs its program; in CI a
//! missing one is a failure (`.ci/run` installs them), elsewhere a loud skip.

mod common;
use common::*;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;

/// Whether `program` runs; under CI its absence fails the test.
fn have(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is needed by this test (scripts/test.sh installs it)"
        );
        eprintln!("\n*** SKIPPED: {program} is not installed ***\n");
    }
    ok
}

#[track_caller]
fn run(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn snapshot(env: &Env, vol: &Path) -> String {
    let r = env.run(&[OsStr::new("snapshot"), os(vol)]).ok();
    r.stdout.trim().to_string()
}

/// Bytes of the volume's local layer store (its `.laybak/l`).
fn store_bytes(env: &Env) -> u64 {
    let out = run(Command::new("du")
        .args(["-sb"])
        .arg(env.state.join("backing/vol/.laybak/l")));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// `mv` of a big directory that existed at the last snapshot is a rename:
/// nothing is copied, the next layer is a few KiB, and both names restore
/// right.
#[test]
fn mv_of_a_large_old_directory_copies_nothing() {
    if !need_root() {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    fs::create_dir_all(vol.join("data/sub")).unwrap();
    for i in 0..8 {
        fs::write(vol.join(format!("data/sub/f{i}")), vec![i as u8; 8 << 20]).unwrap();
    }
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    let before = store_bytes(&env);
    run(Command::new("mv")
        .arg(vol.join("data"))
        .arg(vol.join("moved")));
    fs::create_dir(vol.join("x")).unwrap();
    run(Command::new("mv")
        .arg(vol.join("moved/sub"))
        .arg(vol.join("x/sub2")));
    let grown = store_bytes(&env).saturating_sub(before);
    assert!(
        grown < 1 << 20,
        "renaming 64 MiB of directories grew the layer store by {grown} bytes"
    );
    let want = listing(&vol);
    let id = snapshot(&env, &vol);
    let t = env.path("r");
    env.run(&[OsStr::new("restore"), OsStr::new(&id), os(&t)])
        .ok();
    assert_same("restored after mv", &want, &listing(&t));
    assert_eq!(fs::read(t.join("x/sub2/f3")).unwrap(), vec![3u8; 8 << 20]);
}

/// npm replacing an installed package renames its old directory aside
/// (`node_modules/.demo-*`); with a hook on `fs.rename` no rename may fail
/// with EXDEV. Local tarballs: no registry needed.
#[test]
fn npm_upgrade_renames_in_place() {
    if !need_root() || !have("npm") {
        return;
    }
    let env = Env::new();
    env.init();
    let pkgs = env.path("pkgs");
    for v in ["1.0.0", "2.0.0"] {
        let d = pkgs.join(format!("demo-{v}"));
        fs::create_dir_all(d.join("lib")).unwrap();
        fs::write(
            d.join("package.json"),
            format!(r#"{{"name":"demo","version":"{v}","main":"lib/index.js"}}"#),
        )
        .unwrap();
        fs::write(d.join("lib/index.js"), format!("module.exports = {v:?};\n")).unwrap();
        run(Command::new("npm")
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&pkgs)
            .current_dir(&d));
    }
    let vol = env.path("vol");
    fs::create_dir_all(&vol).unwrap();
    fs::write(
        vol.join("package.json"),
        r#"{"name":"app","version":"1.0.0"}"#,
    )
    .unwrap();
    let hook = env.path("hook.js");
    let log = env.path("exdev.log");
    fs::write(
        &hook,
        r#"
const fs = require("fs");
const log = process.env.EXDEV_LOG;
const note = (a, e) => { if (e && e.code === "EXDEV") fs.appendFileSync(log, a + "\n"); };
const r = fs.rename, rs = fs.renameSync, rp = fs.promises.rename;
fs.rename = (a, b, cb) => r(a, b, (e) => { note(a, e); cb(e); });
fs.renameSync = (a, b) => { try { return rs(a, b); } catch (e) { note(a, e); throw e; } };
fs.promises.rename = async (a, b) => { try { return await rp(a, b); } catch (e) { note(a, e); throw e; } };
"#,
    )
    .unwrap();
    let npm = |v: &str| {
        run(Command::new("npm")
            .args([
                "install",
                "--offline",
                "--no-audit",
                "--no-fund",
                "--silent",
            ])
            .arg(pkgs.join(format!("demo-{v}.tgz")))
            .current_dir(&vol)
            .env("NODE_OPTIONS", format!("--require {}", hook.display()))
            .env("EXDEV_LOG", &log)
            .env("npm_config_cache", env.path("npm-cache")));
    };
    npm("1.0.0");
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    npm("2.0.0");
    assert!(
        !log.exists(),
        "renames failed with EXDEV: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let got = run(Command::new("node")
        .args(["-p", "require('demo')"])
        .current_dir(&vol));
    assert_eq!(got.trim(), "2.0.0");
    let want = listing(&vol);
    let id = snapshot(&env, &vol);
    let t = env.path("r");
    env.run(&[OsStr::new("restore"), OsStr::new(&id), os(&t)])
        .ok();
    assert_same("restored after npm", &want, &listing(&t));
}

/// git (object renames, `git mv` of a directory, branches), sqlite (its
/// journal) and cargo (target directory churn) in a volume, snapshotted
/// between rounds: every restore is a working repository, database and
/// build tree.
#[test]
fn git_sqlite_and_cargo_round_trip() {
    if !need_root() || !have("git") || !have("sqlite3") {
        return;
    }
    let env = Env::new();
    env.init();
    let vol = env.path("vol");
    let repo = vol.join("proj");
    fs::create_dir_all(repo.join("src/util")).unwrap();
    let git = |args: &[&str]| {
        run(Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo))
    };
    git(&["init", "-q"]);
    fs::write(repo.join("src/util/a.txt"), "one\n").unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-qm", "one"]);
    let db = vol.join("db.sqlite");
    run(Command::new("sqlite3").arg(&db).arg(
        "create table t(k integer primary key, v text); insert into t(v) values ('a'),('b');",
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .args(["new", "--quiet", "--vcs", "none", "crab"])
        .current_dir(&vol));
    let build = |dir: &Path| {
        run(Command::new(&cargo)
            .args(["build", "--quiet", "--offline"])
            .current_dir(dir)
            .env_remove("CARGO_TARGET_DIR"));
    };
    build(&vol.join("crab"));
    env.run(&[OsStr::new("attach"), os(&vol)]).ok();
    // Round 2: a directory moved with git, a branch, more rows, a rebuild.
    git(&["mv", "src/util", "src/helpers"]);
    git(&["commit", "-qm", "move"]);
    git(&["checkout", "-qb", "side"]);
    fs::write(repo.join("src/helpers/b.txt"), "two\n").unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-qm", "two"]);
    git(&["gc", "-q"]);
    run(Command::new("sqlite3")
        .arg(&db)
        .arg("insert into t(v) select v || k from t; vacuum;"));
    fs::write(
        vol.join("crab/src/main.rs"),
        "fn main() { println!(\"v2\"); }\n",
    )
    .unwrap();
    build(&vol.join("crab"));
    let want = listing(&vol);
    let id = snapshot(&env, &vol);
    let t = env.path("r");
    env.run(&[OsStr::new("restore"), OsStr::new(&id), os(&t)])
        .ok();
    assert_same("restored tree", &want, &listing(&t));
    let rg = |args: &[&str]| {
        run(Command::new("git")
            .args([
                "-c",
                &format!("safe.directory={}", t.join("proj").display()),
            ])
            .args(args)
            .current_dir(t.join("proj")))
    };
    rg(&["fsck", "--strict", "--no-progress"]);
    assert!(rg(&["status", "--porcelain"]).is_empty());
    assert_eq!(rg(&["log", "--format=%s"]).lines().count(), 3);
    let check = run(Command::new("sqlite3")
        .arg(t.join("db.sqlite"))
        .arg("pragma integrity_check; select count(*) from t;"));
    assert_eq!(check.split_whitespace().collect::<Vec<_>>(), ["ok", "4"]);
    build(&t.join("crab"));
    let out = run(&mut Command::new(t.join("crab/target/debug/crab")));
    assert_eq!(out.trim(), "v2");
}
