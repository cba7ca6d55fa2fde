//! Where stored bytes live: the [`Backend`] trait, its classified
//! [`Error`], and its implementations — a local directory ([`local`]), an S3-compatible object store ([`s3`]), an
//! S3-compatible object store ([`s3`]), a retrying decorator ([`retry`]) and
//! the backends tests and fuzzing use ([`testing`]).
//!
//! Only [`crate::repo`] talks to a backend; everything else goes through
//! the repository, which names objects, derives their ids and verifies what
//! it reads.
//!
//! Every object is immutable once written (locks and a repository's
//! `config` excepted), and `put` is atomic and durable: after it returns the
//! object is complete on stable storage, and a crash during it leaves
//! either nothing or the whole object under its name. Correctness never
//! rests on [`Backend::put_if_absent`] being atomic: some object stores
//! (Garage) accept it and overwrite anyway.

pub mod local;
pub mod retry;
pub mod s3;
pub mod testing;

pub use local::{LocalBackend, atomic_write, make_private, private_dirs, sync_dir};

use std::fmt;

/// What went wrong, as far as a caller needs to decide what to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist (the only kind that means "absent").
    NotFound,
    /// Worth retrying: a timeout, a dropped connection, a server that is
    /// busy or has no quorum right now.
    Transient,
    /// Retrying will not help: corrupt request, server error, full disk.
    Permanent,
    /// Credentials or permissions refuse the operation.
    Denied,
    /// The storage is read-only (a write-protected medium or bucket).
    ReadOnly,
}

/// A classified storage error. `Display` is the one line users see.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// Classify an I/O error, keeping its message.
    pub fn io(e: std::io::Error) -> Error {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::Denied,
            K::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            K::Interrupted | K::TimedOut | K::WouldBlock => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        };
        Error {
            kind,
            msg: e.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// Its classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the object is simply absent.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::io(e)
    }
}

/// Result of a backend operation.
pub type Result<T> = std::result::Result<T, Error>;

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Name relative to the listed prefix.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// Outcome of [`Backend::put_if_absent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// This call created the object.
    Yes,
    /// An object of that name existed; nothing was written.
    Existed,
}

/// Object storage used by a repository. Names are `/`-separated relative
/// paths such as `snapshots/<hex>` or `packs/ab/<hex>`, built only by the
/// repository. Implementations are blocking and callable from many threads
/// at once.
pub trait Backend: Send + Sync {
    /// Read a whole object.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when absent, another kind otherwise.
    fn get(&self, name: &str) -> Result<Vec<u8>>;
    /// Read `len` bytes at `offset`; a short object is an error.
    ///
    /// # Errors
    /// As [`Backend::get`].
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Store an object atomically and durably, replacing any previous one.
    ///
    /// # Errors
    /// Any failure; on error no partial object is visible under `name`.
    fn put(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Store an object unless one of that name exists. Only a hint where
    /// [`Backend::atomic_create`] is false: two racers may both see
    /// [`Created::Yes`].
    ///
    /// # Errors
    /// As [`Backend::put`].
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created>;
    /// Store a short-lived object (a lock) atomically but without forcing
    /// it to stable storage: after a power cut it may be gone, which is
    /// right for a lock whose holder died too.
    ///
    /// # Errors
    /// As [`Backend::put`].
    fn put_ephemeral(&self, name: &str, data: &[u8]) -> Result<()> {
        self.put(name, data)
    }
    /// All objects under `prefix` (recursively), named relative to it,
    /// sorted by name. A prefix with nothing under it lists as empty.
    ///
    /// # Errors
    /// The listing failed.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;
    /// Whether an object exists.
    ///
    /// # Errors
    /// Any failure other than absence.
    fn exists(&self, name: &str) -> Result<bool>;
    /// Delete an object; deleting a missing object is not an error.
    ///
    /// # Errors
    /// Any failure.
    fn delete(&self, name: &str) -> Result<()>;
    /// Delete a short-lived object without forcing the deletion to stable
    /// storage.
    ///
    /// # Errors
    /// As [`Backend::delete`].
    fn delete_ephemeral(&self, name: &str) -> Result<()> {
        self.delete(name)
    }
    /// Whether [`Backend::put_if_absent`] is linearizable here.
    fn atomic_create(&self) -> bool {
        true
    }
    /// Whether every request costs a network round trip, so readers should
    /// fetch whole packs rather than one range per blob.
    fn round_trips(&self) -> bool {
        false
    }
}

/// Reject names that could leave the repository or that no object store
/// would keep apart: empty, absolute, `.`/`..` or empty components.
///
/// # Errors
/// The name is not a plain relative object name.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::new(
            ErrorKind::Permanent,
            format!("invalid object name {name:?}"),
        ));
    }
    Ok(())
}

impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        (**self).get(name)
    }
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        (**self).get_range(name, offset, len)
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        (**self).put(name, data)
    }
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Created> {
        (**self).put_if_absent(name, data)
    }
    fn put_ephemeral(&self, name: &str, data: &[u8]) -> Result<()> {
        (**self).put_ephemeral(name, data)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        (**self).list(prefix)
    }
    fn exists(&self, name: &str) -> Result<bool> {
        (**self).exists(name)
    }
    fn delete(&self, name: &str) -> Result<()> {
        (**self).delete(name)
    }
    fn delete_ephemeral(&self, name: &str) -> Result<()> {
        (**self).delete_ephemeral(name)
    }
    fn atomic_create(&self) -> bool {
        (**self).atomic_create()
    }
    fn round_trips(&self) -> bool {
        (**self).round_trips()
    }
}
