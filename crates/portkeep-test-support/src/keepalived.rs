//! An active/backup pair under keepalived in network namespaces: nodes
//! plugged into the bridges of a [`Lab`], real `portkeepd` and
//! `keepalived` processes per node, a keepalived configuration generated
//! from `examples/keepalived/`, and raw PCP from a client namespace.
//!
//! Everything is removed on drop, even when an assertion fails: the
//! nodes' processes are killed, then the [`Lab`] kills whatever is left in
//! its namespaces, deletes them and removes its directory.

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{in_ns, ip, Lab};
use crate::pcp::{exchange_once as exchange, map_request};
use crate::process::{ctl_json, gen_certs, now, Portkeepd};

/// The repository's `examples/keepalived/` directory.
pub fn keepalived_examples() -> PathBuf {
    crate::daemon::examples_dir()
        .join("keepalived")
        .canonicalize()
        .unwrap()
}

/// `examples/keepalived/keepalived.conf` with the values of this lab:
/// every `(from, to)` must occur in the example (a changed example fails
/// loudly here rather than testing something else).
pub fn keepalived_conf(subs: &[(&str, String)]) -> String {
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

/// One node of the pair: its namespace, `portkeepd` and `keepalived`.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ns: String,
    pub dir: PathBuf,
    pub data: PathBuf,
    daemon: PathBuf,
    portkeepd: Option<Portkeepd>,
    keepalived: Option<Child>,
}

impl Node {
    /// Node `name` in namespace `ns` of `lab`, running the `portkeepd`
    /// binary `daemon`.
    pub fn new(lab: &Lab, name: &str, ns: &str, daemon: &Path) -> Node {
        let dir = lab.dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        Node {
            name: name.to_owned(),
            ns: ns.to_owned(),
            data: dir.join("data"),
            dir,
            daemon: daemon.to_owned(),
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

    pub fn notify_log(&self) -> PathBuf {
        self.dir.join("notify.log")
    }

    /// The example's keepalived configuration for this node, with the
    /// example's scripts. They are copied next to the configuration:
    /// keepalived refuses to run a script that a user other than root
    /// could change, which a checkout owned by someone else would be.
    pub fn keepalived_conf(&self, mut subs: Vec<(&str, String)>) -> String {
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
            (
                "/usr/local/bin/portkeepd",
                self.daemon.display().to_string(),
            ),
            ("/var/lib/portkeep", self.data.display().to_string()),
        ]);
        keepalived_conf(&subs)
    }

    /// Starts `portkeepd` with `config` and waits for its control socket.
    pub fn start_portkeepd(&mut self, config: &str) {
        let cfg = self.dir.join("portkeepd.toml");
        fs::write(&cfg, config).unwrap();
        let log = self.append("portkeepd.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.daemon)
            .arg("--config")
            .arg(&cfg)
            .args(["--log-level", "info"])
            .env_remove("PORTKEEPD_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let p = self.portkeepd.insert(Portkeepd::spawn(
            &self.name,
            &self.daemon,
            &mut cmd,
            self.data.clone(),
            self.dir.join("portkeepd.log"),
        ));
        p.wait(Duration::from_secs(10), "control socket", |_| true);
    }

    /// Starts keepalived (VRRP only) in its own process group, with its
    /// own pid files, logging to the console (a file here).
    pub fn start_keepalived(&mut self, conf: &str) {
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
    pub fn ctl(&self, args: &[&str]) -> Option<serde_json::Value> {
        ctl_json(&self.daemon, &self.data, args)
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        self.ctl(&["status"])
    }

    /// The `ha` part of the status, or null.
    pub fn ha(&self) -> serde_json::Value {
        self.status().map(|s| s["ha"].clone()).unwrap_or_default()
    }

    pub fn is_active(&self) -> bool {
        let h = self.ha();
        h["role"] == "active" && h["serving"] == true
    }

    /// Every mapping the node holds.
    pub fn mappings(&self) -> Vec<serde_json::Value> {
        self.ctl(&["mappings"])
            .and_then(|v| v["mappings"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Whether the node's namespace holds `addr` on some interface.
    pub fn holds(&self, addr: &str) -> bool {
        ip(&["-n", &self.ns, "-br", "addr"])
            .unwrap_or_default()
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(addr))
    }

    /// `kill -9` of keepalived's whole process group (the parent, the
    /// VRRP child and any notify script): no priority-0 advertisement, no
    /// address removal, as when the process crashes.
    pub fn kill_keepalived(&mut self) {
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

    pub fn kill_portkeepd(&mut self) {
        if let Some(mut p) = self.portkeepd.take() {
            // `ip netns exec` execs the daemon: this is its pid.
            p.kill9();
        }
    }

    /// Both, keepalived first.
    pub fn crash(&mut self) {
        self.kill_keepalived();
        self.kill_portkeepd();
    }

    /// The node's logs, for failure messages.
    pub fn logs(&self) -> String {
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
    pub fn wait(&self, within: Duration, what: &str, ok: impl Fn(&Node) -> bool) {
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

/// The pair: certificates for both nodes in `LAB_DIR/certs`, node
/// `names[i]` in namespace `ns[i]`, each node's `portkeepd` started with
/// `config(node, i)` (both answering `ctl`), then each node's keepalived
/// with `keepalived(node)`.
pub fn start_pair(
    lab: &Lab,
    daemon: &Path,
    names: [&str; 2],
    ns: &[String; 2],
    config: impl Fn(&Node, usize) -> String,
    keepalived: impl Fn(&Node) -> String,
) -> Vec<Node> {
    gen_certs(daemon, &lab.dir.join("certs"), &names);
    let mut nodes: Vec<Node> = (0..2)
        .map(|i| Node::new(lab, names[i], &ns[i], daemon))
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        let cfg = config(n, i);
        n.start_portkeepd(&cfg);
    }
    for n in &mut nodes {
        let conf = keepalived(n);
        n.start_keepalived(&conf);
    }
    nodes
}

/// The index of the first of `nodes` that satisfies `ok`, polled every
/// 20 ms; panics with every node's logs after `within`.
pub fn wait_for_node(
    nodes: &[Node],
    within: Duration,
    what: &str,
    ok: impl Fn(&Node) -> bool,
) -> usize {
    let t = now();
    loop {
        if let Some(i) = nodes.iter().position(&ok) {
            return i;
        }
        assert!(
            t.elapsed() < within,
            "no node {what} within {within:?}:\n{}",
            nodes.iter().map(Node::logs).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `[ha]` for a node of the pair: backup at start (keepalived decides),
/// the replication link between the nodes' own addresses over mutual TLS.
pub fn ha_section(certs: &Path, me: &str, peer: &str, listen: &str, peer_addr: &str) -> String {
    format!(
        "[ha]\nrole = \"backup\"\nlisten = \"{listen}\"\npeer = \"{peer_addr}\"\n\
         tls_ca = \"{c}/ca.pem\"\ntls_cert = \"{c}/{me}.pem\"\ntls_key = \"{c}/{me}.key\"\n\
         peer_name = \"{peer}\"\nheartbeat_ms = 50\ndead_after_ms = 500\n",
        c = certs.display()
    )
}

/// A UDP socket in namespace `ns`, bound to `ip`.
pub fn udp_in(ns: &str, ip: IpAddr, timeout: Duration) -> UdpSocket {
    let s = in_ns(ns, move || UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap());
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// A granted mapping.
#[derive(Debug, Clone)]
pub struct Granted {
    pub port: u16,
    pub external: SocketAddr,
    pub nonce: [u8; 12],
    pub honoured: bool,
}

/// A MAP that must succeed.
pub fn map_ok(
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
pub fn refresh_until_answered(
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
