//! Backends for tests and fuzzing: an in-memory store, a fault injector,
//! and a crash simulator. They are part of the library (not `cfg(test)`)
//! so integration tests and fuzz targets use the same ones. Nothing in
//! laybak's own commands uses them.

use super::{Backend, Created, Entry, Error, ErrorKind, Result, check_name};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Objects in memory. Every operation is atomic; `put_if_absent` is
/// linearizable.
#[derive(Default)]
pub struct Memory {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl Memory {
    /// An empty store.
    pub fn new() -> Memory {
        Memory::default()
    }

    /// A copy of every object (for comparing states).
    pub fn dump(&self) -> BTreeMap<String, Vec<u8>> {
        lock(&self.objects).clone()
    }

    /// A store holding exactly `objects`.
    pub fn from_dump(objects: BTreeMap<String, Vec<u8>>) -> Memory {
        Memory {
            objects: Mutex::new(objects),
        }
    }
}

fn absent(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("{name}: no such object"))
}

impl Backend for Memory {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        check_name(name)?;
        lock(&self.objects)
            .get(name)
            .cloned()
            .ok_or_else(|| absent(name))
    }
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let o = lock(&self.objects);
        let d = o.get(name).ok_or_else(|| absent(name))?;
        let end = offset.checked_add(len).filter(|&e| e <= d.len() as u64);
        match end {
            Some(end) => Ok(d[offset as usize..end as usize].to_vec()),
            None => Err(Error::new(
                ErrorKind::Permanent,
                format!("{name}: cannot read {len} bytes at {offset}: object is shorter"),
            )),
        }
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        lock(&self.objects).insert(name.to_string(), data.to_vec());
        Ok(())
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        check_name(name)?;
        let mut o = lock(&self.objects);
        if o.contains_key(name) {
            return Ok(Created::Existed);
        }
        o.insert(name.to_string(), data.to_vec());
        Ok(Created::Yes)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let p = format!("{prefix}/");
        Ok(lock(&self.objects)
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
            .map(|(k, v)| Entry {
                name: k[p.len()..].to_string(),
                size: v.len() as u64,
            })
            .collect())
    }
    fn exists(&self, name: &str) -> Result<bool> {
        Ok(lock(&self.objects).contains_key(name))
    }
    fn delete(&self, name: &str) -> Result<()> {
        lock(&self.objects).remove(name);
        Ok(())
    }
}

/// What a [`Faulty`] backend does to the next operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: pass through.
    None,
    /// Ranged reads fail with an I/O error.
    ReadError,
    /// Ranged reads return half the bytes.
    Short,
    /// Ranged reads return the bytes with one bit flipped.
    Flip,
    /// Writes fail as on a full disk.
    NoSpace,
    /// Every operation fails as transient (a server without quorum).
    Unavailable,
}

/// Wraps a backend and injects the [`Fault`] set with [`Faulty::set`].
pub struct Faulty<B> {
    inner: B,
    fault: Mutex<Fault>,
}

impl<B: Backend> Faulty<B> {
    /// Pass-through until a fault is set.
    pub fn new(inner: B) -> Faulty<B> {
        Faulty {
            inner,
            fault: Mutex::new(Fault::None),
        }
    }

    /// Inject `f` from now on.
    pub fn set(&self, f: Fault) {
        *lock(&self.fault) = f;
    }

    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    fn gate(&self, write: bool) -> Result<()> {
        match self.fault() {
            Fault::Unavailable => Err(Error::new(
                ErrorKind::Transient,
                "injected: service unavailable",
            )),
            Fault::NoSpace if write => Err(Error::io(std::io::Error::from_raw_os_error(28))),
            _ => Ok(()),
        }
    }
}

impl<B: Backend> Backend for Faulty<B> {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.gate(false)?;
        self.inner.get(name)
    }
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.gate(false)?;
        let mut d = self.inner.get_range(name, offset, len)?;
        match self.fault() {
            Fault::ReadError => {
                return Err(Error::io(std::io::Error::other("injected EIO")));
            }
            Fault::Short => d.truncate(d.len() / 2),
            Fault::Flip if !d.is_empty() => d[0] ^= 1,
            _ => {}
        }
        Ok(d)
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.gate(true)?;
        self.inner.put(name, data)
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        self.gate(true)?;
        self.inner.put_if_absent(name, data)
    }
    fn put_ephemeral(&self, name: &str, data: &[u8]) -> Result<()> {
        self.gate(true)?;
        self.inner.put_ephemeral(name, data)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        self.gate(false)?;
        self.inner.list(prefix)
    }
    fn exists(&self, name: &str) -> Result<bool> {
        self.gate(false)?;
        self.inner.exists(name)
    }
    fn delete(&self, name: &str) -> Result<()> {
        self.gate(true)?;
        self.inner.delete(name)
    }
    fn delete_ephemeral(&self, name: &str) -> Result<()> {
        self.gate(true)?;
        self.inner.delete_ephemeral(name)
    }
    fn atomic_create(&self) -> bool {
        self.inner.atomic_create()
    }
    fn round_trips(&self) -> bool {
        self.inner.round_trips()
    }
}

/// Simulates a process that dies at a chosen moment: the first `k`
/// changes (puts and deletes, locks included) reach the store; the next
/// one either never happens or happens without its caller learning it
/// did (`after_effect`), and from then on every operation fails, as
/// nothing a dead process does reaches storage.
pub struct CrashAfter<B> {
    inner: B,
    k: u64,
    after_effect: bool,
    done: AtomicU64,
    at: Mutex<Option<String>>,
}

impl<B: Backend> CrashAfter<B> {
    /// Crash at change `k + 1`.
    pub fn new(inner: B, k: u64, after_effect: bool) -> CrashAfter<B> {
        CrashAfter {
            inner,
            k,
            after_effect,
            done: AtomicU64::new(0),
            at: Mutex::new(None),
        }
    }

    /// The change the crash hit (`"put NAME"`, `"delete NAME"`).
    pub fn crash_point(&self) -> Option<String> {
        lock(&self.at).clone()
    }

    /// Whether the crash happened.
    pub fn crashed(&self) -> bool {
        self.done.load(Ordering::SeqCst) > self.k
    }

    /// Changes that reached the store (at most `k`, or `k + 1` with
    /// `after_effect`).
    pub fn changes(&self) -> u64 {
        let d = self.done.load(Ordering::SeqCst);
        if d > self.k {
            self.k + u64::from(self.after_effect)
        } else {
            d
        }
    }

    fn dead() -> Error {
        Error::new(ErrorKind::Permanent, "simulated crash")
    }

    fn read<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.crashed() {
            return Err(Self::dead());
        }
        f()
    }

    fn change<T>(&self, what: &str, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let n = self.done.fetch_add(1, Ordering::SeqCst);
        if n < self.k {
            return f();
        }
        if n == self.k {
            *lock(&self.at) = Some(format!("{what} {name}"));
        }
        if n == self.k && self.after_effect {
            let _ = f();
        }
        Err(Self::dead())
    }
}

impl<B: Backend> Backend for CrashAfter<B> {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.read(|| self.inner.get(name))
    }
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read(|| self.inner.get_range(name, offset, len))
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.change("put", name, || self.inner.put(name, data))
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        self.change("put", name, || self.inner.put_if_absent(name, data))
    }
    fn put_ephemeral(&self, name: &str, data: &[u8]) -> Result<()> {
        self.change("put", name, || self.inner.put_ephemeral(name, data))
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        self.read(|| self.inner.list(prefix))
    }
    fn exists(&self, name: &str) -> Result<bool> {
        self.read(|| self.inner.exists(name))
    }
    fn delete(&self, name: &str) -> Result<()> {
        self.change("delete", name, || self.inner.delete(name))
    }
    fn delete_ephemeral(&self, name: &str) -> Result<()> {
        self.change("delete", name, || self.inner.delete_ephemeral(name))
    }
    fn atomic_create(&self) -> bool {
        self.inner.atomic_create()
    }
    fn round_trips(&self) -> bool {
        self.inner.round_trips()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_behaves_like_a_store() {
        let m = Memory::new();
        m.put("packs/ab/1", b"hello").unwrap();
        m.put("packsx", b"no").unwrap();
        assert_eq!(m.get_range("packs/ab/1", 1, 3).unwrap(), b"ell");
        assert!(m.get_range("packs/ab/1", 3, 3).is_err());
        assert_eq!(m.list("packs").unwrap().len(), 1);
        assert!(m.get("packs/none").unwrap_err().is_not_found());
        assert_eq!(m.put_if_absent("packsx", b"2").unwrap(), Created::Existed);
    }

    #[test]
    fn crash_after_k_stops_everything() {
        let c = CrashAfter::new(Memory::new(), 1, false);
        c.put("a/1", b"1").unwrap();
        assert!(c.put("a/2", b"2").is_err());
        assert!(c.get("a/1").is_err());
        assert_eq!(c.changes(), 1);
        let c = CrashAfter::new(Memory::new(), 0, true);
        assert!(c.put("a/1", b"1").is_err());
        assert_eq!(c.inner.get("a/1").unwrap(), b"1");
    }
}
