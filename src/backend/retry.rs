//! A decorator that retries transient errors with exponential backoff and
//! jitter, for as long as a time budget allows. Object stores go through
//! spells where every request fails (a Garage cluster answers 503 for
//! 20–31 s after a node rejoins); the budget rides them out, and when it is
//! spent the caller gets the last error, still classified as transient.
//!
//! Every operation of a laybak backend can be retried: objects are written
//! whole under names derived from their bytes (a repeated put writes the
//! same bytes), deletes are idempotent. A retried `put_if_absent` whose
//! first attempt landed reports [`Created::Existed`]; laybak never relies
//! on that answer for correctness.

use super::{Backend, Created, Entry, ErrorKind, Result};
use std::time::{Duration, Instant};

/// Retries [`ErrorKind::Transient`] failures of the wrapped backend.
pub struct Retrying<B> {
    inner: B,
    budget: Duration,
    first: Duration,
    max: Duration,
}

impl<B: Backend> Retrying<B> {
    /// Retry for up to `budget` per operation.
    pub fn new(inner: B, budget: Duration) -> Retrying<B> {
        Retrying {
            inner,
            budget,
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }

    fn run<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let mut delay = self.first;
        let mut tries = 0u32;
        loop {
            match f() {
                Err(e) if e.kind() == ErrorKind::Transient => {
                    tries += 1;
                    // Full jitter from the clock's low bits: hosts that
                    // failed together do not retry together.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0);
                    let sleep = delay.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0);
                    if start.elapsed() + sleep > self.budget {
                        if std::env::var_os("LAYBAK_DEBUG").is_some() {
                            eprintln!("laybak: {what}: giving up after {tries} tries: {e}");
                        }
                        return Err(e);
                    }
                    if std::env::var_os("LAYBAK_DEBUG").is_some() {
                        eprintln!("laybak: {what}: {e}; retrying in {sleep:?}");
                    }
                    std::thread::sleep(sleep);
                    delay = (delay * 2).min(self.max);
                }
                r => return r,
            }
        }
    }
}

impl<B: Backend> Backend for Retrying<B> {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.run(name, || self.inner.get(name))
    }
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.run(name, || self.inner.get_range(name, offset, len))
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.run(name, || self.inner.put(name, data))
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        self.run(name, || self.inner.put_if_absent(name, data))
    }
    fn put_ephemeral(&self, name: &str, data: &[u8]) -> Result<()> {
        self.run(name, || self.inner.put_ephemeral(name, data))
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        self.run(prefix, || self.inner.list(prefix))
    }
    fn exists(&self, name: &str) -> Result<bool> {
        self.run(name, || self.inner.exists(name))
    }
    fn delete(&self, name: &str) -> Result<()> {
        self.run(name, || self.inner.delete(name))
    }
    fn delete_ephemeral(&self, name: &str) -> Result<()> {
        self.run(name, || self.inner.delete_ephemeral(name))
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
    use crate::backend::Error;
    use crate::backend::testing::Memory;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        inner: Memory,
        fails: AtomicU32,
        kind: ErrorKind,
    }
    impl Backend for Flaky {
        fn get(&self, name: &str) -> Result<Vec<u8>> {
            if self.fails.load(Ordering::SeqCst) > 0 {
                self.fails.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::new(self.kind, "503 no quorum"));
            }
            self.inner.get(name)
        }
        fn get_range(&self, n: &str, o: u64, l: u64) -> Result<Vec<u8>> {
            self.inner.get_range(n, o, l)
        }
        fn put(&self, n: &str, d: &[u8]) -> Result<()> {
            self.inner.put(n, d)
        }
        fn put_if_absent(&self, n: &str, d: &[u8]) -> Result<Created> {
            self.inner.put_if_absent(n, d)
        }
        fn list(&self, p: &str) -> Result<Vec<Entry>> {
            self.inner.list(p)
        }
        fn exists(&self, n: &str) -> Result<bool> {
            self.inner.exists(n)
        }
        fn delete(&self, n: &str) -> Result<()> {
            self.inner.delete(n)
        }
    }

    fn flaky(fails: u32, kind: ErrorKind) -> Retrying<Flaky> {
        let inner = Memory::new();
        inner.put("a/b", b"x").unwrap();
        let mut r = Retrying::new(
            Flaky {
                inner,
                fails: AtomicU32::new(fails),
                kind,
            },
            Duration::from_secs(2),
        );
        r.first = Duration::from_millis(1);
        r.max = Duration::from_millis(4);
        r
    }

    #[test]
    fn transient_errors_are_retried_until_the_budget_ends() {
        assert_eq!(flaky(5, ErrorKind::Transient).get("a/b").unwrap(), b"x");
        let r = flaky(u32::MAX, ErrorKind::Transient);
        let e = r.get("a/b").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transient);
        // Other kinds fail at once.
        let r = flaky(1, ErrorKind::Denied);
        assert_eq!(r.get("a/b").unwrap_err().kind(), ErrorKind::Denied);
        assert_eq!(r.inner.fails.load(Ordering::SeqCst), 0);
    }
}
