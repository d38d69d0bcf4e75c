//! Helpers for the end-to-end tests: the real `portkeepd` and `portkeep`
//! binaries as processes, raw PCP over real UDP sockets on loopback.
//!
//! Every daemon gets its own ephemeral port and temporary directory, and is
//! killed and reaped when its guard drops, so tests run in parallel safely.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use portkeep_client::RequestBuilder;
use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, MapData, OpData, PcpOption, Protocol, Request, RequestHeader, Response,
};

/// How long a daemon may take to answer its first ANNOUNCE.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Bind attempts before giving up on finding a free port.
const BIND_ATTEMPTS: usize = 5;

/// The clock, read in one place (the workspace's clippy configuration
/// reserves `Instant::now` for explicit boundaries).
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// The `portkeepd` binary cargo built for this test.
pub(crate) fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portkeepd"))
}

/// The `portkeep` CLI, a sibling of `portkeepd` in the same target dir.
pub(crate) fn cli_bin() -> PathBuf {
    let bin = daemon_bin().with_file_name(format!("portkeep{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the `portkeep` CLI binary is missing at {}: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// The repository's `examples/` directory.
pub(crate) fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// A UDP port that was free on `ip` a moment ago.
pub(crate) fn free_port(ip: IpAddr) -> u16 {
    UdpSocket::bind(SocketAddr::new(ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"))
}

/// Whether `addr` can be bound right now (the socket is closed again).
pub(crate) fn bindable(addr: SocketAddr) -> bool {
    UdpSocket::bind(addr).is_ok()
}

pub(crate) fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(crate) const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
pub(crate) const LOCALHOST6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

/// A running `portkeepd`, killed and reaped on drop.
pub(crate) struct Daemon {
    child: Option<Child>,
    /// Where it serves PCP.
    pub(crate) addrs: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

/// How to start a daemon.
#[derive(Default)]
pub(crate) struct DaemonSpec<'a> {
    /// TOML written to a file and passed with `--config`.
    pub(crate) config: Option<&'a str>,
    /// Loopback addresses to listen on, each on a fresh port (default
    /// 127.0.0.1).
    pub(crate) listen_ips: Vec<IpAddr>,
    /// Replaces the whole command line (no `--listen` added); the daemon
    /// is then expected on `fixed_addrs`.
    pub(crate) raw_args: Option<Vec<String>>,
    /// With `raw_args`: where the daemon will serve.
    pub(crate) fixed_addrs: Vec<SocketAddr>,
}

impl Daemon {
    /// Starts `portkeepd` on fresh loopback ports (default config).
    pub(crate) fn start() -> Daemon {
        Self::spawn(&DaemonSpec::default())
    }

    /// Starts `portkeepd` with `config` on a fresh 127.0.0.1 port.
    pub(crate) fn with_config(config: &str) -> Daemon {
        Self::spawn(&DaemonSpec {
            config: Some(config),
            ..DaemonSpec::default()
        })
    }

    /// Starts a daemon and waits until it answers ANNOUNCE on every listen
    /// address, retrying on a fresh port when the one picked was taken in
    /// the meantime.
    pub(crate) fn spawn(spec: &DaemonSpec<'_>) -> Daemon {
        Self::try_spawn(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Self::spawn`], but a failure to bind a fixed address (with
    /// `raw_args`) is returned, so that a test can skip.
    pub(crate) fn try_spawn(spec: &DaemonSpec<'_>) -> Result<Daemon, String> {
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
            let child = Command::new(daemon_bin())
                .args(&args)
                .current_dir(dir.path())
                .env_remove("PORTKEEPD_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut d = Daemon {
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
                    let ok = from == addr
                        && Response::parse(&buf[..n], &CodePoints::default())
                            .is_ok_and(|r| r.header.result.0 == 0);
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
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// `--server` value for the CLI.
    pub(crate) fn server(&self) -> String {
        self.addr().to_string()
    }

    /// Everything the daemon wrote to stderr so far.
    pub(crate) fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.dir.path().join("stderr.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Whether the process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(None))
    }

    /// The daemon's data directory (the default, relative to its working
    /// directory, which is its temp dir).
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("portkeep-data")
    }

    /// Runs `portkeepd ctl --data-dir <its data dir> ARGS`.
    pub(crate) fn ctl(&self, args: &[&str]) -> CliRun {
        let dir = self.data_dir();
        let mut all = vec!["ctl", "--data-dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        cli_output(Command::new(daemon_bin()).args(&all).output().unwrap())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Sends `signal` (e.g. "TERM") with kill(1) and waits up to `within`
    /// for the process to exit; `None` if it did not.
    pub(crate) fn signal_and_wait(&mut self, signal: &str, within: Duration) -> Option<ExitStatus> {
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
pub(crate) struct CliRun {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl CliRun {
    /// stdout as one JSON object.
    pub(crate) fn json(&self) -> serde_json::Value {
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

/// Runs `portkeep ARGS`.
pub(crate) fn cli(args: &[&str]) -> CliRun {
    cli_output(Command::new(cli_bin()).args(args).output().unwrap())
}

/// Runs `portkeep --server SERVER --timeout 5 ARGS`.
pub(crate) fn cli_at(server: &str, args: &[&str]) -> CliRun {
    let mut all = vec!["--server", server, "--timeout", "5"];
    all.extend_from_slice(args);
    cli(&all)
}

/// Runs `portkeepd ARGS` to completion (for `--check-config` and for
/// start-up errors), killing it if it is still running after `within`.
pub(crate) fn run_daemon_to_exit(args: &[&str], within: Duration) -> CliRun {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(daemon_bin())
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

/// A MAP request for TCP `port` on behalf of `client`, with
/// CHECKPOINT_REQUIRED (RFC 7767) if `checkpoint`.
pub(crate) fn map_request(
    client: IpAddr,
    port: u16,
    lifetime: u32,
    nonce: [u8; 12],
    checkpoint: bool,
) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(client),
        },
        data: OpData::Map(MapData {
            nonce,
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options: if checkpoint {
            vec![PcpOption::CheckpointRequired]
        } else {
            vec![]
        },
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

/// Sends `req` once from `sock` and waits for its reply within the
/// socket's timeout (no retransmission: load tests must notice the moment
/// a daemon dies). Datagrams from elsewhere, and late replies to earlier
/// requests, are skipped: for MAP the reply must carry this request's nonce
/// and internal port (RFC 6887 section 11.4).
pub(crate) fn exchange_once(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> Option<Response> {
    let sent = Request::parse(req, &CodePoints::default()).ok()?;
    sock.send_to(req, server).ok()?;
    let mut buf = [0u8; 1100];
    loop {
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        if from != server {
            continue;
        }
        let Ok(r) = Response::parse(&buf[..n], &CodePoints::default()) else {
            continue;
        };
        match (sent.data.map_part(), r.data.map_part()) {
            (Some(a), Some(b)) if a.nonce != b.nonce || a.internal_port != b.internal_port => {
                continue
            }
            (Some(_), None) => continue,
            _ => return Some(r),
        }
    }
}

/// One request/response exchange from a socket bound to `src`, with up to
/// three transmissions (UDP on loopback rarely loses anything, but may).
/// Returns the raw response and the address it came from.
pub(crate) fn exchange(src: IpAddr, server: SocketAddr, datagram: &[u8]) -> (Vec<u8>, SocketAddr) {
    let sock = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    for _ in 0..3 {
        sock.send_to(datagram, server).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            return (buf[..n].to_vec(), from);
        }
    }
    panic!(
        "no answer from {server} to a {}-octet request from {src}",
        datagram.len()
    )
}

/// Sends the request built from `builder` as client `src` and parses the
/// answer, checking it came from `server`.
pub(crate) fn request(src: IpAddr, server: SocketAddr, builder: &RequestBuilder) -> Response {
    let req = builder.build(src).unwrap();
    request_raw(src, server, &req)
}

/// Sends `req` (its header may lie about the client) from `src`.
pub(crate) fn request_raw(src: IpAddr, server: SocketAddr, req: &Request) -> Response {
    let cp = CodePoints::default();
    let (bytes, from) = exchange(src, server, &req.to_bytes(&cp).unwrap());
    assert_eq!(from, server, "answer from another address than the server");
    Response::parse(&bytes, &cp).unwrap()
}
