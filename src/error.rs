//! Errors that carry a documented exit code. Everything else exits 1.
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

use std::fmt;

/// A volume or lock is busy (exit code 11).
#[derive(Debug)]
pub struct Busy(pub String);

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Busy {}

/// An error with an explicit exit code.
#[derive(Debug)]
pub struct Coded(pub u8, pub String);

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.1)
    }
}
impl std::error::Error for Coded {}

/// The exit code for an error chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<Busy>().is_some() {
            return 11;
        }
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.0;
        }
    }
    let s = e.to_string();
    if s.contains("not a laybak repository") || s.starts_with("no repository at") {
        return 10;
    }
    1
}

/// Fail unless running as root.
///
/// # Errors
/// Not root (exit code 12).
pub fn need_root(what: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(Coded(
            12,
            format!("{what} needs root (it mounts filesystems): run it as root"),
        )
        .into());
    }
    Ok(())
}
