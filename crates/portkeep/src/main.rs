//! `portkeep`: the Portkeep PCP client command line.
//!
//! Exit status: 0 SUCCESS, 1 I/O or other failure, 2 PCP error result,
//! 3 timeout, 64 bad arguments (sysexits EX_USAGE). `get` exits 2 with
//! NONEXIST_MAP when the mapping does not exist.

mod agent;
mod cli;
mod exit;
mod natpmp;
mod output;
mod retrieve;
mod run;

use std::process::ExitCode;

use clap::Parser;
use portkeep::parse;

fn main() -> ExitCode {
    match cli::Cli::try_parse() {
        Ok(cli) => run::run(cli),
        Err(e) => exit::clap_error(&e),
    }
}
