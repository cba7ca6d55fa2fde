//! What kind of failure ended a command, and the exit code each kind has.
//! Code raises a typed error where it knows the kind; the exit code is
//! derived from the first typed error in the chain, never from message
//! text. Everything untyped exits 1.
//!
//! | code | meaning |
//! |-----:|---------|
//! | 0 | success |
//! | 1 | the command failed (the message says why) |
//! | 2 | bad command line |
//! | 3 | `check` found damage |
//! | 10 | repository missing or not a laybak repository |
//! | 11 | busy: the volume is in use, or another laybak holds its lock |
//! | 12 | needs root |
//! | 13 | the repository is unreachable right now (retries ran out); nothing was lost, run again later |
//! | 14 | the repository is encrypted and the password is wrong or was not given |

use std::fmt;

/// Kinds of failure a caller (a script, cron) may want to tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Anything else.
    Failed,
    /// Bad command line.
    Usage,
    /// `check` found damage.
    Damaged,
    /// No repository where one was named.
    NoRepository,
    /// A volume or lock is busy.
    Busy,
    /// The command needs root.
    NeedRoot,
    /// The repository's storage did not answer (after retries).
    Unreachable,
    /// Wrong or missing password for an encrypted repository.
    Password,
}

impl Kind {
    /// The documented exit code.
    pub fn code(self) -> u8 {
        match self {
            Kind::Failed => 1,
            Kind::Usage => 2,
            Kind::Damaged => 3,
            Kind::NoRepository => 10,
            Kind::Busy => 11,
            Kind::NeedRoot => 12,
            Kind::Unreachable => 13,
            Kind::Password => 14,
        }
    }
}

/// An error of a known [`Kind`]; `Display` is the message users see, and
/// the cause (if any) is its `source`.
#[derive(Debug)]
pub struct Error {
    /// Its kind.
    pub kind: Kind,
    /// The one-line message.
    pub msg: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: Kind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn caused(
        kind: Kind,
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error {
            kind,
            msg: msg.into(),
            source: Some(Box::new(source)),
        }
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

/// A volume or lock is busy ([`Kind::Busy`]).
#[derive(Debug)]
pub struct Busy(pub String);

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Busy {}

/// The kind of an error chain: the first typed error in it.
pub fn kind(e: &anyhow::Error) -> Kind {
    for cause in e.chain() {
        if cause.downcast_ref::<Busy>().is_some() {
            return Kind::Busy;
        }
        if let Some(c) = cause.downcast_ref::<Error>() {
            return c.kind;
        }
        if let Some(b) = cause.downcast_ref::<crate::backend::Error>()
            && b.kind() == crate::backend::ErrorKind::Transient
        {
            return Kind::Unreachable;
        }
    }
    Kind::Failed
}

/// The exit code for an error chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    kind(e).code()
}

/// Fail unless running as root.
///
/// # Errors
/// Not root ([`Kind::NeedRoot`]).
pub fn need_root(what: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::new(
            Kind::NeedRoot,
            format!("{what} needs root (it mounts filesystems): run it as root"),
        )
        .into());
    }
    Ok(())
}
