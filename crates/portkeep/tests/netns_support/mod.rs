//! Helpers shared by the agent's network-namespace tests: the binaries,
//! polling with a deadline, and `ip`.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

pub(crate) fn cli_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portkeep"))
}

pub(crate) fn daemon_bin() -> PathBuf {
    let bin = cli_bin().with_file_name("portkeepd");
    assert!(
        bin.is_file(),
        "the `portkeepd` binary is missing at {}: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

pub(crate) fn wait_until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn ip_ok(args: &[&str]) {
    assert!(ip(args), "ip {args:?} failed");
}
