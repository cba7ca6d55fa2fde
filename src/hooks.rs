//! Quiesce hooks: per-volume commands run around the rotation of a
//! snapshot, so a volume with a writer (a database, a service) can still be
//! snapshotted: `before` stops or flushes it, `after` starts it again.
//!
//! Each runs as `sh -c COMMAND` with `LAYBAK_VOLUME` and `LAYBAK_PATH` set,
//! stdin closed, output passed through, in its own process group, killed
//! (the whole group) when it outlives the timeout. `after` always runs once
//! `before` was started, whether `before`, the rotation or nothing failed:
//! it is what brings the service back — also when laybak is told to stop
//! (SIGTERM from systemd, SIGINT, SIGHUP) meanwhile: such a signal is held
//! until `after` has run, and the snapshot then fails in one line.

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// While set, a termination signal is noted in [`SIGNALLED`] instead of
/// ending the process.
static HOLD: AtomicBool = AtomicBool::new(false);
/// A termination signal arrived while [`HOLD`] was set.
static SIGNALLED: AtomicBool = AtomicBool::new(false);
/// The signals held.
const TERMINATING: [i32; 3] = [
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGHUP,
];

/// Install, once, the handler that holds termination signals while the
/// hooks' window is open and otherwise does what the default action does
/// (terminate).
fn install_hold() -> Result<()> {
    static ONCE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        for sig in TERMINATING {
            // SAFETY: the action only touches atomics and calls
            // `emulate_default_handler`, both async-signal-safe.
            unsafe {
                signal_hook::low_level::register(sig, move || {
                    if HOLD.load(Ordering::SeqCst) {
                        SIGNALLED.store(true, Ordering::SeqCst);
                    } else {
                        let _ = signal_hook::low_level::emulate_default_handler(sig);
                    }
                })
            }
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow!("cannot install the signal handler the quiesce hooks need: {e}"))
}

/// Whether a termination signal arrived while hooks ran (the process
/// should end once it has finished what it was doing).
pub fn stop_requested() -> bool {
    SIGNALLED.load(Ordering::SeqCst)
}

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
    install_hold()?;
    HOLD.store(true, Ordering::SeqCst);
    let stop = |when: &str| {
        anyhow!(
            "laybak was told to stop {when}; the after hook ran, the snapshot of {name} was not completed"
        )
    };
    let res = match &h.before {
        Some(b) => run("before", b, name, path, timeout).and_then(|()| {
            if SIGNALLED.load(Ordering::SeqCst) {
                Err(stop("while the before hook ran"))
            } else {
                f()
            }
        }),
        None => f(),
    };
    let after = match &h.after {
        Some(a) => run("after", a, name, path, timeout).err(),
        None => None,
    };
    HOLD.store(false, Ordering::SeqCst);
    // A signal while sealing: the sealed layer stays pending (the next
    // snapshot archives it), and this run ends here.
    let res = match res {
        Ok(_) if SIGNALLED.load(Ordering::SeqCst) => Err(stop(
            "while the volume was sealed (the sealed layer is archived by the next snapshot)",
        )),
        other => other,
    };
    match (res, after) {
        (Ok(v), a) => Ok((v, a)),
        (Err(e), None) => Err(e),
        (Err(e), Some(a)) => Err(e.context(format!("and then {a:#}"))),
    }
}
