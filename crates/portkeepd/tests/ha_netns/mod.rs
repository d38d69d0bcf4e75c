//! Helpers for the tests that run an active/backup pair under keepalived in
//! network namespaces: namespaces wired to bridges in a "switch"
//! namespace, real `portkeepd` and `keepalived` processes per node, a
//! keepalived configuration generated from `examples/keepalived/`, and
//! raw PCP from a client namespace.
//!
//! Everything is removed on drop, even when an assertion fails: each
//! namespace's processes are killed (`ip netns pids`), the namespaces
//! deleted and the temporary directory removed.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub(crate) use crate::e2e_support::{exchange_once as exchange, map_request};

pub(crate) const DAEMON: &str = env!("CARGO_BIN_EXE_portkeepd");

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// The clock, read in one place (the workspace reserves `Instant::now`).
pub(crate) use crate::netns::{in_ns, ip, now, ns_exec, skip_reason};

/// Namespaces, a switch namespace holding the bridges, and a temporary
/// directory; all removed on drop.
pub(crate) struct Lab {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) switch: String,
    namespaces: Vec<String>,
    ports: usize,
}

impl Lab {
    /// A lab whose namespace names start with `prefix` (a few letters).
    pub(crate) fn new(prefix: &str, bridges: &[&str]) -> Result<Lab, String> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("portkeep-{prefix}-{id}"));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut lab = Lab {
            switch: format!("{prefix}s-{id}"),
            id,
            dir,
            namespaces: Vec::new(),
            ports: 0,
        };
        let sw = lab.switch.clone();
        lab.add_ns(&sw)?;
        for b in bridges {
            ip(&["-n", &sw, "link", "add", b, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", b, "up"])?;
        }
        Ok(lab)
    }

    /// A new namespace with its loopback up.
    pub(crate) fn add_ns(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Connects `ns` to `bridge` with a veth whose end in `ns` is `ifname`
    /// and carries `addrs` (CIDR).
    pub(crate) fn plug(
        &mut self,
        ns: &str,
        ifname: &str,
        bridge: &str,
        addrs: &[&str],
    ) -> Result<(), String> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        let sw = self.switch.clone();
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", ns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", bridge])?;
        ip(&["-n", &sw, "link", "set", &port, "up"])?;
        for a in addrs {
            ip(&["-n", ns, "addr", "add", a, "dev", ifname])?;
        }
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.namespaces.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Whatever still runs in there: keepalived, its scripts,
            // portkeepd, nft sessions.
            if let Ok(pids) = ip(&["netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Asserts that none of `names` is left.
pub(crate) fn assert_gone(names: &[String]) {
    let list = ip(&["netns", "list"]).unwrap_or_default();
    for n in names {
        assert!(
            !list.split_whitespace().any(|l| l == n),
            "namespace {n} left behind"
        );
    }
}

/// The repository's `examples/keepalived/` directory.
pub(crate) fn keepalived_examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/keepalived")
        .canonicalize()
        .unwrap()
}

/// `examples/keepalived/keepalived.conf` with the values of this lab:
/// every `(from, to)` must occur in the example (a changed example fails
/// loudly here rather than testing something else).
pub(crate) fn keepalived_conf(subs: &[(&str, String)]) -> String {
    let path = keepalived_examples().join("keepalived.conf");
    let mut text = fs::read_to_string(&path).unwrap();
    for (from, to) in subs {
        assert!(
            text.contains(from),
            "{} no longer contains `{from}`",
            path.display()
        );
        text = text.replace(from, to);
    }
    text
}

/// Certificates for both nodes, from `portkeepd gen-certs`.
pub(crate) fn gen_certs(dir: &Path) {
    let out = Command::new(DAEMON)
        .args(["gen-certs", dir.to_str().unwrap(), "node-a", "node-b"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// One node of the pair: its namespace, `portkeepd` and `keepalived`.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) ns: String,
    pub(crate) dir: PathBuf,
    pub(crate) data: PathBuf,
    portkeepd: Option<Child>,
    keepalived: Option<Child>,
}

impl Node {
    pub(crate) fn new(lab: &Lab, name: &str, ns: &str) -> Node {
        let dir = lab.dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        Node {
            name: name.to_owned(),
            ns: ns.to_owned(),
            data: dir.join("data"),
            dir,
            portkeepd: None,
            keepalived: None,
        }
    }

    fn append(&self, file: &str) -> fs::File {
        fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(file))
            .unwrap()
    }

    pub(crate) fn notify_log(&self) -> PathBuf {
        self.dir.join("notify.log")
    }

    /// The example's keepalived configuration for this node, with the
    /// example's scripts. They are copied next to the configuration:
    /// keepalived refuses to run a script that a user other than root
    /// could change, which a checkout owned by someone else would be.
    pub(crate) fn keepalived_conf(&self, mut subs: Vec<(&str, String)>) -> String {
        let script = |name: &str| {
            let to = self.dir.join(name);
            fs::copy(keepalived_examples().join(name), &to).unwrap();
            to.display().to_string()
        };
        subs.extend([
            (
                "/etc/keepalived/portkeepd-notify.sh",
                format!(
                    "{} --log {}",
                    script("portkeepd-notify.sh"),
                    self.notify_log().display()
                ),
            ),
            (
                "/etc/keepalived/portkeepd-check.sh",
                script("portkeepd-check.sh"),
            ),
            ("/usr/local/bin/portkeepd", DAEMON.to_owned()),
            ("/var/lib/portkeep", self.data.display().to_string()),
        ]);
        keepalived_conf(&subs)
    }

    /// Starts `portkeepd` with `config` and waits for its control socket.
    pub(crate) fn start_portkeepd(&mut self, config: &str) {
        let cfg = self.dir.join("portkeepd.toml");
        fs::write(&cfg, config).unwrap();
        let log = self.append("portkeepd.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, DAEMON, "--config"])
            .arg(&cfg)
            .args(["--log-level", "info"])
            .env_remove("PORTKEEPD_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.portkeepd = Some(child);
        let deadline = now() + Duration::from_secs(10);
        loop {
            if self.status().is_some() {
                return;
            }
            if let Some(Ok(Some(st))) = self.portkeepd.as_mut().map(Child::try_wait) {
                panic!("{}: portkeepd exited ({st}):\n{}", self.name, self.logs());
            }
            assert!(
                now() < deadline,
                "{}: no control socket:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts keepalived (VRRP only) in its own process group, with its
    /// own pid files, logging to the console (a file here).
    pub(crate) fn start_keepalived(&mut self, conf: &str) {
        let cfg = self.dir.join("keepalived.conf");
        fs::write(&cfg, conf).unwrap();
        let log = self.append("keepalived.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "keepalived"])
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .args([
                "--no-syslog",
                "--dont-respawn",
                "--config-id",
                &self.name,
                "--use-file",
            ])
            .arg(&cfg)
            .arg("--pid")
            .arg(self.dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(self.dir.join("vrrp.pid"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.keepalived = Some(child);
    }

    /// `portkeepd ctl --json ARGS` (the control socket is a file: no
    /// namespace needed); `None` if it does not answer.
    pub(crate) fn ctl(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new(DAEMON)
            .args(["ctl", "--data-dir", self.data.to_str().unwrap(), "--json"])
            .args(args)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    pub(crate) fn status(&self) -> Option<serde_json::Value> {
        self.ctl(&["status"])
    }

    /// The `ha` part of the status, or null.
    pub(crate) fn ha(&self) -> serde_json::Value {
        self.status().map(|s| s["ha"].clone()).unwrap_or_default()
    }

    pub(crate) fn is_active(&self) -> bool {
        let h = self.ha();
        h["role"] == "active" && h["serving"] == true
    }

    /// Every mapping the node holds.
    pub(crate) fn mappings(&self) -> Vec<serde_json::Value> {
        self.ctl(&["mappings"])
            .and_then(|v| v["mappings"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Whether the node's namespace holds `addr` on some interface.
    pub(crate) fn holds(&self, addr: &str) -> bool {
        ip(&["-n", &self.ns, "-br", "addr"])
            .unwrap_or_default()
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(addr))
    }

    /// `kill -9` of keepalived's whole process group (the parent, the
    /// VRRP child and any notify script): no priority-0 advertisement, no
    /// address removal, as when the process crashes.
    pub(crate) fn kill_keepalived(&mut self) {
        if let Some(mut c) = self.keepalived.take() {
            // The VRRP child first, so that its parent (started with
            // --dont-respawn) reaps it rather than leaving a zombie.
            if let Some(pid) = fs::read_to_string(self.dir.join("vrrp.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
                let proc_dir = PathBuf::from(format!("/proc/{pid}"));
                let t = now();
                while proc_dir.exists() && t.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{}", c.id())])
                .output();
            let _ = c.wait();
            // A crash leaves its pid files behind; the VRRP child may still
            // be an unreaped zombie, which the next start would take for a
            // running daemon.
            let _ = fs::remove_file(self.dir.join("keepalived.pid"));
            let _ = fs::remove_file(self.dir.join("vrrp.pid"));
        }
    }

    pub(crate) fn kill_portkeepd(&mut self) {
        if let Some(mut c) = self.portkeepd.take() {
            // `ip netns exec` execs the daemon: this is its pid.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Both, keepalived first.
    pub(crate) fn crash(&mut self) {
        self.kill_keepalived();
        self.kill_portkeepd();
    }

    /// The node's logs, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["portkeepd.log", "keepalived.log", "notify.log"] {
            let text = fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            s.push_str(&format!("---- {} {f} (last lines)\n", self.name));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Waits until `ok` holds, polling every 20 ms.
    pub(crate) fn wait(&self, within: Duration, what: &str, ok: impl Fn(&Node) -> bool) {
        let deadline = now() + within;
        while !ok(self) {
            assert!(
                now() < deadline,
                "{}: no {what} within {within:?}; status {:#}\n{}",
                self.name,
                self.ha(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.crash();
    }
}

/// `[ha]` for a node of the pair: backup at start (keepalived decides),
/// the replication link between the nodes' own addresses over mutual TLS.
pub(crate) fn ha_section(
    certs: &Path,
    me: &str,
    peer: &str,
    listen: &str,
    peer_addr: &str,
) -> String {
    format!(
        "[ha]\nrole = \"backup\"\nlisten = \"{listen}\"\npeer = \"{peer_addr}\"\n\
         tls_ca = \"{c}/ca.pem\"\ntls_cert = \"{c}/{me}.pem\"\ntls_key = \"{c}/{me}.key\"\n\
         peer_name = \"{peer}\"\nheartbeat_ms = 50\ndead_after_ms = 500\n",
        c = certs.display()
    )
}

/// A UDP socket in namespace `ns`, bound to `ip`.
pub(crate) fn udp_in(ns: &str, ip: IpAddr, timeout: Duration) -> UdpSocket {
    let s = in_ns(ns, move || UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap());
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// A granted mapping.
#[derive(Debug, Clone)]
pub(crate) struct Granted {
    pub(crate) port: u16,
    pub(crate) external: SocketAddr,
    pub(crate) nonce: [u8; 12],
    pub(crate) honoured: bool,
}

/// A MAP that must succeed.
pub(crate) fn map_ok(
    sock: &UdpSocket,
    server: SocketAddr,
    client: IpAddr,
    port: u16,
    nonce: [u8; 12],
    cp: bool,
) -> Granted {
    let r = exchange(sock, server, &map_request(client, port, 3600, nonce, cp))
        .unwrap_or_else(|| panic!("MAP {port} to {server}: no answer"));
    assert_eq!(r.header.result.0, 0, "MAP {port}: {r:?}");
    let m = r.data.map_part().unwrap();
    Granted {
        port,
        external: SocketAddr::new(
            portkeep_proto::addr::from_wire(m.external_ip),
            m.external_port,
        ),
        nonce,
        honoured: r.checkpoint_honoured(),
    }
}

/// Repeats the MAP of `g` every few tens of milliseconds until it is
/// answered with SUCCESS, and returns when (from `since`); panics after
/// `within`.
pub(crate) fn refresh_until_answered(
    sock: &UdpSocket,
    server: SocketAddr,
    client: IpAddr,
    g: &Granted,
    since: Instant,
    within: Duration,
) -> (Duration, Granted) {
    loop {
        if let Some(r) = exchange(
            sock,
            server,
            &map_request(client, g.port, 3600, g.nonce, true),
        ) {
            if r.header.result.0 == 0 {
                let m = r.data.map_part().unwrap();
                let got = Granted {
                    port: g.port,
                    external: SocketAddr::new(
                        portkeep_proto::addr::from_wire(m.external_ip),
                        m.external_port,
                    ),
                    nonce: g.nonce,
                    honoured: r.checkpoint_honoured(),
                };
                return (since.elapsed(), got);
            }
        }
        assert!(
            since.elapsed() < within,
            "no answer via {server} within {within:?}"
        );
    }
}
