//! The real `portkeepd` and `portkeep` binaries as processes on loopback.
//!
//! Every daemon gets its own ephemeral port and temporary directory, and is
//! killed and reaped when its guard drops, so tests run in parallel safely.

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use portkeep_client::RequestBuilder;
use portkeep_proto::{CodePoints, Response};

use crate::pcp::{free_port, LOCALHOST, LOCALHOST6};
use crate::process::{now, Bins};

/// How long a daemon may take to answer its first ANNOUNCE.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Bind attempts before giving up on finding a free port.
const BIND_ATTEMPTS: usize = 5;

/// The repository's `examples/` directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// A running `portkeepd`, killed and reaped on drop.
#[derive(Debug)]
pub struct Daemon {
    bins: Bins,
    child: Option<Child>,
    /// Where it serves PCP.
    pub addrs: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

/// How to start a daemon.
#[derive(Debug, Default)]
pub struct DaemonSpec<'a> {
    /// TOML written to a file and passed with `--config`.
    pub config: Option<&'a str>,
    /// Loopback addresses to listen on, each on a fresh port (default
    /// 127.0.0.1).
    pub listen_ips: Vec<IpAddr>,
    /// Replaces the whole command line (no `--listen` added); the daemon
    /// is then expected on `fixed_addrs`.
    pub raw_args: Option<Vec<String>>,
    /// With `raw_args`: where the daemon will serve.
    pub fixed_addrs: Vec<SocketAddr>,
}

impl Daemon {
    /// Starts `portkeepd` on fresh loopback ports (default config).
    pub fn start(bins: &Bins) -> Daemon {
        Self::spawn(bins, &DaemonSpec::default())
    }

    /// Starts `portkeepd` with `config` on a fresh 127.0.0.1 port.
    pub fn with_config(bins: &Bins, config: &str) -> Daemon {
        Self::spawn(
            bins,
            &DaemonSpec {
                config: Some(config),
                ..DaemonSpec::default()
            },
        )
    }

    /// Starts a daemon and waits until it answers ANNOUNCE on every listen
    /// address, retrying on a fresh port when the one picked was taken in
    /// the meantime.
    pub fn spawn(bins: &Bins, spec: &DaemonSpec<'_>) -> Daemon {
        Self::try_spawn(bins, spec).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Self::spawn`], but a failure to bind a fixed address (with
    /// `raw_args`) is returned, so that a test can skip.
    pub fn try_spawn(bins: &Bins, spec: &DaemonSpec<'_>) -> Result<Daemon, String> {
        let mut last_log = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let dir = tempfile::tempdir().unwrap();
            let (args, addrs) = match &spec.raw_args {
                Some(a) => (a.clone(), spec.fixed_addrs.clone()),
                None => {
                    let ips = if spec.listen_ips.is_empty() {
                        vec![LOCALHOST]
                    } else {
                        spec.listen_ips.clone()
                    };
                    let addrs: Vec<SocketAddr> = ips
                        .iter()
                        .map(|&ip| SocketAddr::new(ip, free_port(ip)))
                        .collect();
                    let mut args = Vec::new();
                    if let Some(text) = spec.config {
                        let path = dir.path().join("portkeepd.toml");
                        std::fs::write(&path, text).unwrap();
                        args.push("--config".to_owned());
                        args.push(path.display().to_string());
                    }
                    for a in &addrs {
                        args.push("--listen".to_owned());
                        args.push(a.to_string());
                    }
                    (args, addrs)
                }
            };
            let log = File::create(dir.path().join("stderr.log")).unwrap();
            // The default data directory is relative: keep it in the temp dir.
            let child = Command::new(bins.daemon())
                .args(&args)
                .current_dir(dir.path())
                .env_remove("PORTKEEPD_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut d = Daemon {
                bins: bins.clone(),
                child: Some(child),
                addrs,
                dir,
            };
            match d.wait_ready() {
                Ok(()) => return Ok(d),
                Err(log) if log.contains("cannot listen") && spec.raw_args.is_none() => {
                    last_log = log;
                }
                Err(log) if log.contains("cannot listen") => return Err(log),
                Err(log) => panic!("portkeepd {args:?} never became ready; its log:\n{log}"),
            }
        }
        Err(format!(
            "portkeepd could not bind a free port in {BIND_ATTEMPTS} attempts:\n{last_log}"
        ))
    }

    /// Polls every listen address with ANNOUNCE until each answers SUCCESS.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = now() + READY_WITHIN;
        for &addr in &self.addrs.clone() {
            let src = if addr.is_ipv4() {
                LOCALHOST
            } else {
                LOCALHOST6
            };
            let sock = UdpSocket::bind(SocketAddr::new(src, 0)).map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            let req = RequestBuilder::announce()
                .build(src)
                .unwrap()
                .to_bytes(&CodePoints::default())
                .unwrap();
            loop {
                if let Some(status) = self.child_mut().try_wait().map_err(|e| e.to_string())? {
                    return Err(format!("exited with {status}:\n{}", self.log()));
                }
                if now() > deadline {
                    return Err(format!("no ANNOUNCE answer on {addr}:\n{}", self.log()));
                }
                // The port may not be bound yet: a refused send is a retry.
                let _ = sock.send_to(&req, addr);
                let mut buf = [0u8; 1100];
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    // A server configured to speak NAT-PMP only answers
                    // with NAT-PMP's "unsupported version": up too.
                    let natpmp_only = n == 8 && buf[0] == 0 && buf[2..4] == [0, 1];
                    let ok = from == addr
                        && (natpmp_only
                            || Response::parse(&buf[..n], &CodePoints::default())
                                .is_ok_and(|r| r.header.result.0 == 0));
                    if ok {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    /// The first (IPv4) listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// `--server` value for the CLI.
    pub fn server(&self) -> String {
        self.addr().to_string()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.dir.path().join("stderr.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(None))
    }

    /// The daemon's data directory (the default, relative to its working
    /// directory, which is its temp dir).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("portkeep-data")
    }

    /// The configuration file it was started with (`DaemonSpec::config`),
    /// for a test that changes it and reloads.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portkeepd.toml")
    }

    /// Runs `portkeepd ctl --data-dir <its data dir> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> CliRun {
        let dir = self.data_dir();
        let mut all = vec!["ctl", "--data-dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        cli_output(
            Command::new(self.bins.daemon())
                .args(&all)
                .output()
                .unwrap(),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Sends `signal` (e.g. "TERM") with kill(1) and waits up to `within`
    /// for the process to exit; `None` if it did not.
    pub fn signal_and_wait(&mut self, signal: &str, within: Duration) -> Option<ExitStatus> {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {} failed", self.pid());
        let deadline = now() + within;
        loop {
            if let Some(status) = self.child_mut().try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The outcome of one `portkeep` run.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

fn cli_output(out: Output) -> CliRun {
    CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Bins {
    /// Runs `portkeep ARGS`.
    pub fn run_cli(&self, args: &[&str]) -> CliRun {
        cli_output(Command::new(self.cli()).args(args).output().unwrap())
    }

    /// Runs `portkeep --server SERVER --timeout 5 ARGS`.
    pub fn cli_at(&self, server: &str, args: &[&str]) -> CliRun {
        let mut all = vec!["--server", server, "--timeout", "5"];
        all.extend_from_slice(args);
        self.run_cli(&all)
    }

    /// Runs `portkeepd ARGS` to completion (for `--check-config` and for
    /// start-up errors), killing it if it is still running after `within`.
    pub fn run_daemon_to_exit(&self, args: &[&str], within: Duration) -> CliRun {
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("stdout");
        let err_path = dir.path().join("stderr");
        let mut child = Command::new(self.daemon())
            .args(args)
            .current_dir(dir.path())
            .env_remove("PORTKEEPD_LOG")
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = now() + within;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let run = CliRun {
            code: status.and_then(|s| s.code()),
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        };
        assert!(
            status.is_some(),
            "portkeepd {args:?} still running after {within:?}: {run:?}"
        );
        run
    }
}
