//! The `laybak` binary: parse, run, print one line on error, exit with a
//! documented code (see the README).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Everything laybak creates for itself (state, cache, repository files)
    // is private unless it sets a mode explicitly; restore and attach set
    // every mode they mean.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Descriptor-relative walks hold a descriptor per directory level;
    // users can build trees hundreds of levels deep. Use the hard limit.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.current < lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    let cli = match laybak::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line, then where to look.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(|l| l.trim())
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("laybak: {msg} (see `laybak --help`)");
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let res = laybak::cli::run(cli);
    if std::env::var_os("LAYBAK_DEBUG").is_some() && laybak::backend::s3::requests() > 0 {
        eprintln!("laybak: {} S3 requests", laybak::backend::s3::requests());
    }
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever names the message quotes.
            eprintln!("laybak: {}", laybak::layer::escape(&format!("{e:#}")));
            ExitCode::from(laybak::error::exit_code(&e))
        }
    }
}
