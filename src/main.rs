//! The `laybak` binary: parse, run, print one line on error, exit with a
//! documented code (see the README).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match laybak::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
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
