//! `aer`: the Aurae command-line client.
//!
//! Subcommands mirror the API: `aer run` (RunExecutable), `aer cell …` (Cells),
//! `aer executable …`, `aer vm …`, `aer instance …`, `aer pod …`, `aer events`, plus
//! `aer pki …` for the development PKI and `aer health` / `aer info` / `aer shutdown`.
//! `--instance a/b` runs any of them in a spawned instance, through the daemons above it.
#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod help;
mod instance_path;
mod output;
mod progress;
mod time;
// `aer top` (a module of `cmd` in all but where it is declared).
mod units;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `aer run` / `aer run-cell` refuse bad flags with 125, as podman (see `cmd::attach`).
    let args = match cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) => return cmd::attach::refused(&e),
    };
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("aer: a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aer: {}", aurae_client::errors::chain_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
