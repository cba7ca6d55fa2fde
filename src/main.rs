//! The `laybak` binary: parse, run, print one line on error, exit with a
//! documented code (see the README).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match laybak::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line, then where to look.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("laybak: {first} (see `laybak --help`)");
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match laybak::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("laybak: {e:#}");
            ExitCode::from(laybak::error::exit_code(&e))
        }
    }
}
