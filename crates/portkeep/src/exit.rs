//! Exit statuses, so that scripts can tell outcomes apart.

use std::process::ExitCode;

/// The server answered SUCCESS.
pub(crate) const SUCCESS: u8 = 0;
/// I/O or other failure outside the protocol.
pub(crate) const FAILURE: u8 = 1;
/// The server answered with an error result code (RFC 6887 section 7.4).
pub(crate) const PCP_ERROR: u8 = 2;
/// No response within `--timeout` (RFC 6887 section 8.1.1 MRD).
pub(crate) const TIMEOUT: u8 = 3;
/// Bad command line (sysexits EX_USAGE).
pub(crate) const USAGE: u8 = 64;

/// Reports a command-line error. clap exits 2 on its own, which here
/// means "PCP error", so help and version are the only non-errors.
pub(crate) fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    // If stderr is gone there is nobody to tell.
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::from(SUCCESS),
        _ => ExitCode::from(USAGE),
    }
}
