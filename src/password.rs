//! Where passwords come from: a file, a command, `LAYBAK_PASSWORD`, or a
//! prompt on the terminal; never the command line, where every local user
//! could read it in `/proc`.

use crate::error::{Error, Kind};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// A password, wiped from memory when dropped.
pub type Password = Zeroizing<String>;

/// Gives the password of an encrypted repository when it is opened.
pub trait Passwords {
    /// The password of the repository at `location` (asked only when the
    /// repository is encrypted).
    ///
    /// # Errors
    /// None was given ([`Kind::Password`]) or its source failed.
    fn current(&self, location: &str) -> Result<Password>;
}

/// For callers that only open plaintext repositories.
pub struct NoPassword;

impl Passwords for NoPassword {
    fn current(&self, location: &str) -> Result<Password> {
        Err(Error::new(
            Kind::Password,
            format!("repository {location} is encrypted and no password was given"),
        )
        .into())
    }
}

/// A password already at hand (tests, library callers).
pub struct Given(pub Password);

impl Passwords for Given {
    fn current(&self, _: &str) -> Result<Password> {
        Ok(self.0.clone())
    }
}

/// The sources a command line names: `--password-file`
/// (`LAYBAK_PASSWORD_FILE`), `--password-command`
/// (`LAYBAK_PASSWORD_COMMAND`), then `LAYBAK_PASSWORD`, then the terminal.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// A file holding the password (one trailing newline is dropped).
    pub file: Option<PathBuf>,
    /// A shell command printing the password.
    pub command: Option<String>,
}

impl Source {
    /// The password from the first source given, without a prompt.
    /// A source that fails (a missing file, a failing command) is a
    /// password problem ([`Kind::Password`]): nothing is done without one.
    fn given(&self) -> Result<Option<Password>> {
        let got = if let Some(f) = &self.file {
            read_file(f).map(Some)
        } else if let Some(c) = &self.command {
            run_command(c).map(Some)
        } else {
            Ok(std::env::var("LAYBAK_PASSWORD").ok().map(Zeroizing::new))
        };
        got.map_err(|e| Error::new(Kind::Password, format!("{e:#}")).into())
    }

    /// The password for a new repository: from the sources, or asked
    /// twice on the terminal.
    ///
    /// # Errors
    /// None given and no terminal, the two answers differ, or it is empty.
    pub fn new_password(&self, location: &str) -> Result<Password> {
        let p = match self.given()? {
            Some(p) => p,
            None => ask_twice(&format!("new password for {location}"))?.ok_or_else(|| {
                needed(
                    "a new repository is encrypted: give its password with --password-file FILE (or LAYBAK_PASSWORD_FILE), --password-command CMD or LAYBAK_PASSWORD, or run on a terminal; `init --no-encryption` makes a plaintext one".into(),
                )
            })?,
        };
        non_empty(p)
    }
}

impl Passwords for Source {
    fn current(&self, location: &str) -> Result<Password> {
        if let Some(p) = self.given()? {
            return Ok(p);
        }
        prompt(&format!("password for {location}: "))?.ok_or_else(|| {
            needed(format!(
                "repository {location} is encrypted: give its password with --password-file FILE (or LAYBAK_PASSWORD_FILE), --password-command CMD or LAYBAK_PASSWORD"
            ))
        })
    }
}

/// A new password for `key add` / `key passwd`: `--new-password-file`
/// (`LAYBAK_NEW_PASSWORD_FILE`), `LAYBAK_NEW_PASSWORD`, or asked twice.
///
/// # Errors
/// As [`Source::new_password`].
pub fn new_key_password(file: Option<&Path>) -> Result<Password> {
    let p = if let Some(f) = file {
        read_file(f)?
    } else if let Ok(p) = std::env::var("LAYBAK_NEW_PASSWORD") {
        Zeroizing::new(p)
    } else {
        ask_twice("new password")?.ok_or_else(|| {
            needed("give the new password with --new-password-file FILE (or LAYBAK_NEW_PASSWORD_FILE) or LAYBAK_NEW_PASSWORD, or run on a terminal".into())
        })?
    };
    non_empty(p)
}

fn needed(msg: String) -> anyhow::Error {
    Error::new(Kind::Password, msg).into()
}

fn non_empty(p: Password) -> Result<Password> {
    if p.is_empty() {
        bail!("the password is empty: choose a non-empty one");
    }
    Ok(p)
}

/// Drop one trailing `\n` or `\r\n`.
fn chomp(mut s: String) -> Password {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Zeroizing::new(s)
}

fn read_file(path: &Path) -> Result<Password> {
    let mut s = Zeroizing::new(String::new());
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .with_context(|| format!("cannot read the password file {}", path.display()))?;
    Ok(chomp(std::mem::take(&mut *s)))
}

fn run_command(cmd: &str) -> Result<Password> {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run the password command {cmd:?}"))?;
    let stdout = Zeroizing::new(out.stdout);
    if !out.status.success() {
        bail!("the password command {cmd:?} failed ({})", out.status);
    }
    let s = String::from_utf8(stdout.to_vec())
        .with_context(|| format!("the password command {cmd:?} printed something not UTF-8"))?;
    Ok(chomp(s))
}

/// Ask on the controlling terminal with echo off; `None` without one.
fn prompt(question: &str) -> Result<Option<Password>> {
    let Ok(mut tty) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    else {
        return Ok(None);
    };
    let saved = rustix::termios::tcgetattr(&tty).ok();
    if let Some(t) = &saved {
        let mut quiet = t.clone();
        quiet.local_modes -= rustix::termios::LocalModes::ECHO;
        let _ = rustix::termios::tcsetattr(&tty, rustix::termios::OptionalActions::Now, &quiet);
    }
    let _ = tty.write_all(question.as_bytes());
    let mut line = Zeroizing::new(Vec::new());
    let mut b = [0u8; 1];
    let read = loop {
        match tty.read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(_) if b[0] == b'\n' => break Ok(()),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    if let Some(t) = &saved {
        let _ = rustix::termios::tcsetattr(&tty, rustix::termios::OptionalActions::Now, t);
    }
    let _ = tty.write_all(b"\n");
    read.context("cannot read the password from the terminal")?;
    let s = String::from_utf8(line.to_vec()).context("the password typed is not UTF-8")?;
    Ok(Some(chomp(s)))
}

fn ask_twice(what: &str) -> Result<Option<Password>> {
    let Some(a) = prompt(&format!("{what}: "))? else {
        return Ok(None);
    };
    let Some(b) = prompt(&format!("{what} again: "))? else {
        return Ok(None);
    };
    if a != b {
        bail!("the two passwords differ: nothing was changed, try again");
    }
    Ok(Some(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_commands_drop_one_newline() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pw");
        std::fs::write(&f, "s3cret\r\n").unwrap();
        assert_eq!(read_file(&f).unwrap().as_str(), "s3cret");
        std::fs::write(&f, "two\n\n").unwrap();
        assert_eq!(read_file(&f).unwrap().as_str(), "two\n");
        assert_eq!(run_command("printf 'x y\\n'").unwrap().as_str(), "x y");
        assert!(run_command("exit 3").is_err());
        let src = Source {
            file: Some(d.path().join("missing")),
            command: None,
        };
        assert!(src.current("r").is_err());
        std::fs::write(&f, "\n").unwrap();
        let src = Source {
            file: Some(f),
            command: None,
        };
        assert!(src.new_password("r").is_err());
    }
}
