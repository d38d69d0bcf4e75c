//! `portkeep agent` against real `portkeepd` processes on loopback: one
//! test per failure scenario of the failure-scenarios draft section 2,
//! each asserting the mapping is usable again and how long it took.
//!
//! Each test uses its own loopback address (127.a.b.1) as the agent's
//! host, so the agent can listen for ANNOUNCEs on that address's port
//! 5350 while other tests run in parallel.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use portkeep_test_support::pcp::{restartable_port, LOCALHOST};
use portkeep_test_support::process::{agent_call, ctl_json, now, wait_until, Bins, Portkeepd};
use serde_json::{json, Value};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_cli(env!("CARGO_BIN_EXE_portkeep")));

/// A loopback address of this test alone, whose port 5350 is free.
fn host_ip() -> IpAddr {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let b = u8::try_from(std::process::id() % 200 + 20).unwrap();
    loop {
        let c = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = IpAddr::V4(Ipv4Addr::new(127, b, c, 1));
        if UdpSocket::bind((ip, 5350)).is_ok() {
            return ip;
        }
    }
}

fn server_port() -> u16 {
    portkeep_test_support::pcp::restartable_port(LOCALHOST)
}

/// A `portkeepd` on a fixed 127.0.0.1 port, restartable with or without
/// its data directory.
struct Server {
    proc: Option<Portkeepd>,
    dir: tempfile::TempDir,
    ip: IpAddr,
    port: u16,
}

impl Server {
    fn start(config: &str) -> Server {
        Server::start_on(LOCALHOST, server_port(), config)
    }

    fn start_on(ip: IpAddr, port: u16, config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("portkeepd.toml"), config).unwrap();
        let mut s = Server {
            proc: None,
            dir,
            ip,
            port,
        };
        s.spawn();
        s
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .unwrap();
        let mut cmd = Command::new(BINS.daemon());
        cmd.args([
            "--config",
            "portkeepd.toml",
            "--listen",
            &self.addr().to_string(),
        ])
        .current_dir(self.dir.path())
        .env_remove("PORTKEEPD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        let p = self.proc.insert(Portkeepd::spawn(
            "portkeepd",
            BINS.daemon(),
            &mut cmd,
            self.data_dir(),
            self.dir.path().join("stderr.log"),
        ));
        p.wait(
            Duration::from_secs(10),
            "portkeepd to answer ctl status",
            |v| v["ok"] == json!(true),
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("portkeep-data")
    }

    fn try_ctl(&self, args: &[&str]) -> Option<Value> {
        ctl_json(BINS.daemon(), &self.data_dir(), args)
    }

    fn ctl(&self, args: &[&str]) -> Value {
        self.try_ctl(args)
            .unwrap_or_else(|| panic!("ctl {args:?} failed; log:\n{}", self.log()))
    }

    /// The server's mappings as (internal port, external, nonce).
    fn mappings(&self) -> Vec<(u16, String, String)> {
        let v = self.ctl(&["mappings"]);
        let list = v["mappings"].as_array().cloned().unwrap_or_default();
        let mut out: Vec<(u16, String, String)> = list
            .iter()
            .map(|m| {
                (
                    u16::try_from(m["internal_port"].as_u64().unwrap()).unwrap(),
                    m["external"].as_str().unwrap_or("").to_owned(),
                    m["nonce"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn stop(&mut self, signal: &str) {
        if let Some(mut p) = self.proc.take() {
            p.stop(signal);
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop("KILL");
    }
}

/// A `portkeep agent run`.
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, server: SocketAddr, ip: IpAddr, extra: &[&str]) -> Agent {
        let mut args: Vec<String> = vec![
            "--server".into(),
            server.to_string(),
            "agent".into(),
            "--state-dir".into(),
            dir.display().to_string(),
            "run".into(),
            "--bind".into(),
            ip.to_string(),
            "--recreate-jitter-ms".into(),
            "300".into(),
        ];
        if !extra.contains(&"--no-announce-listen") {
            args.push("--announce-listen".into());
            args.push(SocketAddr::new(ip, 5350).to_string());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut a = Agent {
            child: None,
            dir: dir.to_path_buf(),
            args,
            log: dir.with_extension("log"),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(BINS.cli())
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        wait_until("the agent's socket", Duration::from_secs(10), || {
            self.try_call(&json!({"op": "status"}))
        });
    }

    fn try_call(&self, req: &Value) -> Option<Value> {
        agent_call(&self.dir.join("agent.sock"), req)
    }

    fn call(&self, req: &Value) -> Value {
        self.try_call(req)
            .unwrap_or_else(|| panic!("agent did not answer {req}; log:\n{}", self.log()))
    }

    fn add(&self, app: &str, port: u16, extra: Value) -> Value {
        let mut req = json!({"op": "add", "app": app, "protocol": "tcp", "port": port});
        if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        let v = self.call(&req);
        assert_eq!(v["ok"], json!(true), "{v}");
        v
    }

    fn list(&self) -> Vec<Value> {
        self.call(&json!({"op": "list"}))["mappings"]
            .as_array()
            .cloned()
            .unwrap()
    }

    fn status(&self) -> Value {
        self.call(&json!({"op": "status"}))
    }

    /// Waits until every mapping is granted; returns (port, external, nonce).
    fn wait_granted(&self, n: usize, within: Duration) -> Vec<(u16, String, String)> {
        wait_until("mappings granted", within, || {
            let l = self.list();
            let granted: Vec<(u16, String, String)> = l
                .iter()
                .filter(|m| m["state"] == json!("granted"))
                .map(|m| {
                    (
                        u16::try_from(m["port"].as_u64().unwrap()).unwrap(),
                        m["external"].as_str().unwrap().to_owned(),
                        m["nonce"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (granted.len() == n && l.len() == n).then(|| {
                let mut g = granted;
                g.sort();
                g
            })
        })
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap()
}

const RELAXED: &str = "[store]\nmode = \"relaxed\"\n";

#[test]
fn draft_s2_6_server_restart_with_lost_state_recreates_after_announce() {
    let ip = host_ip();
    let config = format!("[store]\nmode = \"relaxed\"\n[announce]\nunicast = [\"{ip}\"]\n");
    let mut server = Server::start(&config);
    let state = tempfile::tempdir().unwrap();
    let metrics = SocketAddr::new(LOCALHOST, restartable_port(LOCALHOST));
    let agent = Agent::start(
        &state.path().join("a"),
        server.addr(),
        ip,
        &["--metrics-listen", &metrics.to_string()],
    );
    agent.add("web", 8080, json!({}));
    agent.add("game", 27015, json!({}));
    agent.wait_granted(2, Duration::from_secs(5));
    // RFC 6887 section 8.5 tolerates 2 s (+1/16) of disagreement, so a
    // loss is only visible once the client's clock has moved on more than
    // that since its last answer; a real crash and restart takes longer.
    std::thread::sleep(Duration::from_secs(3));
    server.stop("KILL");
    std::fs::remove_dir_all(server.data_dir()).unwrap();
    let t0 = now();
    // Started with an empty data directory: every mapping is gone (the
    // agent may well have re-created them by the time `spawn` returns).
    server.spawn();
    // The start-up ANNOUNCE reaches the agent, whose epoch check fails.
    let deadline = now() + Duration::from_secs(10);
    let held = loop {
        let m = server.mappings();
        if m.len() == 2 {
            break m;
        }
        assert!(
            now() < deadline,
            "not re-created: {m:?}\nagent: {}\n{}\nserver log:\n{}",
            agent.status(),
            agent.log(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let recovery = t0.elapsed();
    eprintln!("lost-state recovery: {recovery:?} (server start to both mappings held)");
    assert!(recovery < Duration::from_secs(5), "took {recovery:?}");
    let after = agent.wait_granted(2, Duration::from_secs(5));
    assert_eq!(
        held.iter().map(|m| &m.2).collect::<Vec<_>>(),
        after.iter().map(|m| &m.2).collect::<Vec<_>>(),
        "re-created with the agent's nonces"
    );
    let st = agent.status();
    assert!(counter(&st, "epoch_failures") >= 1, "{st}");
    assert_eq!(counter(&st, "recreates"), 2, "{st}");
    // The same through the metrics endpoint: two mappings put up for
    // re-creation because an epoch check failed (the ANNOUNCE's, or a
    // renewal's answer if it came first), none for any other cause.
    let body = scrape(metrics);
    let recreated = |cause: &str| {
        sample(
            &body,
            &format!("portkeep_agent_recreated_total{{cause=\"{cause}\"}}"),
        )
    };
    assert_eq!(recreated("announce") + recreated("epoch"), 2.0, "{body}");
    for other in [
        "server_changed",
        "client_address_changed",
        "third_party_host_changed",
    ] {
        assert_eq!(recreated(other), 0.0, "{body}");
    }
    assert!(
        sample(&body, "portkeep_agent_epoch_failures_total") >= 1.0,
        "{body}"
    );
    assert_eq!(sample(&body, "portkeep_agent_mappings"), 2.0, "{body}");
    assert_eq!(
        sample(&body, "portkeep_agent_granted_mappings"),
        2.0,
        "{body}"
    );
    assert_eq!(exposed(&body), documented(), "{body}");
    promtool_accepts(&body);
}

/// `GET /metrics` of the agent at `addr`: the body.
fn scrape(addr: SocketAddr) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample whose name and labels are `series`.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// The metric families a scrape exposes (`# TYPE` names, counters with
/// their `_total`).
fn exposed(body: &str) -> std::collections::BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut w = l.split_whitespace();
            let (name, kind) = (w.next().unwrap(), w.next().unwrap());
            if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect()
}

/// The metrics docs/agent.md lists.
fn documented() -> std::collections::BTreeSet<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/agent.md"))
            .unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `portkeep_agent_"))
        .map(|l| format!("portkeep_agent_{}", l.split('`').next().unwrap()))
        .collect()
}

/// `promtool check metrics` passes the scrape (fails under CI without
/// promtool).
fn promtool_accepts(body: &str) {
    let Some(promtool) = portkeep_test_support::skip::find_tool("promtool") else {
        portkeep_test_support::skip::skip(
            "promtool check metrics",
            "`promtool` not found (apt-get install prometheus)",
        );
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn draft_s2_6_1_server_restart_with_intact_state_recreates_nothing() {
    let ip = host_ip();
    // Short lifetimes, so renewals (and their epoch checks) cross the restart.
    let config = "[lifetime]\nmin = 8\n";
    let mut server = Server::start(config);
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    agent.add("web", 8080, json!({"lifetime": 8}));
    let before = agent.wait_granted(1, Duration::from_secs(5));
    server.stop("TERM");
    server.spawn();
    let renewals0 = counter(&agent.status(), "renewals");
    // Two renewals after the restart, each answered under the kept epoch.
    wait_until(
        "two renewals after the restart",
        Duration::from_secs(15),
        || (counter(&agent.status(), "renewals") >= renewals0 + 2).then_some(()),
    );
    let st = agent.status();
    assert_eq!(counter(&st, "epoch_failures"), 0, "{st}");
    assert_eq!(counter(&st, "recreates"), 0, "no re-creation storm: {st}");
    assert_eq!(
        agent.wait_granted(1, Duration::from_secs(1)),
        before,
        "same external port"
    );
    assert_eq!(server.mappings().len(), 1);
    assert_eq!(server.mappings()[0].1, before[0].1);
}

#[test]
fn draft_s2_3_agent_crash_resumes_from_store_without_requests() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    for (i, app) in ["a", "b", "c"].iter().enumerate() {
        agent.add(
            app,
            7000 + u16::try_from(i).unwrap(),
            json!({"checkpoint": true}),
        );
    }
    let before = agent.wait_granted(3, Duration::from_secs(5));
    let on_server = server.mappings();
    std::thread::sleep(Duration::from_millis(400)); // the store's batch
    let received0 = server.ctl(&["counters"])["received"].as_u64().unwrap();
    agent.kill9();
    let t0 = now();
    agent.spawn();
    let after = agent.wait_granted(3, Duration::from_secs(5));
    eprintln!("agent restart to mappings resumed: {:?}", t0.elapsed());
    assert_eq!(after, before, "same external ports and nonces");
    std::thread::sleep(Duration::from_millis(500));
    let st = agent.status();
    assert_eq!(
        counter(&st, "creates") + counter(&st, "recreates"),
        0,
        "{st}"
    );
    let received = server.ctl(&["counters"])["received"].as_u64().unwrap();
    assert!(
        received <= received0 + 1,
        "at most the one ANNOUNCE: {received0} -> {received}"
    );
    assert_eq!(server.mappings(), on_server);
}

#[test]
fn rfc6887_s8_5_server_lost_state_while_the_agent_was_down() {
    let ip = host_ip();
    let mut server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    agent.add("web", 8080, json!({}));
    agent.wait_granted(1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(400)); // the store's batch
    agent.kill9();
    // The server restarts empty while nobody listens for its ANNOUNCEs.
    server.stop("KILL");
    std::fs::remove_dir_all(server.data_dir()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    server.spawn();
    assert!(server.mappings().is_empty());
    let t0 = now();
    agent.spawn();
    // The stored epoch and one ANNOUNCE tell the agent the state is gone.
    wait_until("the mapping re-created", Duration::from_secs(5), || {
        (server.mappings().len() == 1).then_some(())
    });
    eprintln!("agent restart after server state loss: {:?}", t0.elapsed());
    let st = agent.status();
    assert_eq!(counter(&st, "epoch_failures"), 1, "{st}");
    assert_eq!(counter(&st, "recreates"), 1, "{st}");
}

#[test]
fn draft_s2_3_store_deleted_reconstructs_with_get_next() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("a");
    let mut agent = Agent::start(&dir, server.addr(), ip, &["--adopt-grace", "1.5"]);
    agent.add("web", 8080, json!({}));
    agent.add("old", 9090, json!({}));
    let before = agent.wait_granted(2, Duration::from_secs(5));
    agent.kill9();
    std::fs::remove_file(dir.join("store.json")).unwrap();
    let t0 = now();
    agent.spawn();
    // The application asks again within the grace period.
    let v = agent.add("web", 8080, json!({}));
    assert_eq!(v["ok"], json!(true));
    let after = agent.wait_granted(1, Duration::from_secs(2));
    assert_eq!(
        after[0], before[0],
        "web taken back as it was (port, nonce)"
    );
    // "old" is wanted by nobody: deleted after the grace period.
    let left = wait_until("the orphan deleted", Duration::from_secs(6), || {
        let m = server.mappings();
        (m.len() == 1).then_some(m)
    });
    eprintln!("store-loss reconstruction: {:?}", t0.elapsed());
    assert_eq!(left[0].0, 8080);
    assert_eq!(left[0].1, before[0].1);
    let st = agent.status();
    assert_eq!(counter(&st, "creates"), 0, "adopted, not created: {st}");
    assert_eq!(counter(&st, "deletes"), 1, "{st}");
}

#[test]
fn draft_s2_3_crash_during_the_grace_period_still_deletes_orphans() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("a");
    let mut agent = Agent::start(&dir, server.addr(), ip, &["--adopt-grace", "60"]);
    agent.add("old", 9090, json!({}));
    agent.wait_granted(1, Duration::from_secs(5));
    agent.kill9();
    std::fs::remove_file(dir.join("store.json")).unwrap();
    agent.spawn();
    assert_eq!(agent.status()["orphans_pending"], json!(1));
    // Crash again inside the 60 s grace; come back with a short one.
    agent.kill9();
    let grace = agent
        .args
        .iter()
        .position(|a| a == "--adopt-grace")
        .unwrap()
        + 1;
    agent.args[grace] = "0.5".into();
    agent.spawn();
    wait_until("the orphan deleted", Duration::from_secs(5), || {
        server.mappings().is_empty().then_some(())
    });
}

#[test]
fn draft_s2_3_two_agents_never_touch_each_others_mappings() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let a = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    let bdir = state.path().join("b");
    let mut b = Agent::start(
        &bdir,
        server.addr(),
        ip,
        &["--no-announce-listen", "--adopt-grace", "1"],
    );
    a.add("web", 8080, json!({}));
    b.add("db", 5432, json!({}));
    let a_held = a.wait_granted(1, Duration::from_secs(5));
    b.wait_granted(1, Duration::from_secs(5));
    // B asks for A's port: the server refuses B's nonce, A is untouched.
    b.add("web", 8080, json!({}));
    wait_until("B's request refused", Duration::from_secs(5), || {
        b.list()
            .iter()
            .any(|m| m["port"] == json!(8080) && m["state"] == json!("failed"))
            .then_some(())
    });
    // B loses its store and reconstructs: it must not delete A's mapping.
    b.kill9();
    std::fs::remove_file(bdir.join("store.json")).unwrap();
    b.spawn();
    wait_until("B's orphans deleted", Duration::from_secs(6), || {
        (server.mappings().len() == 1).then_some(())
    });
    let left = server.mappings();
    assert_eq!(left[0].0, 8080, "A's mapping is still there");
    assert_eq!(
        (left[0].1.clone(), left[0].2.clone()),
        (a_held[0].1.clone(), a_held[0].2.clone())
    );
    assert_eq!(a.wait_granted(1, Duration::from_secs(1)), a_held);
    assert_eq!(counter(&a.status(), "recreates"), 0);
}

#[test]
fn draft_s2_1_server_address_change_on_reload() {
    let ip = host_ip();
    let s1 = Server::start(RELAXED);
    let s2 = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let cfg = state.path().join("agent.toml");
    std::fs::write(&cfg, format!("server = \"{}\"\n", s1.addr())).unwrap();
    let agent = Agent::start(
        &state.path().join("a"),
        s1.addr(),
        ip,
        &["--config", cfg.to_str().unwrap()],
    );
    agent.add("web", 8080, json!({}));
    agent.wait_granted(1, Duration::from_secs(5));
    assert_eq!(s1.mappings().len(), 1);
    std::fs::write(&cfg, format!("server = \"{}\"\n", s2.addr())).unwrap();
    let t0 = now();
    let ok = Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    wait_until(
        "the mapping on the new server",
        Duration::from_secs(5),
        || (s2.mappings().len() == 1).then_some(()),
    );
    eprintln!("server address change recovery: {:?}", t0.elapsed());
    assert_eq!(agent.status()["server"], json!(s2.addr().to_string()));
    agent.wait_granted(1, Duration::from_secs(2));
}

#[test]
fn rfc6887_s7_4_unknown_result_code_is_an_event_not_a_crash() {
    let ip = host_ip();
    // A fake server answering everything with result code 77, error
    // lifetime 2 s, and noting when each MAP arrives.
    let fake = UdpSocket::bind("127.0.0.1:0").unwrap();
    fake.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let addr = fake.local_addr().unwrap();
    let maps = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let responder = {
        let (maps, stop) = (maps.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut buf = [0u8; 1100];
                let Ok((n, from)) = fake.recv_from(&mut buf) else {
                    continue;
                };
                if n < 24 {
                    continue;
                }
                if buf[1] & 0x7f == 1 {
                    maps.lock().unwrap().push(now());
                }
                let mut resp = buf[..n].to_vec();
                resp[1] |= 0x80;
                resp[2] = 0;
                resp[3] = 77;
                resp[4..8].copy_from_slice(&2u32.to_be_bytes());
                resp[8..12].copy_from_slice(&100u32.to_be_bytes());
                resp[12..24].fill(0);
                let _ = fake.send_to(&resp, from);
            }
        })
    };
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state.path().join("a"), addr, ip, &[]);
    agent.add("web", 8080, json!({}));
    wait_until("two MAP attempts", Duration::from_secs(6), || {
        (maps.lock().unwrap().len() >= 2).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    responder.join().unwrap();
    let arrivals = maps.lock().unwrap().clone();
    let gap = arrivals[1] - arrivals[0];
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, before the error lifetime"
    );
    let m = &agent.list()[0];
    assert_eq!(m["last_result"], json!(77), "{m}");
    assert_eq!(m["state"], json!("failed"));
    assert!(
        agent.try_call(&json!({"op": "status"})).is_some(),
        "still running"
    );
}

/// An agent in `state` whose user config holds `user` and whose
/// administrator policy holds `admin`.
fn agent_with_policy(server: &Server, ip: IpAddr, state: &Path, user: &str, admin: &str) -> Agent {
    let (u, a) = (state.join("user.toml"), state.join("admin.toml"));
    std::fs::write(&u, user).unwrap();
    std::fs::write(&a, admin).unwrap();
    Agent::start(
        &state.join("a"),
        server.addr(),
        ip,
        &[
            "--config",
            u.to_str().unwrap(),
            "--policy",
            a.to_str().unwrap(),
        ],
    )
}

#[test]
fn rfc7767_s4_policy_file_overrides_application() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let agent = agent_with_policy(
        &server,
        ip,
        state.path(),
        "[apps.web]\ncheckpoint = false\n[apps.cam]\ncheckpoint = true\n",
        "[apps.web]\ncheckpoint = true\n",
    );
    let web = agent.add("web", 8080, json!({"checkpoint": false}));
    assert_eq!(
        (web["checkpoint"].clone(), web["checkpoint_source"].clone()),
        (json!(true), json!("policy:app"))
    );
    let cam = agent.add("cam", 554, json!({"checkpoint": false}));
    assert_eq!(
        (cam["checkpoint"].clone(), cam["checkpoint_source"].clone()),
        (json!(true), json!("config:app"))
    );
    let other = agent.add("other", 80, json!({"checkpoint": true}));
    assert_eq!(other["checkpoint_source"], json!("application"));
    agent.wait_granted(3, Duration::from_secs(5));
    // A standalone server honours no check-point: reported, not an error.
    assert!(agent
        .list()
        .iter()
        .all(|m| m["checkpoint_honoured"] == json!(false)));
}

/// RFC 7767 section 4, example 3: an application marks a check-point it
/// must have (an emergency call) as mandatory; the user's settings cannot
/// turn it off, the administrator's policy can. The precedence table is in
/// docs/agent.md.
#[test]
fn rfc7767_s4_a_mandatory_checkpoint_beats_the_user_not_the_administrator() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let mut agent = agent_with_policy(
        &server,
        ip,
        state.path(),
        "[apps.sos]\ncheckpoint = false\n[apps.blocked]\ncheckpoint = false\n",
        "[apps.blocked]\ncheckpoint = false\n",
    );
    let source = |v: &Value| (v["checkpoint"].clone(), v["checkpoint_source"].clone());
    let sos = agent.add("sos", 911, json!({"checkpoint": true, "mandatory": true}));
    assert_eq!(source(&sos), (json!(true), json!("application:mandatory")));
    let plain = agent.add("sos", 912, json!({"checkpoint": true}));
    assert_eq!(source(&plain), (json!(false), json!("config:app")));
    let blocked = agent.add(
        "blocked",
        913,
        json!({"checkpoint": true, "mandatory": true}),
    );
    assert_eq!(source(&blocked), (json!(false), json!("policy:app")));
    // The mark survives the agent's restart (it is stored).
    std::thread::sleep(Duration::from_millis(400)); // the store's batch
    agent.kill9();
    agent.spawn();
    let listed = agent.list();
    let m = listed.iter().find(|m| m["port"] == json!(911)).unwrap();
    assert_eq!(m["checkpoint_source"], json!("application:mandatory"));
}

/// Failure-scenarios draft section 2.2: an application's liveness bounds
/// its mappings. One application dies (its API connection closes) and does
/// not come back: its mapping is deleted once the grace period passes.
/// Another restarts within it and resumes its mapping (same external
/// endpoint, same nonce). A one-shot caller keeps its mapping with
/// heartbeats; a `persistent` add and an application the config declares
/// keep theirs without.
#[test]
fn draft_s2_2_an_applications_mappings_end_with_it_after_a_grace_period() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let user = state.path().join("user.toml");
    std::fs::write(&user, "[apps.declared]\n").unwrap();
    let dir = state.path().join("a");
    let agent = Agent::start(
        &dir,
        server.addr(),
        ip,
        &["--app-grace", "2", "--config", user.to_str().unwrap()],
    );
    let sock = dir.join("agent.sock");
    // An application holds its connection open while it runs.
    let session = |app: &str, port: u16| {
        let mut s = UnixStream::connect(&sock).unwrap();
        let req = json!({"op": "add", "app": app, "protocol": "tcp", "port": port});
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], json!(true), "{v}");
        s
    };
    let dies = session("dies", 7001);
    let restarts = session("restarts", 7002);
    agent.add("oneshot", 7003, json!({}));
    agent.add("kept", 7004, json!({"persistent": true}));
    agent.add("declared", 7005, json!({}));
    let before = agent.wait_granted(5, Duration::from_secs(5));
    // Both applications go away; one comes back within the grace period.
    drop(dies);
    drop(restarts);
    std::thread::sleep(Duration::from_millis(800));
    let _restarted = session("restarts", 7002);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(800));
        let v = agent.call(&json!({"op": "heartbeat", "app": "oneshot"}));
        assert_eq!(v["mappings"], json!(1), "{v}");
    }
    let held: Vec<u64> = agent
        .list()
        .iter()
        .map(|m| m["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        held,
        vec![7002, 7003, 7004, 7005],
        "the dead application's mapping went, the others stay"
    );
    // Deleted on the server too, and the one that restarted is the same.
    let on_server: Vec<u16> = server.mappings().iter().map(|m| m.0).collect();
    assert!(!on_server.contains(&7001), "{on_server:?}");
    let same = |port: u16| before.iter().find(|m| m.0 == port).cloned();
    assert_eq!(
        server.mappings().iter().find(|m| m.0 == 7002).cloned(),
        same(7002),
        "resumed: same external endpoint and nonce"
    );
    // Without heartbeats, the one-shot caller's mapping goes too.
    std::thread::sleep(Duration::from_millis(2600));
    let held: Vec<u64> = agent
        .list()
        .iter()
        .map(|m| m["port"].as_u64().unwrap())
        .collect();
    assert_eq!(held, vec![7002, 7004, 7005]);
}

/// Runs `portkeep agent ...` as user `uid` (root only can do that).
fn agent_cli_as(uid: u32, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ])
        .arg(BINS.cli())
        .args(["agent", "--state-dir", dir.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

/// The agent's socket takes requests from any local process it lets in;
/// SO_PEERCRED names the caller's user, and a mapping can be removed only
/// by the user who added it, or by root.
#[test]
fn agent_api_another_users_process_cannot_remove_an_applications_mapping() {
    const NAME: &str = "agent_api_another_users_process_cannot_remove_an_applications_mapping";
    if !portkeep_test_support::skip::is_root() {
        return portkeep_test_support::skip::skip(NAME, "running as other users needs root");
    }
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("a");
    let agent = Agent::start(&dir, server.addr(), ip, &[]);
    // Let other users reach the socket (the operator's choice, by file
    // permissions; the agent itself still checks who calls).
    use std::os::unix::fs::PermissionsExt;
    for d in [state.path(), dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        dir.join("agent.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let (alice, bob) = (60_001, 60_002);
    let key = ["--app", "web", "--protocol", "tcp", "--port", "8080"];
    let add = agent_cli_as(alice, &dir, &[&["add"][..], &key[..]].concat());
    assert!(add.status.success(), "{add:?}");
    let by_bob = agent_cli_as(bob, &dir, &[&["remove"][..], &key[..]].concat());
    assert!(
        !by_bob.status.success(),
        "another user removed it: {by_bob:?}"
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&by_bob.stdout),
        String::from_utf8_lossy(&by_bob.stderr)
    );
    assert!(said.contains("user 60001"), "{said}");
    assert_eq!(agent.list().len(), 1, "still held");
    let by_alice = agent_cli_as(alice, &dir, &[&["remove"][..], &key[..]].concat());
    assert!(by_alice.status.success(), "{by_alice:?}");
    assert!(agent.list().is_empty());
    // Root may remove anyone's.
    let add = agent_cli_as(alice, &dir, &[&["add"][..], &key[..]].concat());
    assert!(add.status.success(), "{add:?}");
    let r = agent.call(&json!({"op": "remove", "app": "web", "protocol": "tcp", "port": 8080}));
    assert_eq!(r["ok"], json!(true), "{r}");
}

/// RFC 6887 section 13.1 with failure-scenarios draft section 2.6.1: one
/// agent manages mappings for three hosts with THIRD_PARTY; the operator
/// clears one host's subscriber. The agent's one epoch restarts (its
/// section 8.5 check fails once, not in a loop), and the server makes anew
/// exactly that host's two mappings, once, through several renewal cycles.
#[test]
fn draft_s2_6_1_an_agent_managing_three_hosts_recreates_exactly_the_cleared_ones_once() {
    let ip = host_ip();
    let IpAddr::V4(v4) = ip else { unreachable!() };
    let [a, b, c, _] = v4.octets();
    let hosts: Vec<IpAddr> = (11..14).map(|d| IpAddr::from([a, b, c, d])).collect();
    let config = format!("[lifetime]\nmin = 4\n[third_party]\nallow = [\"{ip}/32\"]\n");
    let server = Server::start(&config);
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    for (i, h) in hosts.iter().enumerate() {
        for k in 0..2u16 {
            let port = 7000 + i as u16 * 10 + k;
            let v = agent.add(
                "iwf",
                port,
                json!({"host": h.to_string(), "lifetime": 4, "persistent": true}),
            );
            assert_eq!(v["ok"], json!(true), "{v}");
        }
    }
    agent.wait_granted(6, Duration::from_secs(5));
    assert_eq!(server.mappings().len(), 6);
    let created = |s: &Server| s.ctl(&["counters"])["created"].as_u64().unwrap();
    assert_eq!(created(&server), 6);
    // Long enough for the section 8.5 check to see a reset.
    std::thread::sleep(Duration::from_millis(3000));
    let cleared = server.ctl(&["clear", "--subscriber", &hosts[0].to_string()]);
    assert_eq!(cleared["removed"], json!(2), "{cleared}");
    // Several renewal cycles (lifetime 4 s: a renewal every 2 s or so).
    std::thread::sleep(Duration::from_secs(9));
    let st = agent.status();
    assert_eq!(
        counter(&st, "epoch_failures"),
        1,
        "one failed check, no loop: {st}"
    );
    assert_eq!(
        created(&server),
        8,
        "exactly the cleared host's two mappings made anew, once"
    );
    assert_eq!(server.mappings().len(), 6, "all held again");
    let listed = agent.list();
    assert!(
        listed.iter().all(|m| m["state"] == json!("granted")),
        "{listed:?}"
    );
}

#[test]
fn draft_s2_4_internal_address_change_reinstalls_and_deletes_stale() {
    let ip = host_ip();
    let IpAddr::V4(v4) = ip else { unreachable!() };
    let [a, b, c, _] = v4.octets();
    let ip2 = IpAddr::V4(Ipv4Addr::new(a, b, c, 2));
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let cfg = state.path().join("agent.toml");
    std::fs::write(&cfg, format!("bind = \"{ip}\"\n")).unwrap();
    let agent = Agent::start(
        &state.path().join("a"),
        server.addr(),
        ip,
        &["--config", cfg.to_str().unwrap()],
    );
    agent.add("web", 8080, json!({}));
    agent.add("ssh", 22, json!({}));
    agent.wait_granted(2, Duration::from_secs(5));
    let internal = |s: &Server| -> Vec<String> {
        let v = s.ctl(&["mappings"]);
        let mut ips: Vec<String> = v["mappings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["internal_ip"].as_str().unwrap().to_owned())
            .collect();
        ips.sort();
        ips
    };
    assert_eq!(internal(&server), vec![ip.to_string(); 2]);
    std::fs::write(&cfg, format!("bind = \"{ip2}\"\n")).unwrap();
    let t0 = now();
    let ok = Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    // Re-installed from the new address, the stale ones deleted.
    wait_until(
        "mappings moved to the new address",
        Duration::from_secs(5),
        || (internal(&server) == vec![ip2.to_string(); 2]).then_some(()),
    );
    eprintln!("internal address change recovery: {:?}", t0.elapsed());
    agent.wait_granted(2, Duration::from_secs(2));
    assert_eq!(agent.status()["client_ip"], json!(ip2.to_string()));
}

#[test]
fn draft_s2_2_application_restart_remove_then_add_at_once() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    agent.add("web", 8080, json!({}));
    let before = agent.wait_granted(1, Duration::from_secs(5));
    // The application shuts down (remove) and starts again (add) before
    // the delete could be answered.
    let r = agent.call(&json!({"op": "remove", "app": "web", "protocol": "tcp", "port": 8080}));
    assert_eq!(r["ok"], json!(true), "{r}");
    agent.add("web", 8080, json!({}));
    let after = agent.wait_granted(1, Duration::from_secs(5));
    assert_eq!(after[0].2, before[0].2, "same derived nonce");
    wait_until(
        "the mapping held on the server",
        Duration::from_secs(5),
        || (server.mappings().len() == 1).then_some(()),
    );
}

#[test]
fn draft_s2_3_crash_looping_application_gets_short_lifetimes() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    let first = agent.add("flaky", 8080, json!({"lifetime": 3600}));
    assert_eq!(first["lifetime"], json!(3600));
    agent.wait_granted(1, Duration::from_secs(5));
    // The application restarts twice more and asks again each time.
    agent.add("flaky", 8080, json!({"lifetime": 3600}));
    let third = agent.add("flaky", 8080, json!({"lifetime": 3600}));
    assert_eq!(third["crash_looping"], json!(true), "{third}");
    assert_eq!(third["lifetime"], json!(120));
    // Applied at once with a renewal, not an hour later.
    wait_until(
        "the server's lifetime shortened",
        Duration::from_secs(5),
        || {
            let v = server.ctl(&["mappings"]);
            let l = v["mappings"][0]["lifetime"].as_u64()?;
            (l <= 120).then_some(())
        },
    );
    assert_eq!(server.mappings().len(), 1, "the same mapping, renewed");
}

#[test]
fn api_bad_requests_are_refused_and_the_agent_keeps_running() {
    let ip = host_ip();
    let server = Server::start(RELAXED);
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state.path().join("a"), server.addr(), ip, &[]);
    let sock = state.path().join("a").join("agent.sock");
    let ask = |line: &str| -> Value {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = writeln!(s, "{line}");
        let mut answer = String::new();
        let _ = BufReader::new(s).read_line(&mut answer);
        serde_json::from_str(&answer).unwrap_or(Value::Null)
    };
    for bad in [
        "not json",
        r#"{"op":"frobnicate"}"#,
        r#"{"op":"add","app":"x","protocol":"bogus","port":1}"#,
        r#"{"op":"add","app":"x","protocol":"tcp","port":0}"#,
        r#"{"op":"add","app":"x","protocol":"tcp","port":70000}"#,
        r#"{"op":"add","app":"","protocol":"tcp","port":80}"#,
        r#"{"op":"remove","app":"nobody","protocol":"tcp","port":80}"#,
    ] {
        let v = ask(bad);
        assert_eq!(v["ok"], json!(false), "{bad} -> {v}");
    }
    let long = "x".repeat(100_000);
    assert_eq!(ask(&long)["ok"], json!(false));
    assert_eq!(agent.status()["ok"], json!(true), "still serving");
    assert!(agent.list().is_empty());
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The docs/performance.md benchmark: one agent keeps 10,000 mappings;
/// after `ctl clear --all` (state loss with an ANNOUNCE) all are re-created.
/// Run with `cargo test -p portkeep --test agent_e2e -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: about a minute; run explicitly"]
fn bench_agent_10k_mappings_recreated_after_clear() {
    const N: u16 = 10_000;
    let ip = host_ip();
    let config = "[store]\nmode = \"relaxed\"\n[subscribers]\nmax_mappings = 20000\n";
    let server = Server::start(config);
    let state = tempfile::tempdir().unwrap();
    // Mappings kept whatever becomes of the adding connection: the
    // benchmark measures re-creation, not applications' liveness.
    let agent = Agent::start(
        &state.path().join("a"),
        server.addr(),
        ip,
        &["--app-grace", "0"],
    );
    // Pipelined adds on one connection: a writer thread and this reader.
    let t_add = now();
    let stream = UnixStream::connect(state.path().join("a").join("agent.sock")).unwrap();
    let mut w = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let line = json!({"op": "add", "app": format!("app{}", i % 50), "protocol": "udp", "port": 20_000 + i});
            writeln!(w, "{line}").unwrap();
        }
    });
    let mut r = BufReader::new(stream);
    for _ in 0..N {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
    }
    writer.join().unwrap();
    wait_until("10,000 granted", Duration::from_secs(60), || {
        (agent.status()["granted"] == json!(N)).then_some(())
    });
    eprintln!("10,000 adds answered and granted in {:?}", t_add.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    // Idle CPU over 10 s.
    let hz = 100.0; // USER_HZ on Linux
    let c0 = cpu_ticks(agent.pid());
    std::thread::sleep(Duration::from_secs(10));
    let idle = (cpu_ticks(agent.pid()) - c0) as f64 / hz / 10.0 * 100.0;
    eprintln!("agent idle CPU with 10,000 mappings: {idle:.2}% of one core");
    let s0 = agent.status();
    let t0 = now();
    let cleared = server.ctl(&["clear", "--all"]);
    assert_eq!(cleared["removed"], json!(N), "{cleared}");
    wait_until("all re-created", Duration::from_secs(30), || {
        (server.ctl(&["status"])["mappings"] == json!(N)).then_some(())
    });
    let took = t0.elapsed();
    let s1 = agent.status();
    let recreates = counter(&s1, "recreates") - counter(&s0, "recreates");
    let sent = counter(&s1, "datagrams_sent") - counter(&s0, "datagrams_sent");
    eprintln!(
        "re-created {recreates} mappings in {took:?} after ctl clear --all ({sent} datagrams, {:.0}/s average)",
        sent as f64 / took.as_secs_f64()
    );
    assert_eq!(recreates, u64::from(N));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// docs/performance.md: agent CPU while 10,000 mappings of 120 s renew
/// (about 150 renewals a second), measured over 60 s after the first
/// renewal round. Run with
/// `cargo test -p portkeep --test agent_e2e -- --ignored --nocapture bench_agent_10k_renewal`.
#[test]
#[ignore = "benchmark: about four minutes; run explicitly"]
fn bench_agent_10k_renewal_cpu() {
    const N: u16 = 10_000;
    let ip = host_ip();
    let config = "[store]\nmode = \"relaxed\"\n[subscribers]\nmax_mappings = 20000\n";
    let server = Server::start(config);
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &state.path().join("a"),
        server.addr(),
        ip,
        &["--app-grace", "0"],
    );
    let stream = UnixStream::connect(state.path().join("a").join("agent.sock")).unwrap();
    let mut w = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let line = json!({"op": "add", "app": "bench", "protocol": "udp", "port": 20_000 + i, "lifetime": 120});
            writeln!(w, "{line}").unwrap();
        }
    });
    let mut r = BufReader::new(stream);
    for _ in 0..N {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
    }
    writer.join().unwrap();
    wait_until("10,000 granted", Duration::from_secs(60), || {
        (agent.status()["granted"] == json!(N)).then_some(())
    });
    std::thread::sleep(Duration::from_secs(130));
    let s0 = agent.status();
    let c0 = cpu_ticks(agent.pid());
    std::thread::sleep(Duration::from_secs(60));
    let ticks = cpu_ticks(agent.pid()) - c0;
    let s1 = agent.status();
    let renewals = counter(&s1, "renewals") - counter(&s0, "renewals");
    let cpu = ticks as f64 / 100.0 / 60.0 * 100.0;
    eprintln!(
        "10,000 mappings of 120 s: {renewals} renewals in 60 s, agent CPU {cpu:.2}% of one core ({:.0} us per renewal)",
        ticks as f64 * 10_000.0 / renewals.max(1) as f64
    );
    assert_eq!(counter(&s1, "recreates"), 0, "{s1}");
    assert_eq!(server.ctl(&["status"])["mappings"], json!(N));
}
