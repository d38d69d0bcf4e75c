//! Network-namespace plumbing shared by the root-only tests: whether they
//! can run here, running `ip` and commands in a namespace, and joining a
//! namespace from a thread.

// Each test binary uses a different subset of these helpers. One
// `setns(2)` call: there is no safe wrapper among the dependencies.
#![allow(dead_code, unsafe_code, clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

pub(crate) fn tool(name: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).is_file())
}

/// Why the test cannot run here, if it cannot.
pub(crate) fn skip_reason(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not root (network namespaces need it)".into());
    }
    for t in tools {
        if !tool(t) {
            return Some(format!(
                "`{t}` not found (scripts/test-all.sh installs it: apt-get install keepalived nftables conntrack iproute2)"
            ));
        }
    }
    None
}

pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// Runs a command inside namespace `ns`.
pub(crate) fn ns_exec(ns: &str, args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Runs `f` on a thread that has joined network namespace `ns`; a socket
/// made there stays in that namespace.
pub(crate) fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; it changes only this
        // thread's network namespace, which ends with the thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}
