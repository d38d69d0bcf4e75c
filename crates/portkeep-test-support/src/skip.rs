//! Tests that this machine cannot run.
//!
//! Some tests need root, a tool (`ip`, `nft`, `conntrack`, `keepalived`,
//! `tshark`, miniupnpd), network namespaces or a free well-known port.
//! When something is missing:
//!
//! - under CI (`CI` set, and not empty, `0` or `false`) the test fails,
//!   naming what is missing: CI installs everything these tests need
//!   (`scripts/test-all.sh`), so a missing piece is a broken setup, never
//!   a pass;
//! - elsewhere the test says `SKIPPED` on stderr and returns, and, if
//!   `PORTKEEP_SKIP_LOG` names a file, appends one line to it (test and
//!   reason), so that `scripts/test-all.sh` can count and list the skips
//!   that `cargo test` would otherwise hide.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The variable naming the file each skip is appended to.
pub const SKIP_LOG_ENV: &str = "PORTKEEP_SKIP_LOG";

/// Whether this is a CI run: `CI` set to anything but empty, `0` or
/// `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim();
        !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
    })
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `name` on `PATH`, as the tests run it (`ip netns exec NS nft ...`
/// looks it up the same way).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The Debian package that brings `tool`.
fn package_of(tool: &str) -> &str {
    match tool {
        "ip" => "iproute2",
        "nft" => "nftables",
        "sysctl" => "procps",
        "miniupnpd" => "miniupnpd-nftables",
        other => other,
    }
}

/// Why a test that needs root and `tools` cannot run here, if it cannot.
pub fn missing(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not root (network namespaces and captures need it)".into());
    }
    tools.iter().find(|t| find_tool(t).is_none()).map(|t| {
        format!(
            "`{t}` not found on PATH (scripts/test-all.sh installs it as root: apt-get install {})",
            package_of(t)
        )
    })
}

/// Whether the test can run: root and every one of `tools`. If not, the
/// test is skipped as [`skip`] says (under CI: it fails here).
pub fn require(what: &str, tools: &[&str]) -> bool {
    match missing(tools) {
        None => true,
        Some(reason) => {
            skip(what, &reason);
            false
        }
    }
}

/// The test calling this cannot run here because of `reason`. Under CI
/// this panics, failing the test; elsewhere it prints `SKIPPED` and
/// records the skip, and the caller returns (or, for a part of a test,
/// goes on without that part).
pub fn skip(what: &str, reason: &str) {
    let test = current_test();
    if in_ci() {
        panic!(
            "{test}: {what}: cannot run: {reason}\n\
             (CI is set: a test that cannot run fails instead of skipping)"
        );
    }
    eprintln!("\n*** SKIPPED: {what}: {reason} ***\n");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
        let line = format!("{test}: {what}: {}\n", reason.replace('\n', " "));
        // One write of one short line to a file opened for appending:
        // lines from tests running at once do not interleave.
        let written = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "cannot record the skip in {}: {e}",
                Path::new(&path).display()
            );
        }
    }
}

/// `BINARY::TEST` for the running test: the test binary's name without
/// cargo's hash, and the thread's name, which libtest sets to the test's.
fn current_test() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let binary = match exe.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => exe,
    };
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if name != "main" => format!("{binary}::{name}"),
        _ => binary,
    }
}
