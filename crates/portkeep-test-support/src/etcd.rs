//! A real etcd cluster on loopback (Debian's `etcd-server`), started and
//! removed by the test that asks for it: three members, each with its own
//! data directory under a temporary directory and its own ports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A port free on 127.0.0.1, below the kernel's ephemeral range: no
/// connection another test opens meanwhile can be given it as its local
/// port before etcd binds it.
fn tcp_port() -> u16 {
    crate::pcp::restartable_port(crate::pcp::LOCALHOST)
}

/// Whether the etcd member whose metrics port on 127.0.0.1 is `port`
/// says it is healthy.
fn healthy_at(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// One member.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// Plain HTTP `/health`, whatever the client URLs' scheme.
    metrics: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of members on 127.0.0.1; every member is killed and its
/// directory removed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial: String,
    /// The network namespace the members run in (`None`: this one).
    netns: Option<String>,
    /// Client TLS: (CA, server certificate, key); clients must present a
    /// certificate of that CA.
    tls: Option<[PathBuf; 3]>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_in(n, None)
    }

    /// [`EtcdCluster::start`], in network namespace `netns` (on its
    /// loopback).
    pub fn start_in(n: usize, netns: Option<&str>) -> EtcdCluster {
        EtcdCluster::build(n, netns, None)
    }

    /// [`EtcdCluster::start`] with mutual TLS for clients: `ca`, the
    /// members' certificate (valid for 127.0.0.1) and key; a client must
    /// present a certificate issued by `ca`.
    pub fn start_tls(n: usize, ca: &Path, cert: &Path, key: &Path) -> EtcdCluster {
        EtcdCluster::build(
            n,
            None,
            Some([ca.to_owned(), cert.to_owned(), key.to_owned()]),
        )
    }

    fn build(n: usize, netns: Option<&str>, tls: Option<[PathBuf; 3]>) -> EtcdCluster {
        // A member that cannot have its ports (another program took one
        // between the check and etcd's bind) exits at once: start again on
        // other ports rather than wait for a cluster that cannot form.
        let mut last = String::new();
        for _ in 0..3 {
            match EtcdCluster::try_build(n, netns, tls.clone()) {
                Ok(c) => return c,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not start three times; the last time:\n{last}");
    }

    fn try_build(
        n: usize,
        netns: Option<&str>,
        tls: Option<[PathBuf; 3]>,
    ) -> Result<EtcdCluster, String> {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: tcp_port(),
                peer: tcp_port(),
                metrics: tcp_port(),
                data: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            dir,
            members,
            initial,
            netns: netns.map(str::to_owned),
            tls,
        };
        for i in 0..n {
            c.start_member(i);
        }
        let deadline = crate::process::now() + Duration::from_secs(45);
        loop {
            if c.all_healthy() {
                return Ok(c);
            }
            if let Some(i) = c.exited() {
                return Err(format!("member m{i} exited\n{}", c.logs()));
            }
            if crate::process::now() > deadline {
                return Err(format!("not healthy within 45 s\n{}", c.logs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first member that was started and has exited, if any.
    fn exited(&mut self) -> Option<usize> {
        (0..self.members.len()).find(|&i| {
            self.members[i]
                .child
                .as_mut()
                .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
        })
    }

    /// Whether every running member is healthy.
    fn all_healthy(&self) -> bool {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .all(|i| self.healthy(i))
    }

    fn start_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let state = if m.data.exists() { "existing" } else { "new" };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = match &self.netns {
            None => Command::new("etcd"),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
        };
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{}", m.client),
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", m.metrics),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "portkeep-test",
                // Fast elections, so a member's loss costs well under a
                // second; leases shorter than 1.5 election timeouts would
                // be rounded up by etcd.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ]);
        if let Some([ca, cert, key]) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        m.child = Some(child);
    }

    /// The client URLs, as `[ha.coordinator] etcd` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The TOML array of [`EtcdCluster::endpoints`].
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Whether member `i` says it is healthy (it has a leader).
    fn healthy(&self, i: usize) -> bool {
        let port = self.members[i].metrics;
        match &self.netns {
            None => healthy_at(port),
            Some(ns) => crate::netns::in_ns(ns, move || healthy_at(port)),
        }
    }

    /// Waits until every running member is healthy.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = crate::process::now() + within;
        while !self.all_healthy() {
            assert!(
                crate::process::now() < deadline,
                "etcd not healthy within {within:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills member `i` (`kill -9`).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_member(i);
    }

    /// Sends `sig` (e.g. "STOP", "CONT") to every member.
    pub fn signal_all(&self, sig: &str) {
        for m in &self.members {
            if let Some(c) = &m.child {
                let _ = Command::new("kill")
                    .arg(format!("-{sig}"))
                    .arg(c.id().to_string())
                    .status();
            }
        }
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- {} ---\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The temporary directory the cluster lives in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.signal_all("CONT");
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
