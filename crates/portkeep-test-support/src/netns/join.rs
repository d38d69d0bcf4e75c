//! Joining a network namespace from a thread.

// The one `setns(2)` call of the tests: no dependency offers a safe
// wrapper, so unsafe code is allowed in this module and nowhere else.
#![allow(unsafe_code)]

use std::fs;
use std::os::fd::AsRawFd;

/// Runs `f` on a thread that has joined network namespace `ns`; a socket
/// made there stays in that namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it changes only this
        // thread's network namespace, which ends with the thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}
