//! The clock, polling, the binaries under test, a `portkeepd` process
//! asked through `portkeepd ctl`, and the agent's control socket.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The clock, read in one place (the workspace's clippy configuration
/// reserves `Instant::now` for explicit boundaries).
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}

/// The wall clock, in milliseconds since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Polls `f` every 20 ms until it returns a value; panics naming `what`
/// after `within`.
pub fn wait_until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `portkeepd` daemon and the `portkeep` CLI that cargo built. A test
/// knows the path of its own crate's binary only
/// (`env!("CARGO_BIN_EXE_...")`); the other one is its sibling in the same
/// target directory, there after `cargo build --workspace --bins`.
#[derive(Debug, Clone)]
pub struct Bins {
    daemon: PathBuf,
    cli: PathBuf,
}

impl Bins {
    /// From a test of the `portkeepd` crate: the daemon's path.
    pub fn from_daemon(daemon: &str) -> Bins {
        let daemon = PathBuf::from(daemon);
        Bins {
            cli: sibling(&daemon, "portkeep"),
            daemon,
        }
    }

    /// From a test of the `portkeep` crate: the CLI's path.
    pub fn from_cli(cli: &str) -> Bins {
        let cli = PathBuf::from(cli);
        Bins {
            daemon: sibling(&cli, "portkeepd"),
            cli,
        }
    }

    /// The `portkeepd` binary; panics, saying how to build it, if missing.
    pub fn daemon(&self) -> &Path {
        built(&self.daemon, "portkeepd")
    }

    /// The `portkeep` CLI; panics, saying how to build it, if missing.
    pub fn cli(&self) -> &Path {
        built(&self.cli, "portkeep")
    }
}

fn sibling(bin: &Path, name: &str) -> PathBuf {
    bin.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

fn built<'a>(bin: &'a Path, name: &str) -> &'a Path {
    assert!(
        bin.is_file(),
        "the `{name}` binary is missing at {}: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// `portkeepd gen-certs DIR NAMES...`: a CA and a certificate per node.
pub fn gen_certs(daemon: &Path, dir: &Path, names: &[&str]) {
    let out = Command::new(daemon)
        .arg("gen-certs")
        .arg(dir)
        .args(names)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// `portkeepd ctl --data-dir DATA --json ARGS` (the control socket is a
/// file in the data directory: no namespace needed); `None` if it does
/// not answer with JSON.
pub fn ctl_json(daemon: &Path, data: &Path, args: &[&str]) -> Option<Value> {
    let out = Command::new(daemon)
        .arg("ctl")
        .arg("--data-dir")
        .arg(data)
        .arg("--json")
        .args(args)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// A running `portkeepd`, started directly or through `ip netns exec`
/// (which execs it: the child's pid is the daemon's), known by its data
/// directory and its log file. Killed and reaped on drop.
#[derive(Debug)]
pub struct Portkeepd {
    /// Names it in failure messages.
    pub name: String,
    daemon: PathBuf,
    /// Its data directory, where `ctl` finds its control socket.
    pub data: PathBuf,
    /// Where its output goes (as the caller's command says).
    pub log: PathBuf,
    child: Option<Child>,
}

impl Portkeepd {
    /// Spawns `cmd`, which runs the daemon `daemon` with data directory
    /// `data` and writes its log to `log`.
    pub fn spawn(
        name: &str,
        daemon: &Path,
        cmd: &mut Command,
        data: PathBuf,
        log: PathBuf,
    ) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        Portkeepd {
            name: name.to_owned(),
            daemon: daemon.to_owned(),
            data,
            log,
            child: Some(child),
        }
    }

    /// `ctl --json ARGS`; `None` if it does not answer.
    pub fn try_ctl(&self, args: &[&str]) -> Option<Value> {
        ctl_json(&self.daemon, &self.data, args)
    }

    /// `ctl --json ARGS`, which must answer.
    pub fn ctl(&self, args: &[&str]) -> Value {
        self.try_ctl(args)
            .unwrap_or_else(|| panic!("{}: ctl {args:?} failed; log:\n{}", self.name, self.log()))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits, polling every 20 ms, until its `status` satisfies `ok`;
    /// panics if it exits first or `within` passes.
    pub fn wait(&mut self, within: Duration, what: &str, ok: impl Fn(&Value) -> bool) {
        let deadline = now() + within;
        loop {
            if let Some(st) = self.exited() {
                panic!(
                    "{} exited ({st}) waiting for {what}:\n{}",
                    self.name,
                    self.log()
                );
            }
            let status = self.try_ctl(&["status"]);
            if status.as_ref().is_some_and(&ok) {
                return;
            }
            if now() > deadline {
                match status {
                    Some(s) => panic!(
                        "{}: no {what} within {within:?}; status {s:#}\nlog:\n{}",
                        self.name,
                        self.log()
                    ),
                    None => panic!("{}: no {what}; log:\n{}", self.name, self.log()),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Its pid, while it is ours.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (e.g. "STOP") with kill(1), which must succeed.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{sig} {pid} failed");
        }
    }

    /// Sends `sig` and reaps the process.
    pub fn stop(&mut self, sig: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Portkeepd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process must be continued to die cleanly.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
        }
        self.kill9();
    }
}

/// Child processes killed and reaped on drop.
#[derive(Debug, Default)]
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request to `portkeep agent`'s control socket `sock` and its
/// answer; `None` if the agent does not answer.
pub fn agent_call(sock: &Path, req: &Value) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    writeln!(s, "{req}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}
