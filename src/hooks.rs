//! Quiesce hooks: per-volume commands run around the rotation of a
//! snapshot, so a volume with a writer (a database, a service) can still be
//! snapshotted: `before` stops or flushes it, `after` starts it again.
//!
//! Each runs as `sh -c COMMAND` with `LAYBAK_VOLUME` and `LAYBAK_PATH` set,
//! stdin closed, output passed through, in its own process group, killed
//! (the whole group) when it outlives the timeout. `after` always runs once
//! `before` was started, whether `before`, the rotation or nothing failed:
//! it is what brings the service back.

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default time a hook may take.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// The hooks of one volume (stored in its state, set with `laybak policy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    /// Run before the volume is sealed.
    #[serde(default)]
    pub before: Option<String>,
    /// Run after the volume was sealed (or sealing failed).
    #[serde(default)]
    pub after: Option<String>,
    /// Seconds each may take before it is killed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

/// Run hook `which` (`before` or `after`) command `cmd` for volume `name`
/// at `path`.
///
/// # Errors
/// It could not start, exited non-zero, was killed by a signal, or timed out.
pub fn run(which: &str, cmd: &str, name: &str, path: &Path, timeout: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("LAYBAK_VOLUME", name)
        .env("LAYBAK_PATH", path)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| anyhow!("the {which} hook of volume {name} could not start: {e}"))?;
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            if st.success() {
                return Ok(());
            }
            match st.code() {
                Some(c) => {
                    bail!("the {which} hook of volume {name} ({cmd:?}) failed with exit code {c}")
                }
                None => bail!("the {which} hook of volume {name} ({cmd:?}) was killed by a signal"),
            }
        }
        if start.elapsed() >= timeout {
            let pg = rustix::process::Pid::from_raw(child.id() as i32);
            if let Some(pg) = pg {
                let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
            }
            let _ = child.wait();
            bail!(
                "the {which} hook of volume {name} ({cmd:?}) did not finish within {}s and was killed: raise --hook-timeout or fix the command",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `before`, then `f`, then `after` (always, once `before` started).
/// Returns `f`'s value and the `after` hook's failure, if any, which the
/// caller reports after finishing its work (the service `after` restarts
/// may be down, so it must not go unnoticed).
///
/// # Errors
/// `before` or `f` failed (with `after`'s failure appended).
pub fn around<T>(
    hooks: Option<&Hooks>,
    name: &str,
    path: &Path,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<anyhow::Error>)> {
    let Some(h) = hooks else {
        return f().map(|v| (v, None));
    };
    let timeout = Duration::from_secs(h.timeout_secs.max(1));
    let res = match &h.before {
        Some(b) => run("before", b, name, path, timeout).and_then(|()| f()),
        None => f(),
    };
    let after = match &h.after {
        Some(a) => run("after", a, name, path, timeout).err(),
        None => None,
    };
    match (res, after) {
        (Ok(v), a) => Ok((v, a)),
        (Err(e), None) => Err(e),
        (Err(e), Some(a)) => Err(e.context(format!("and then {a:#}"))),
    }
}
