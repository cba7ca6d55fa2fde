//! Failpoints for crash-consistency tests.
//!
//! `LAYBAK_FAILPOINT=name` makes the process abort (no unwinding, no cleanup,
//! like a power cut from the process's point of view) when it reaches the
//! named step; `LAYBAK_FAILPOINT=name:error` makes the step fail with an I/O
//! error instead, as an unreachable repository would. Unset, a failpoint is
//! one environment lookup.

use anyhow::{Result, bail};

/// Reach the failpoint `name`.
///
/// # Errors
/// When `LAYBAK_FAILPOINT` is `name:error`.
pub fn hit(name: &str) -> Result<()> {
    let Some(v) = std::env::var_os("LAYBAK_FAILPOINT") else {
        return Ok(());
    };
    let v = v.to_string_lossy();
    for spec in v.split(',') {
        let (n, action) = spec.split_once(':').unwrap_or((spec, "abort"));
        if n == name {
            if action == "error" {
                bail!("injected failure at {name}");
            }
            eprintln!("laybak: failpoint {name}: aborting");
            std::process::abort();
        }
    }
    Ok(())
}
