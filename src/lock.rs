//! Repository locks: shared for everything that reads or adds (snapshot,
//! forget, restore, mount, check, diff), exclusive for what deletes data
//! (prune, repair index). A lock is a small file in `locks/` naming host,
//! pid and time. A crashed run never leaves a lock that needs a manual
//! unlock: a lock of this host whose process is gone is stale at once, a lock
//! of another host is stale after [`STALE_AFTER`] (live holders refresh
//! theirs while they run, every [`REFRESH_EVERY`]); stale locks are removed
//! by whoever finds them.

use crate::format::{self, LockId, Time};
use crate::repo::{LockStore, Repo};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A lock of another host older than this is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a holder refreshes its lock file.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

/// Contents of a lock file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockInfo {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When it was taken or last refreshed.
    pub time: Time,
    /// Exclusive (prune) or shared (snapshot, restore, check).
    pub exclusive: bool,
    /// What the holder is doing.
    pub what: String,
}

impl LockInfo {
    fn describe(&self) -> String {
        format!("{} (pid {} on {})", self.what, self.pid, self.host)
    }
}

/// A held lock; removed on drop.
pub struct Lock<'r> {
    _repo: std::marker::PhantomData<&'r Repo>,
    store: LockStore,
    id: LockId,
    stop: Arc<AtomicBool>,
    /// Held by the refresher while it rewrites the file, so a drop cannot
    /// race a refresh into resurrecting the lock.
    writing: Arc<std::sync::Mutex<()>>,
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        let _g = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.store.remove(&self.id);
    }
}

fn is_stale(l: &LockInfo, host: &str, now: Time) -> bool {
    if l.host == host {
        // kill(pid, 0): ESRCH means the process is gone.
        return match rustix::process::Pid::from_raw(l.pid as i32) {
            Some(pid) => rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH),
            None => true,
        };
    }
    now.secs.saturating_sub(l.time.secs) > STALE_AFTER.as_secs() as i64
}

/// Other live locks in the repository (stale ones are removed). A lock
/// that exists but cannot be read fails the caller: it is never taken for
/// absent.
fn others(store: &LockStore, mine: &LockId) -> Result<Vec<LockInfo>> {
    let host = Repo::hostname();
    let now = Time::now();
    let mut out = Vec::new();
    for id in store.ids()? {
        if id == *mine {
            continue;
        }
        let Some(data) = store.read(&id)? else {
            continue; // removed meanwhile
        };
        match store.decode::<LockInfo>(&id, &data) {
            Ok(l) if !is_stale(&l, &host, now) => out.push(l),
            Ok(_) => {
                let _ = store.remove(&id);
            }
            // A lock written by a newer laybak: respect it, we cannot judge it.
            Err(_) if data.len() >= 8 && data[7] > format::FORMAT_VERSION => out.push(LockInfo {
                host: "?".into(),
                pid: 0,
                time: now,
                exclusive: true,
                what: "a newer laybak".into(),
            }),
            Err(_) => {
                let _ = store.remove(&id);
            }
        }
    }
    Ok(out)
}

fn take<'r>(repo: &'r Repo, exclusive: bool, what: &str) -> Result<Lock<'r>> {
    let info = LockInfo {
        host: Repo::hostname(),
        pid: std::process::id(),
        time: Time::now(),
        exclusive,
        what: what.to_string(),
    };
    // Unique per taker (never overwritten by another), so locking is
    // correct on stores whose create-if-absent is not atomic.
    let store = repo.locks();
    let id = store.new_id(&format!("{:?}{}{}", info.time, info.pid, info.host));
    let data = store.encode(&id, &info)?;
    store
        .write(&id, &data)
        .with_context(|| format!("cannot write a lock to {}", repo.location.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = Arc::new(std::sync::Mutex::new(()));
    let lock = Lock {
        _repo: std::marker::PhantomData,
        store: store.clone(),
        id,
        stop: stop.clone(),
        writing: writing.clone(),
    };
    // Refresh the lock while held, so other hosts do not take it for stale.
    std::thread::spawn(move || {
        let mut slept = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(500));
            slept += Duration::from_millis(500);
            if slept >= REFRESH_EVERY {
                let _g = writing.lock().unwrap_or_else(|e| e.into_inner());
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                slept = Duration::ZERO;
                let mut i = info.clone();
                i.time = Time::now();
                if let Ok(d) = store.encode(&id, &i) {
                    let _ = store.write(&id, &d);
                }
            }
        }
    });
    Ok(lock)
}

/// Take a shared lock, waiting up to `wait` while an exclusive lock (prune)
/// is held.
///
/// # Errors
/// Still excluded after `wait` (exit code 11), or the lock cannot be written.
pub fn shared<'r>(repo: &'r Repo, what: &str, wait: Duration) -> Result<Lock<'r>> {
    let start = std::time::Instant::now();
    loop {
        let lock = take(repo, false, what)?;
        let blocking: Vec<LockInfo> = others(&lock.store, &lock.id)?
            .into_iter()
            .filter(|l| l.exclusive)
            .collect();
        if blocking.is_empty() {
            return Ok(lock);
        }
        drop(lock);
        if start.elapsed() >= wait {
            return Err(crate::error::Busy(format!(
                "the repository is locked by {}; try again when it has finished",
                blocking[0].describe()
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Take an exclusive lock: no other live lock may exist.
///
/// # Errors
/// Another live lock exists (exit code 11).
pub fn exclusive<'r>(repo: &'r Repo, what: &str) -> Result<Lock<'r>> {
    let lock = take(repo, true, what)?;
    let other = others(&lock.store, &lock.id)?;
    if let Some(o) = other.first() {
        let msg = format!(
            "the repository is in use by {}; try again when it has finished",
            o.describe()
        );
        drop(lock);
        return Err(crate::error::Busy(msg).into());
    }
    Ok(lock)
}

/// Take an exclusive lock, waiting up to `wait` for other holders (running
/// snapshots) to finish. While it waits, its attempts make new shared
/// lockers back off for a moment, so a steady stream of short snapshots
/// cannot starve it.
///
/// # Errors
/// Still not alone after `wait` (exit code 11).
pub fn exclusive_waiting<'r>(repo: &'r Repo, what: &str, wait: Duration) -> Result<Lock<'r>> {
    let start = std::time::Instant::now();
    loop {
        match exclusive(repo, what) {
            Err(e)
                if crate::error::kind(&e) == crate::error::Kind::Busy && start.elapsed() < wait =>
            {
                std::thread::sleep(Duration::from_millis(300));
            }
            r => return r,
        }
    }
}

/// A shared lock that no other holder with the same `what` may have at the
/// same time (prune's planning: two prunes must not plan at once).
///
/// # Errors
/// Another holder of `what`, an exclusive lock past `wait`, or the lock
/// cannot be written.
pub fn shared_sole<'r>(repo: &'r Repo, what: &str, wait: Duration) -> Result<Lock<'r>> {
    let lock = shared(repo, what, wait)?;
    if let Some(o) = others(&lock.store, &lock.id)?
        .into_iter()
        .find(|o| o.what == what)
    {
        drop(lock);
        return Err(crate::error::Busy(format!(
            "the repository is being pruned by {}; try again when it has finished",
            o.describe()
        ))
        .into());
    }
    Ok(lock)
}

/// A shared lock for commands that only read (restore, mount, check,
/// diff). A repository this process cannot write to (read-only media,
/// permissions) is read without a lock: nobody can prune it through us.
///
/// # Errors
/// An exclusive lock is held past `wait`.
pub fn for_reading<'r>(repo: &'r Repo, what: &str, wait: Duration) -> Result<Option<Lock<'r>>> {
    match shared(repo, what, wait) {
        Ok(l) => Ok(Some(l)),
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<crate::backend::Error>().is_some_and(|e| {
                    matches!(
                        e.kind(),
                        crate::backend::ErrorKind::Denied | crate::backend::ErrorKind::ReadOnly
                    )
                })
            }) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
