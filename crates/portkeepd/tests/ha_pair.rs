//! An active/backup pair of real `portkeepd` processes on loopback, linked
//! over mutual TLS: check-pointed mappings are on the backup before their
//! response (RFC 7767 section 3.2), `kill -9` of the active loses none of
//! them, epochs continue exactly for the subscribers whose whole state was
//! check-pointed (failure-scenarios draft section 2.6, RFC 6887 section
//! 8.5), a cut link makes check-points not honoured until it resyncs, a
//! deposed active that returns is fenced, and a peer with the wrong key or
//! the wrong name is refused.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use portkeep_client::{EpochTracker, EpochVerdict};
use portkeep_proto::addr::from_wire;
use portkeep_proto::{CodePoints, OpData, Response};
use portkeep_test_support::daemon::examples_dir;
use portkeep_test_support::netns::{in_ns, ns_exec, setup, Lab};
use portkeep_test_support::pcp::{exchange_once, map_request, restartable_port, LOCALHOST};
use portkeep_test_support::process::{gen_certs, wall_ms, Bins, Portkeepd};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

fn fixed_port() -> u16 {
    restartable_port(LOCALHOST)
}

/// Certificates for node names, from `portkeepd gen-certs`.
fn certs(dir: &Path, names: &[&str]) {
    gen_certs(BINS.daemon(), dir, names);
}

/// One node's fixed addresses and files.
#[derive(Clone)]
struct NodeSpec {
    name: &'static str,
    peer_name: &'static str,
    pcp: SocketAddr,
    link: SocketAddr,
    peer_link: SocketAddr,
    data: PathBuf,
    certs: PathBuf,
    /// Appended to `[ha]` (e.g. `plaintext = true` instead of TLS).
    ha_extra: String,
    /// The network namespace it runs in (`None`: this one).
    netns: Option<String>,
    /// Another `portkeepd` to run (`None`: this build's).
    bin: Option<PathBuf>,
}

const POLICY: &str = r#"
[checkpoint]
max_mappings = 1000000
default_class = "open"
[checkpoint.classes.open]
checkpoint = "on-request"
[subscribers]
max_mappings = 100000
[limits]
max_mappings = 1000000
"#;

impl NodeSpec {
    fn config(&self, role: &str) -> String {
        let tls = if self.ha_extra.contains("plaintext") {
            String::new()
        } else {
            format!(
                "tls_ca = \"{c}/ca.pem\"\ntls_cert = \"{c}/{n}.pem\"\ntls_key = \"{c}/{n}.key\"\npeer_name = \"{p}\"\n",
                c = self.certs.display(),
                n = self.name,
                p = self.peer_name
            )
        };
        format!(
            "data_dir = \"{}\"\nlisten = [\"{}\"]\nworkers = 1\n{POLICY}\n[store]\nmode = \"durable\"\ncommit_delay_us = 0\n[ha]\nrole = \"{role}\"\nlisten = \"{}\"\npeer = \"{}\"\nack_timeout_ms = 200\nheartbeat_ms = 50\ndead_after_ms = 500\n{tls}{}\n",
            self.data.display(),
            self.pcp,
            self.link,
            self.peer_link,
            self.ha_extra
        )
    }
}

struct Node {
    spec: NodeSpec,
    proc: Portkeepd,
}

impl Node {
    fn start(spec: &NodeSpec, role: &str) -> Node {
        let cfg = spec.data.with_extension(format!("{role}.toml"));
        std::fs::write(&cfg, spec.config(role)).unwrap();
        let log = spec.data.with_extension(format!("{}.log", wall_ms()));
        let bin = spec.bin.as_deref().unwrap_or(BINS.daemon());
        let mut cmd = match &spec.netns {
            None => Command::new(bin),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
        };
        cmd.args(["--config", cfg.to_str().unwrap(), "--log-level", "info"])
            .env_remove("PORTKEEPD_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut n = Node {
            spec: spec.clone(),
            proc: Portkeepd::spawn(spec.name, bin, &mut cmd, spec.data.clone(), log),
        };
        n.wait(Duration::from_secs(10), "control socket", |s| {
            s["ok"] == true
        });
        n
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    fn ctl(&self, args: &[&str]) -> serde_json::Value {
        self.proc.ctl(args)
    }

    fn status(&self) -> serde_json::Value {
        self.ctl(&["status"])
    }

    /// Waits until `status` satisfies `ok`.
    fn wait(&mut self, within: Duration, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        self.proc.wait(within, what, ok);
    }

    fn wait_in_sync(&mut self) {
        self.wait(Duration::from_secs(20), "backup in sync", |s| {
            s["ha"]["in_sync"] == true && s["ha"]["role"] == "active"
        });
    }

    fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Every mapping the node holds, by (internal address, port).
    fn mappings(&self) -> HashMap<(IpAddr, u16), serde_json::Value> {
        self.ctl(&["mappings"])["mappings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let ip: IpAddr = m["internal_ip"].as_str().unwrap().parse().unwrap();
                ((ip, m["internal_port"].as_u64().unwrap() as u16), m.clone())
            })
            .collect()
    }
}

/// Two node specs on loopback sharing one CA.
fn pair(dir: &Path) -> (NodeSpec, NodeSpec) {
    let certs_dir = dir.join("certs");
    certs(&certs_dir, &["node-a", "node-b"]);
    let (la, lb) = (
        SocketAddr::new(LOCALHOST, fixed_port()),
        SocketAddr::new(LOCALHOST, fixed_port()),
    );
    let a = NodeSpec {
        name: "node-a",
        peer_name: "node-b",
        pcp: SocketAddr::new(LOCALHOST, fixed_port()),
        link: la,
        peer_link: lb,
        data: dir.join("a"),
        certs: certs_dir.clone(),
        ha_extra: String::new(),
        netns: None,
        bin: None,
    };
    let b = NodeSpec {
        name: "node-b",
        peer_name: "node-a",
        pcp: SocketAddr::new(LOCALHOST, fixed_port()),
        link: lb,
        peer_link: la,
        data: dir.join("b"),
        certs: certs_dir,
        ha_extra: String::new(),
        netns: None,
        bin: None,
    };
    (a, b)
}

fn client_socket(ip: IpAddr) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}

/// The epoch check of RFC 6887 section 8.5 with an ANNOUNCE to `server`.
fn epoch_check(tracker: &mut EpochTracker, server: SocketAddr, client: IpAddr) -> EpochVerdict {
    portkeep_test_support::pcp::epoch_check(tracker, server, client, Duration::from_millis(1500))
}

#[derive(Debug, Clone)]
struct Granted {
    external: SocketAddr,
    nonce: [u8; 12],
}

type Key = (IpAddr, u16);

/// Check-pointed (and, for `mixed` clients, volatile) MAP load against
/// `server` until `stop`; records every mapping whose response carried
/// CHECKPOINT_REQUIRED.
fn load(
    server: SocketAddr,
    clients: &[(IpAddr, bool)],
    first_port: u16,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<Key, Granted>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    load_in(None, server, clients, first_port, stop, acked)
}

/// [`load`] from network namespace `ns`.
fn load_in(
    ns: Option<&str>,
    server: SocketAddr,
    clients: &[(IpAddr, bool)],
    first_port: u16,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<Key, Granted>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    clients
        .iter()
        .map(|&(client, mixed)| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let ns = ns.map(str::to_owned);
            let body = move || {
                let sock = client_socket(client);
                sock.set_read_timeout(Some(Duration::from_millis(400)))
                    .unwrap();
                let mut port = first_port;
                while !stop.load(Ordering::Relaxed) {
                    port += 1;
                    let cp = !mixed || port.is_multiple_of(2);
                    let o = client.to_string();
                    let last = o.rsplit('.').next().unwrap().parse::<u8>().unwrap();
                    let nonce = [
                        last,
                        (port >> 8) as u8,
                        port as u8,
                        7,
                        7,
                        7,
                        7,
                        7,
                        7,
                        7,
                        7,
                        7,
                    ];
                    let req = map_request(client, port, 3600, nonce, cp);
                    let Some(r) = exchange_once(&sock, server, &req) else {
                        continue;
                    };
                    if r.header.result.0 != 0 || !r.checkpoint_honoured() {
                        continue;
                    }
                    let m = r.data.map_part().unwrap();
                    acked.lock().unwrap().insert(
                        (client, port),
                        Granted {
                            external: SocketAddr::new(from_wire(m.external_ip), m.external_port),
                            nonce,
                        },
                    );
                }
            };
            std::thread::spawn(move || match ns {
                Some(ns) => in_ns(&ns, body),
                None => body(),
            })
        })
        .collect()
}

/// Stops [`load`] and returns the check-points it saw acknowledged, enough
/// of them for the test to mean something.
fn finish_load(
    stop: &AtomicBool,
    threads: Vec<std::thread::JoinHandle<()>>,
    acked: &Mutex<HashMap<Key, Granted>>,
) -> HashMap<Key, Granted> {
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "load too light: {}", acked.len());
    acked
}

/// Every check-point whose response carried the option is on `node`, with
/// the same external endpoint and nonce, still flagged.
fn verify_checkpoints(node: &Node, acked: &HashMap<Key, Granted>) {
    let table = node.mappings();
    for (k, g) in acked {
        let m = table.get(k).unwrap_or_else(|| {
            panic!(
                "acknowledged check-point {k:?} lost on {}; log:\n{}",
                node.spec.name,
                node.log()
            )
        });
        assert_eq!(
            m["external"].as_str().unwrap(),
            g.external.to_string(),
            "{k:?}"
        );
        assert_eq!(m["nonce"].as_str().unwrap(), hex::encode(g.nonce), "{k:?}");
        assert_eq!(m["checkpoint"], true, "{k:?}");
    }
}

/// A UDP socket on the client's port 5350, to see ANNOUNCEs.
fn announce_listener(ip: IpAddr) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::new(ip, portkeep_proto::CLIENT_PORT)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s
}

fn got_announce(sock: &UdpSocket, within: Duration) -> Option<u32> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1100];
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Ok(r) = Response::parse(&buf[..n], &CodePoints::default()) {
                if matches!(r.data, OpData::Announce) {
                    return Some(r.header.epoch);
                }
            }
        }
    }
    None
}

fn seeded(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut rng = seed;
    move |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    }
}

#[test]
fn rfc7767_s3_2_kill_9_active_loses_no_acknowledged_checkpoint_and_epochs_follow_draft_2_6() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let seed = u64::from(std::process::id()) ^ wall_ms();
    eprintln!("kill schedule seed {seed}");
    let mut next = seeded(seed);
    // .50/.51 only ever ask for check-points; .52/.53 also hold volatile
    // mappings, so a takeover loses some of their state.
    let full: [IpAddr; 2] = ["127.0.0.50".parse().unwrap(), "127.0.0.51".parse().unwrap()];
    let mixed: [IpAddr; 2] = ["127.0.0.52".parse().unwrap(), "127.0.0.53".parse().unwrap()];
    let clients: Vec<(IpAddr, bool)> = full
        .iter()
        .map(|&c| (c, false))
        .chain(mixed.iter().map(|&c| (c, true)))
        .collect();
    let announces: Vec<UdpSocket> = mixed.iter().map(|&c| announce_listener(c)).collect();
    let full_ann: Vec<UdpSocket> = full.iter().map(|&c| announce_listener(c)).collect();
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let mut trackers: HashMap<IpAddr, EpochTracker> = HashMap::new();
    for (c, _) in &clients {
        let mut t = EpochTracker::new();
        assert_eq!(epoch_check(&mut t, sa.pcp, *c), EpochVerdict::First);
        trackers.insert(*c, t);
    }
    // Round 1: kill the active under load at a random moment: requests are
    // in flight before and after their acknowledgement.
    let (mut active, mut backup) = (a, b);
    let (mut active_spec, mut backup_spec) = (sa.clone(), sb.clone());
    for round in 0..3u16 {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = load(
            active_spec.pcp,
            &clients,
            1000 + round * 10_000,
            stop.clone(),
            acked.clone(),
        );
        // Round 0 runs long enough for a reset epoch to be detectable by
        // the section 8.5 check, which tolerates 2 s of disagreement.
        let base = if round == 0 { 3000 } else { 300 };
        std::thread::sleep(Duration::from_millis(base + next(700)));
        if round == 2 {
            // Mid-resync: the backup stalls past the bound, the active
            // gives up on it, and is killed while it resyncs the backup.
            backup.signal("STOP");
            active.wait(Duration::from_secs(10), "backup lost", |s| {
                s["ha"]["in_sync"] == false
            });
            backup.signal("CONT");
            std::thread::sleep(Duration::from_millis(next(30)));
        }
        active.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let promoted = backup.ctl(&["promote"]);
        assert_eq!(promoted["ok"], true, "{promoted}");
        eprintln!("round {round}: takeover {promoted}");
        let a = acked.lock().unwrap().clone();
        assert!(
            a.len() > 20 * (usize::from(round) + 1),
            "load too light: {}",
            a.len()
        );
        verify_checkpoints(&backup, &a);
        if round == 0 {
            assert_eq!(promoted["takeover"], "hot", "{promoted}");
            // Draft 2.6: a subscriber whose whole state was check-pointed
            // keeps its epoch; one with volatile state gets a reset epoch
            // and an ANNOUNCE.
            for c in &full {
                let v = epoch_check(trackers.get_mut(c).unwrap(), backup_spec.pcp, *c);
                assert_eq!(v, EpochVerdict::Valid, "{c}: fully check-pointed");
            }
            for (c, s) in mixed.iter().zip(&announces) {
                let epoch = got_announce(s, Duration::from_secs(3));
                assert!(epoch.is_some(), "{c}: ANNOUNCE after losing state");
                // Repeated, so one lost datagram does not hide the loss.
                let mut more = 0;
                while got_announce(s, Duration::from_millis(1500)).is_some() {
                    more += 1;
                }
                assert!(more >= 2, "{c}: ANNOUNCE repeated, got {more} more");
                let v = epoch_check(trackers.get_mut(c).unwrap(), backup_spec.pcp, *c);
                assert!(v.is_invalid(), "{c}: epoch must reset, got {v:?}");
            }
            for (c, s) in full.iter().zip(&full_ann) {
                assert!(
                    got_announce(s, Duration::from_millis(300)).is_none(),
                    "{c}: no ANNOUNCE for a subscriber that lost nothing"
                );
            }
        }
        // The old active comes back as backup of the new one.
        std::mem::swap(&mut active_spec, &mut backup_spec);
        active = backup;
        let _ = std::fs::remove_dir_all(&backup_spec.data);
        backup = Node::start(&backup_spec, "backup");
        active.wait_in_sync();
        // Synced again: everything acknowledged is on the new backup too.
        let st = backup.status();
        assert_eq!(
            st["ha"]["checkpointed_mappings"].as_u64().unwrap() as usize,
            active.status()["checkpointed"].as_u64().unwrap() as usize,
            "{st}"
        );
    }
}

/// Failure-scenarios draft section 2.6 and RFC 7767 section 3.2: under
/// check-pointed load the backup is killed and restarted from its stored
/// replica; it catches up from its position (`Message::Resume`), and the
/// active is killed the moment it counts that resume, with replies held
/// for the backup's acknowledgement still in flight. The backup, promoted,
/// serves every check-point whose response carried the option, same
/// external endpoint and nonce: a response is only ever released after the
/// backup stored what it depends on.
#[test]
fn draft_s2_6_the_active_killed_during_a_backups_resume_loses_no_acknowledged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let mut b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let clients: Vec<(IpAddr, bool)> = vec![
        ("127.0.0.93".parse().unwrap(), false),
        ("127.0.0.94".parse().unwrap(), false),
        ("127.0.0.95".parse().unwrap(), true),
    ];
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sa.pcp, &clients, 1000, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let resumes = a.status()["ha"]["resumes"].as_u64().unwrap();
    b.kill9();
    // Within the lease: the active holds what the backup has not
    // acknowledged, and changes pile up for the resume.
    std::thread::sleep(Duration::from_millis(500));
    let b = Node::start(&sb, "backup");
    let t = Instant::now();
    while a.status()["ha"]["resumes"].as_u64().unwrap() == resumes {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no resume: {}\n{}",
            a.status(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    a.kill9();
    let acked = finish_load(&stop, threads, &acked);
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    verify_checkpoints(&b, &acked);
}

/// RFC 7767 section 3.2 (an acknowledged check-point survives the
/// backup's crash too): under check-pointed load the backup is killed,
/// then the active; the backup alone comes back, from its stored replica,
/// and promoted serves every acknowledged check-point with its external
/// endpoint and nonce. The takeover is stale (the backup never heard what
/// the active did after it died), so every epoch resets and the RFC 6887
/// section 8.5 check fails for every client, as the takeover says. Once
/// it served, the node restarted as backup never resumes that replica.
#[test]
fn rfc7767_s3_2_backup_restarted_from_its_replica_then_promoted_serves_every_acknowledged_checkpoint(
) {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let mut b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let clients: Vec<(IpAddr, bool)> = vec![
        ("127.0.0.90".parse().unwrap(), false),
        ("127.0.0.91".parse().unwrap(), false),
        ("127.0.0.92".parse().unwrap(), true),
    ];
    let mut trackers: HashMap<IpAddr, EpochTracker> = HashMap::new();
    for (c, _) in &clients {
        let mut t = EpochTracker::new();
        assert_eq!(epoch_check(&mut t, sa.pcp, *c), EpochVerdict::First);
        trackers.insert(*c, t);
    }
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sa.pcp, &clients, 1000, stop.clone(), acked.clone());
    // Long enough for a reset epoch to be detectable by the section 8.5
    // check, which tolerates 2 s of disagreement.
    std::thread::sleep(Duration::from_millis(3000));
    let st = b.status();
    assert!(
        st["ha"]["replica_seq"].as_u64().unwrap_or(0) > 0,
        "the backup stores its replica: {st}"
    );
    b.kill9();
    std::thread::sleep(Duration::from_millis(300));
    a.kill9();
    let acked = finish_load(&stop, threads, &acked);
    let b = Node::start(&sb, "backup");
    let st = b.status();
    assert!(
        st["ha"]["checkpointed_mappings"].as_u64().unwrap() as usize >= acked.len(),
        "resumed from the stored replica: {st}"
    );
    assert!(st["ha"]["replica_seq"].as_u64().is_some(), "{st}");
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    assert_eq!(promoted["takeover"], "stale", "{promoted}");
    verify_checkpoints(&b, &acked);
    for (c, _) in &clients {
        let v = epoch_check(trackers.get_mut(c).unwrap(), sb.pcp, *c);
        assert!(
            v.is_invalid(),
            "{c}: a stale takeover resets every epoch, got {v:?}"
        );
    }
    // It served: the replica it stored as a backup is no longer true and
    // is gone; what it served, in its store, stands for it instead (a
    // double failure must not lose what the node that served last held).
    let mut b = b;
    b.kill9();
    let b = Node::start(&sb, "backup");
    let st = b.status();
    assert!(st["ha"]["replica_seq"].is_null(), "{st}");
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["takeover"], "stale", "{promoted}");
    verify_checkpoints(&b, &acked);
}

/// Failure-scenarios draft sections 2.6 and 6: both nodes die at once (a
/// site power loss) and come back as backups (keepalived's layout), and
/// keepalived promotes the node that was active: what it served is in its
/// store and stands for it, so every acknowledged check-point is served
/// again (same external endpoint and nonce), and every epoch resets (the
/// takeover is stale: the node cannot know what happened after it died).
#[test]
fn draft_s2_6_both_nodes_down_the_former_active_promoted_keeps_every_acknowledged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let mut b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let clients: Vec<(IpAddr, bool)> = vec![
        ("127.0.0.97".parse().unwrap(), false),
        ("127.0.0.98".parse().unwrap(), true),
    ];
    let mut trackers: HashMap<IpAddr, EpochTracker> = HashMap::new();
    for (c, _) in &clients {
        let mut t = EpochTracker::new();
        assert_eq!(epoch_check(&mut t, sa.pcp, *c), EpochVerdict::First);
        trackers.insert(*c, t);
    }
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sa.pcp, &clients, 2000, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(3000));
    a.kill9();
    b.kill9();
    let acked = finish_load(&stop, threads, &acked);
    let a = Node::start(&sa, "backup");
    let _b = Node::start(&sb, "backup");
    let promoted = a.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    assert_eq!(promoted["takeover"], "stale", "{promoted}");
    verify_checkpoints(&a, &acked);
    for (c, _) in &clients {
        let v = epoch_check(trackers.get_mut(c).unwrap(), sa.pcp, *c);
        assert!(v.is_invalid(), "{c}: every epoch resets, got {v:?}");
    }
}

/// Failure-scenarios draft section 2.6, a double failure with the roles
/// of the configuration (no keepalived): the node configured active had
/// been deposed (its store emptied; it was the backup), both die, and it
/// comes back first. It waits for its peer instead of serving its empty
/// store; when the peer returns holding the state it served, the node
/// hands it the service, and every acknowledged check-point is served
/// again, same external endpoint and nonce. The node that stood down
/// refuses a promotion until it has synced.
#[test]
fn draft_s2_6_both_down_the_node_configured_active_hands_over_to_the_fresher_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sa, mut sb) = pair(dir.path());
    sa.ha_extra = "peer_wait_ms = 30000\n".into();
    sb.ha_extra = sa.ha_extra.clone();
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let clients: Vec<(IpAddr, bool)> = vec![
        ("127.0.0.101".parse().unwrap(), false),
        ("127.0.0.102".parse().unwrap(), true),
    ];
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sa.pcp, &clients, 3000, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    // The old active comes back as configured and is deposed: the backup
    // of the node that serves now.
    let mut a = Node::start(&sa, "active");
    a.wait(Duration::from_secs(10), "deposed", |s| {
        s["ha"]["role"] == "backup"
    });
    let mut b = b;
    b.wait_in_sync();
    // More check-points, on the new active.
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sb.pcp, &clients, 4000, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(1500));
    b.kill9();
    a.kill9();
    let acked = finish_load(&stop, threads, &acked);
    // Site power back: the node configured active first. Its store is
    // empty; it must not serve it while its peer may hold more.
    let mut a = Node::start(&sa, "active");
    let probe = client_socket("127.0.0.103".parse().unwrap());
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    for port in 1..=5u16 {
        let req = map_request("127.0.0.103".parse().unwrap(), port, 60, [3; 12], false);
        assert!(
            exchange_once(&probe, sa.pcp, &req).is_none(),
            "answered from an empty store while waiting for its peer; log:\n{}",
            a.log()
        );
    }
    assert_eq!(a.status()["ha"]["serving"], false);
    let mut b = Node::start(&sb, "backup");
    b.wait(Duration::from_secs(20), "handed the service", |s| {
        s["ha"]["role"] == "active" && s["ha"]["serving"] == true
    });
    a.wait(Duration::from_secs(20), "stood down", |s| {
        s["ha"]["role"] == "backup"
    });
    assert!(
        a.log().contains("handed it the service"),
        "log:\n{}",
        a.log()
    );
    verify_checkpoints(&b, &acked);
    assert_eq!(b.status()["ha"]["term"], 2, "{}", b.status());
    // The node that stood down syncs from the new active.
    b.wait_in_sync();
    a.wait(Duration::from_secs(20), "synced", |s| {
        s["ha"]["checkpointed_mappings"].as_u64().unwrap_or(0) as usize >= acked.len()
    });
}

// ---- Partitions: the link cut with both nodes alive ---------------------

/// A namespace of its own (loopback only) in which a pair runs and whose
/// link the test cuts with nftables; `None` where that cannot be done (the
/// test is then skipped, and fails under CI).
fn partition_lab(what: &str) -> Option<(Lab, String)> {
    setup(what, &["ip", "nft"], || {
        let mut lab = Lab::new("part")?;
        let ns = format!("pkpart-{}", lab.id);
        lab.add_ns(&ns)?;
        Ok((lab, ns))
    })
}

/// Both nodes in `ns`, on 127.0.0.1 and 127.0.0.2 (PCP on 5351, the
/// link on 7000), plaintext: the namespace is the test's alone.
fn pair_in(dir: &Path, ns: &str) -> (NodeSpec, NodeSpec) {
    let (mut a, mut b) = pair(dir);
    for (s, ip) in [(&mut a, [127, 0, 0, 1]), (&mut b, [127, 0, 0, 2])] {
        s.pcp = SocketAddr::from((ip, 5351));
        s.link = SocketAddr::from((ip, LINK_PORT));
        s.netns = Some(ns.to_owned());
        s.ha_extra = "plaintext = true\n".into();
    }
    a.peer_link = b.link;
    b.peer_link = a.link;
    (a, b)
}

const LINK_PORT: u16 = 7000;

/// Drops every segment of the link, both ways, from now on (a silent
/// partition: nothing is refused, nothing arrives).
fn cut_link(ns: &str) {
    let rules = format!(
        "add table inet pkcut; add chain inet pkcut out {{ type filter hook output priority 0; policy accept; }}; add rule inet pkcut out tcp dport {LINK_PORT} drop; add rule inet pkcut out tcp sport {LINK_PORT} drop"
    );
    ns_exec(ns, &["nft", &rules]).unwrap();
}

fn heal_link(ns: &str) {
    ns_exec(ns, &["nft", "delete", "table", "inet", "pkcut"]).unwrap();
}

/// Sends check-pointed MAP requests to `server` from `client` in `ns` for
/// `how_long`; returns how many answers honoured the check-point.
fn honoured_during(ns: &str, server: SocketAddr, client: IpAddr, how_long: Duration) -> usize {
    in_ns(ns, move || {
        let sock = client_socket(client);
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let end = Instant::now() + how_long;
        let (mut port, mut honoured) = (100u16, 0);
        while Instant::now() < end {
            port += 1;
            let req = map_request(client, port, 3600, [5; 12], true);
            if let Some(r) = exchange_once(&sock, server, &req) {
                if r.header.result.0 == 0 && r.checkpoint_honoured() {
                    honoured += 1;
                }
            }
        }
        honoured
    })
}

/// Failure-scenarios draft sections 2.6 and 6 and RFC 7767 section 3.2:
/// the link between the nodes is cut with both alive and nobody promotes
/// the backup (no witness, no keepalived). The active goes on serving,
/// but honours no check-point it cannot have confirmed; when the link
/// heals the backup catches up, and every check-point ever acknowledged
/// is on it: promoted, it serves each, same external endpoint and nonce.
#[test]
fn draft_s2_6_a_partition_with_both_nodes_alive_loses_no_acknowledged_checkpoint() {
    let Some((lab, ns)) = partition_lab("partition with both nodes alive") else {
        return;
    };
    let (sa, sb) = pair_in(&lab.dir, &ns);
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let clients: Vec<(IpAddr, bool)> = vec![
        ("127.0.0.60".parse().unwrap(), false),
        ("127.0.0.61".parse().unwrap(), true),
    ];
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load_in(
        Some(&ns),
        sa.pcp,
        &clients,
        1000,
        stop.clone(),
        acked.clone(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    cut_link(&ns);
    // Past the acknowledgement timeout and the lease, nothing reaches the
    // backup: no check-point is honoured, yet the active answers.
    std::thread::sleep(Duration::from_millis(2500));
    let client: IpAddr = "127.0.0.62".parse().unwrap();
    assert_eq!(
        honoured_during(&ns, sa.pcp, client, Duration::from_secs(2)),
        0,
        "a check-point honoured with the backup unreachable; log:\n{}",
        a.log()
    );
    let st = a.status();
    assert_eq!(st["ha"]["serving"], true, "{st}");
    assert_eq!(st["ha"]["in_sync"], false, "{st}");
    assert_eq!(b.status()["ha"]["role"], "backup");
    heal_link(&ns);
    a.wait_in_sync();
    std::thread::sleep(Duration::from_millis(1000));
    let acked = finish_load(&stop, threads, &acked);
    a.kill9();
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    verify_checkpoints(&b, &acked);
}

/// The same cut, and the backup promoted meanwhile, as keepalived would
/// (VRRP cannot tell a cut link from a dead node: both nodes serve until
/// the link heals, the split brain an external witness prevents). Neither
/// honours a check-point it cannot confirm; when the link heals the node
/// of the older term is fenced, becomes the backup of the newer, and every
/// check-point acknowledged before the cut is on both.
#[test]
fn design_fencing_a_backup_promoted_during_a_partition_fences_the_old_active_when_it_heals() {
    let Some((lab, ns)) = partition_lab("partition with a promotion") else {
        return;
    };
    let (sa, sb) = pair_in(&lab.dir, &ns);
    let mut b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let clients: Vec<(IpAddr, bool)> = vec![("127.0.0.70".parse().unwrap(), false)];
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load_in(
        Some(&ns),
        sa.pcp,
        &clients,
        1000,
        stop.clone(),
        acked.clone(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let acked = finish_load(&stop, threads, &acked);
    cut_link(&ns);
    std::thread::sleep(Duration::from_millis(600));
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    std::thread::sleep(Duration::from_millis(2500));
    // Both answer (split brain, bounded by the partition); neither
    // honours a check-point it cannot confirm.
    for (who, server) in [("old active", sa.pcp), ("new active", sb.pcp)] {
        let client: IpAddr = "127.0.0.71".parse().unwrap();
        assert_eq!(
            honoured_during(&ns, server, client, Duration::from_millis(1500)),
            0,
            "{who} honoured a check-point with its peer unreachable"
        );
    }
    assert_eq!(a.status()["ha"]["serving"], true);
    heal_link(&ns);
    a.wait(Duration::from_secs(20), "fenced", |s| {
        s["ha"]["role"] == "backup" && s["ha"]["term"] == 1
    });
    b.wait_in_sync();
    a.wait(Duration::from_secs(20), "synced", |s| {
        s["ha"]["checkpointed_mappings"].as_u64().unwrap_or(0) as usize >= acked.len()
    });
    verify_checkpoints(&b, &acked);
    b.kill9();
    let promoted = a.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}");
    verify_checkpoints(&a, &acked);
}

/// RFC 7767 section 3.2 and RFC 6887 section 8.5: a stored replica that
/// does not read back whole is never half-loaded (it could claim
/// check-points it lost): it is moved aside, with a log line naming it,
/// and the backup starts cold; promoted, it continues nothing and every
/// epoch resets.
#[test]
fn rfc7767_s3_2_a_damaged_replica_is_moved_aside_and_the_backup_starts_cold() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let mut b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let client: IpAddr = "127.0.0.96".parse().unwrap();
    let sock = client_socket(client);
    for port in 1..=5u16 {
        let req = map_request(client, port, 3600, [port as u8; 12], true);
        let r = exchange_once(&sock, sa.pcp, &req).unwrap();
        assert!(r.checkpoint_honoured());
    }
    let st = b.status();
    assert!(st["ha"]["replica_seq"].as_u64().unwrap_or(0) > 0, "{st}");
    b.kill9();
    a.kill9();
    let file = sb.data.join("replica.redb");
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    std::fs::write(&file, vec![0x5a; len]).unwrap();
    let b = Node::start(&sb, "backup");
    assert!(
        b.log().contains("is damaged") && b.log().contains("starting cold"),
        "{}",
        b.log()
    );
    let aside = std::fs::read_dir(&sb.data)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("replica.redb.damaged-")
        });
    assert!(aside, "the damaged replica is kept aside");
    let st = b.status();
    assert_eq!(st["ha"]["checkpointed_mappings"], 0, "{st}");
    assert!(st["ha"]["replica_seq"].is_null(), "{st}");
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["takeover"], "cold", "{promoted}");
    assert!(b.mappings().is_empty());
}

#[test]
fn rfc7767_s3_2_link_cut_answers_without_the_option_then_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let client: IpAddr = "127.0.0.60".parse().unwrap();
    let sock = client_socket(client);
    let ask = |port: u16| {
        let req = map_request(client, port, 3600, [port as u8; 12], true);
        let r = exchange_once(&sock, sa.pcp, &req).expect("answered");
        assert_eq!(r.header.result.0, 0);
        r.checkpoint_honoured()
    };
    assert!(ask(1), "in sync: honoured");
    let lease = b.status()["ha"]["lease_left_ms"].as_u64().unwrap();
    assert!(
        lease > 0 && lease <= 1500,
        "in sync, the backup holds a lease: {lease}"
    );
    // The backup stalls: the held response is answered without the option
    // once the acknowledgement is overdue and the lease the backup holds
    // has ended (until then it could be promoted keeping the epochs, so
    // nothing it has not heard of leaves), and the mapping is not flagged.
    b.signal("STOP");
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    assert!(!ask(2), "unconfirmed check-point answered as not honoured");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_millis(3000),
        "answered when the 1.5 s lease ended: {waited:?}"
    );
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    assert!(
        a.status()["ha"]["responses_released_unconfirmed"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let m = a.mappings();
    assert_eq!(m[&(client, 2)]["checkpoint"], false);
    assert_eq!(
        m[&(client, 1)]["checkpoint"],
        true,
        "earlier ones keep theirs"
    );
    assert!(
        a.status()["ha"]["checkpoints_not_confirmed"]
            .as_u64()
            .unwrap()
            >= 1
    );
    // While out of sync nothing is honoured, with no wait.
    let t = Instant::now();
    assert!(!ask(3));
    assert!(t.elapsed() < Duration::from_millis(1000));
    b.signal("CONT");
    a.wait_in_sync();
    assert!(ask(4), "resynced: check-pointing resumes");
    let st = b.status();
    assert_eq!(st["ha"]["checkpointed_mappings"], 2, "{st}");
    // It caught up from its position: the changes it missed, no snapshot.
    let resumes = a.status()["ha"]["resumes"].as_u64().unwrap();
    assert!(resumes >= 1, "{}", a.status());
    // The backup goes away entirely, then comes back.
    let mut b = b;
    b.kill9();
    a.wait(Duration::from_secs(10), "backup gone", |s| {
        s["ha"]["in_sync"] == false
    });
    assert!(!ask(5));
    let b = Node::start(&sb, "backup");
    a.wait_in_sync();
    assert!(ask(6));
    assert_eq!(b.status()["ha"]["checkpointed_mappings"], 3);
    // Restarted from its stored replica, it resumed from there too.
    assert!(
        a.status()["ha"]["resumes"].as_u64().unwrap() > resumes,
        "{}",
        a.status()
    );
}

/// `portkeep_replication_lag_records` on the active: what it committed
/// that the backup has not acknowledged (RFC 7767 section 3.2 holds a
/// check-point's answer for that acknowledgement). Zero once the backup
/// has confirmed everything, volatile traffic included; above zero while
/// the backup is frozen; zero again when it caught up.
#[test]
fn rfc7767_s3_2_the_replication_lag_metric_counts_what_the_backup_has_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sa, sb) = pair(dir.path());
    let metrics = SocketAddr::new(LOCALHOST, fixed_port());
    sa.ha_extra = format!("\n[metrics]\nlisten = \"{metrics}\"\n");
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let gauge = |series: &str| -> u64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(series))
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    let lag = || gauge("portkeep_replication_lag_records ");
    let settles = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lag() != 0 {
            assert!(Instant::now() < deadline, "lag never back to 0 {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let client: IpAddr = "127.0.0.61".parse().unwrap();
    let sock = client_socket(client);
    for port in 1..=20u16 {
        let req = map_request(client, port, 3600, [port as u8; 12], port % 2 == 0);
        let r = exchange_once(&sock, sa.pcp, &req).expect("answered");
        assert_eq!(r.header.result.0, 0);
    }
    settles("after check-pointed and volatile requests in sync");

    b.signal("STOP");
    // Not waited for: each is committed at once, and held for the frozen
    // backup's acknowledgement.
    for port in 21..=25u16 {
        let req = map_request(client, port, 3600, [port as u8; 12], true);
        sock.send_to(&req, sa.pcp).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    while seen == 0 {
        assert!(Instant::now() < deadline, "the lag never showed");
        seen = lag();
    }
    assert!(seen >= 1, "frozen backup: lag {seen}");
    b.signal("CONT");
    a.wait_in_sync();
    settles("once the backup caught up");

    // A backup that lost its replica takes a full resynchronisation: its
    // size is `portkeep_snapshot_items` (the 15 check-pointed mappings of
    // the ports 2, 4, ... 20 and 21..=25, and the epochs that go with them).
    let mut b = b;
    b.kill9();
    std::fs::remove_dir_all(&sb.data).unwrap();
    let _b = Node::start(&sb, "backup");
    a.wait_in_sync();
    let snapshot = gauge("portkeep_snapshot_items ");
    assert!(snapshot >= 15, "snapshot of {snapshot} items");
    assert_eq!(
        gauge("portkeep_resync_received_mappings "),
        0,
        "an active receives none"
    );
    settles("after the resync");
}

#[test]
fn design_fencing_old_active_returns_and_becomes_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let client: IpAddr = "127.0.0.70".parse().unwrap();
    let sock = client_socket(client);
    for port in 1..=5u16 {
        let r = exchange_once(
            &sock,
            sa.pcp,
            &map_request(client, port, 3600, [9; 12], true),
        )
        .unwrap();
        assert!(r.checkpoint_honoured());
    }
    a.kill9();
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["term"], 1, "{promoted}");
    // The new active changes state the old one never saw.
    let r = exchange_once(&sock, sb.pcp, &map_request(client, 1, 0, [9; 12], true)).unwrap();
    assert_eq!(r.header.result.0, 0);
    // The old active restarts with its old store and its old role: it must
    // never answer PCP, and must end up as the new active's backup.
    let probing = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicBool::new(false));
    let prober = {
        let (probing, answered) = (probing.clone(), answered.clone());
        let pcp = sa.pcp;
        std::thread::spawn(move || {
            let s = client_socket("127.0.0.71".parse().unwrap());
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            while probing.load(Ordering::Relaxed) {
                let req = map_request("127.0.0.71".parse().unwrap(), 1, 3600, [1; 12], false);
                if exchange_once(&s, pcp, &req).is_some() {
                    answered.store(true, Ordering::Relaxed);
                }
            }
        })
    };
    let mut old = Node::start(&sa, "active");
    old.wait(Duration::from_secs(10), "fenced", |s| {
        s["ha"]["role"] == "backup"
    });
    let mut b = b;
    b.wait_in_sync();
    probing.store(false, Ordering::Relaxed);
    prober.join().unwrap();
    assert!(
        !answered.load(Ordering::Relaxed),
        "a deposed active answered PCP; log:\n{}",
        old.log()
    );
    let st = old.status();
    assert_eq!(st["ha"]["term"], 1, "{st}");
    assert_eq!(st["ha"]["serving"], false);
    assert_eq!(
        st["ha"]["checkpointed_mappings"], 4,
        "the new active's state: {st}"
    );
    assert!(old.mappings().is_empty(), "no stale state served");
}

#[test]
fn design_link_wrong_key_or_plaintext_peer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    // The active's certificate comes from another CA.
    let other = dir.path().join("other");
    certs(&other, &["node-a"]);
    let mut rogue = sa.clone();
    rogue.certs = other;
    // Serving at once when the peer cannot be reached (this test is about
    // the link's authentication, not the wait for a fresher peer).
    rogue.ha_extra = "peer_wait_ms = 0\n".into();
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&rogue, "active");
    a.wait(Duration::from_secs(10), "serving", |s| {
        s["ha"]["serving"] == true
    });
    std::thread::sleep(Duration::from_millis(800));
    let client: IpAddr = "127.0.0.80".parse().unwrap();
    let sock = client_socket(client);
    let r = exchange_once(
        &sock,
        rogue.pcp,
        &map_request(client, 1, 3600, [3; 12], true),
    )
    .unwrap();
    assert_eq!(r.header.result.0, 0);
    assert!(
        !r.checkpoint_honoured(),
        "no authenticated backup: not honoured"
    );
    let st = b.status();
    assert!(
        st["ha"]["refused_connections"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert_eq!(st["ha"]["checkpointed_mappings"], 0);
    assert_eq!(st["ha"]["in_sync"], false);
    drop(a);
    // A plaintext peer gets nowhere with a TLS backup either.
    let mut plain = sa.clone();
    plain.ha_extra = "plaintext = true\npeer_wait_ms = 0\n".into();
    let mut a = Node::start(&plain, "active");
    a.wait(Duration::from_secs(10), "serving", |s| {
        s["ha"]["serving"] == true
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(a.status()["ha"]["in_sync"], false);
    let st = b.status();
    assert!(
        st["ha"]["refused_connections"].as_u64().unwrap() >= 2,
        "{st}"
    );
    assert!(
        b.log().contains("replication peer refused"),
        "refusals are logged"
    );
}

#[test]
fn design_link_backup_refuses_a_certificate_of_the_pair_ca_with_another_name() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, mut sb) = pair(dir.path());
    // One CA for three names: node-c's chain is as valid as node-a's, but
    // the backup's `peer_name` is node-a.
    let three = dir.path().join("three");
    certs(&three, &["node-a", "node-b", "node-c"]);
    sb.certs = three.clone();
    let mut rogue = sa.clone();
    rogue.name = "node-c";
    rogue.certs = three.clone();
    rogue.ha_extra = "peer_wait_ms = 0\n".into();
    let mut b = Node::start(&sb, "backup");
    let mut a = Node::start(&rogue, "active");
    a.wait(Duration::from_secs(10), "serving", |s| {
        s["ha"]["serving"] == true
    });
    b.wait(Duration::from_secs(10), "a refused connection", |s| {
        s["ha"]["refused_connections"].as_u64().unwrap_or(0) >= 1
    });
    std::thread::sleep(Duration::from_millis(800));
    let client: IpAddr = "127.0.0.81".parse().unwrap();
    let sock = client_socket(client);
    let r = exchange_once(
        &sock,
        rogue.pcp,
        &map_request(client, 1, 3600, [4; 12], true),
    )
    .unwrap();
    assert_eq!(r.header.result.0, 0);
    assert!(
        !r.checkpoint_honoured(),
        "no authenticated backup: not honoured"
    );
    assert_eq!(a.status()["ha"]["in_sync"], false);
    let st = b.status();
    let why = st["ha"]["last_refusal"].as_str().unwrap_or_default();
    assert!(why.contains("not valid for `node-a`"), "{st}");
    assert_eq!(st["ha"]["checkpointed_mappings"], 0);
    assert_eq!(st["ha"]["in_sync"], false);
    drop(a);
    // The certificate that does carry the name gets the same backup in sync.
    let mut genuine = sa.clone();
    genuine.certs = three;
    genuine.data = dir.path().join("a2");
    let mut a = Node::start(&genuine, "active");
    a.wait_in_sync();
}

#[test]
fn design_link_config_requires_tls_or_explicit_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[ha]\nrole = \"active\"\nlisten = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\n",
    )
    .unwrap();
    let out = Command::new(BINS.daemon())
        .args(["--config", cfg.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ha.tls_ca") && err.contains("plaintext"),
        "{err}"
    );
}

#[test]
fn example_ha_loopback_script_shows_the_failover() {
    // The one-command demonstration in examples/ stays true: check-pointed
    // mappings keep their external ports; the RFC 6887 section 8.5 check
    // of the fully check-pointed client finds its epoch continued, and the
    // other client's finds it restarted.
    let bin = BINS.daemon();
    let out = Command::new("bash")
        .arg(examples_dir().join("ha-loopback.sh"))
        .env("PORTKEEP_BIN", bin.parent().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("127.0.0.") && l.contains("external port"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        let at = |word: &str| w.iter().position(|x| *x == word).unwrap();
        let p = at("port");
        assert_eq!(w[p + 1], w[p + 3], "same external port: {l}");
        let e = at("epoch");
        let (before, after): (u32, u32) = (
            w[e + 1].parse().unwrap(),
            w[e + 3].trim_end_matches(',').parse().unwrap(),
        );
        assert!(
            before >= 2,
            "the epoch before the failure shows time passed: {l}"
        );
        let verdict = *w.last().unwrap();
        if l.contains("127.0.0.2") {
            assert!(after >= before, "epoch continues: {l}");
            assert_eq!(verdict, "valid", "{l}");
        } else {
            assert_eq!(after, 0, "epoch restarted: {l}");
            assert_eq!(verdict, "invalid", "{l}");
        }
    }
}

/// RFC 6887 section 14.1.3 after a cold promotion: the node took over with
/// no state at all, so clients it never heard of may have lost theirs.
/// It tells everyone (the `[announce]` destinations), with the server's new
/// epoch, from the address and port PCP requests arrive on (clients drop
/// an ANNOUNCE from anywhere else), as a capture shows; as a backup it
/// sent none.
#[test]
fn rfc6887_s14_1_3_a_cold_promotion_announces_from_the_pcp_address() {
    const NAME: &str = "rfc6887_s14_1_3_a_cold_promotion_announces_from_the_pcp_address";
    use portkeep_test_support::capture::{Capture, TSHARK};
    use portkeep_test_support::skip::{is_root, skip};
    if !Path::new(TSHARK).exists() {
        return skip(
            NAME,
            "tshark not installed at /usr/bin/tshark (apt-get install tshark)",
        );
    }
    if !is_root() {
        return skip(NAME, "capturing on lo needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, mut sb) = pair(dir.path());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = client.local_addr().unwrap().port();
    sb.ha_extra = format!("\n[announce]\nunicast = [\"127.0.0.1:{port}\"]\nsends = 3\n");
    let b = Node::start(&sb, "backup");
    let mut capture = Capture::start(&format!("udp dst port {port}"), 3);
    client
        .set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    let mut buf = [0u8; 1100];
    assert!(
        client.recv_from(&mut buf).is_err(),
        "a backup announces nothing"
    );
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["takeover"], "cold", "{promoted}");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let cp = CodePoints::default();
    let mut got = Vec::new();
    for _ in 0..3 {
        let (n, from) = client.recv_from(&mut buf).expect("an ANNOUNCE");
        let r = Response::parse(&buf[..n], &cp).unwrap();
        assert_eq!(r.data, OpData::Announce);
        assert_eq!(r.header.result.0, 0);
        got.push((from, r.header.epoch));
    }
    for (from, epoch) in &got {
        assert_eq!(*from, sb.pcp, "sent from the PCP address: {got:?}");
        assert!(*epoch <= 2, "the new epoch: {got:?}\n{}", b.log());
    }
    capture.wait_done(Duration::from_secs(5));
    let rows = capture.fields(
        port,
        &[
            "ip.src",
            "udp.srcport",
            "portcontrol.r",
            "portcontrol.opcode",
            "portcontrol.result_code",
        ],
    );
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows {
        assert_eq!(
            row,
            &vec![
                sb.pcp.ip().to_string(),
                sb.pcp.port().to_string(),
                "1".to_owned(),
                "0".to_owned(),
                "0".to_owned(),
            ],
            "{rows:?}"
        );
    }
}

/// A MAP from `client` for `host` (THIRD_PARTY), asking for a check-point
/// or not.
fn third_party_map(
    client: IpAddr,
    host: IpAddr,
    port: u16,
    nonce: u8,
    checkpoint: bool,
) -> Vec<u8> {
    use portkeep_proto::{MapData, PcpOption, Protocol, Request, RequestHeader};
    let mut options = vec![PcpOption::ThirdParty(portkeep_proto::addr::to_wire(host))];
    if checkpoint {
        options.push(PcpOption::CheckpointRequired);
    }
    Request {
        header: RequestHeader {
            lifetime: 3600,
            client_ip: portkeep_proto::addr::to_wire(client),
        },
        data: OpData::Map(MapData {
            nonce: [nonce; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: std::net::Ipv6Addr::UNSPECIFIED,
        }),
        options,
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

/// Failure-scenarios draft section 2.6.1 across a takeover, for THIRD_PARTY
/// clients (RFC 6887 section 13.1): each sees one epoch, its own. One of
/// them made a volatile mapping for one of its hosts: after `kill -9` of
/// the active and the backup's promotion its epoch has restarted (its
/// section 8.5 check fails once), and it is told at the port its requests
/// come from, by the new active's PCP address. The other made only
/// check-pointed mappings: its epoch continues and nobody tells it
/// anything.
#[test]
fn draft_s2_6_1_a_takeover_resets_exactly_the_third_party_client_that_held_volatile_state() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sa, mut sb) = pair(dir.path());
    let allow = "\n[third_party]\nallow = [\"127.0.0.80/28\"]\n".to_owned();
    sa.ha_extra = allow.clone();
    sb.ha_extra = allow;
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (m1, m2) = (ip("127.0.0.81"), ip("127.0.0.82"));
    // (manager, host, port, check-point)
    let plan = [
        (m1, ip("127.0.0.91"), 80, true),
        (m1, ip("127.0.0.92"), 80, false),
        (m2, ip("127.0.0.93"), 80, true),
        (m2, ip("127.0.0.94"), 80, true),
    ];
    let sockets: HashMap<IpAddr, UdpSocket> =
        [m1, m2].iter().map(|&m| (m, client_socket(m))).collect();
    let mut trackers: HashMap<IpAddr, EpochTracker> =
        [m1, m2].iter().map(|&m| (m, EpochTracker::new())).collect();
    let renew_all = |server: SocketAddr, trackers: &mut HashMap<IpAddr, EpochTracker>| {
        let mut verdicts: HashMap<IpAddr, Vec<EpochVerdict>> = HashMap::new();
        for (n, &(m, host, port, cp)) in plan.iter().enumerate() {
            let req = third_party_map(m, host, port, n as u8 + 1, cp);
            let r = exchange_once(&sockets[&m], server, &req).expect("answered");
            assert_eq!(r.header.result.0, 0, "{r:?}");
            // The new active has no backup: it honours no check-point.
            assert_eq!(
                r.checkpoint_honoured(),
                cp && server == sa.pcp,
                "{host}: {r:?}"
            );
            let v = trackers
                .get_mut(&m)
                .unwrap()
                .observe(Instant::now(), r.header.epoch);
            verdicts.entry(m).or_default().push(v);
        }
        verdicts
    };
    renew_all(sa.pcp, &mut trackers);
    // Long enough for a reset to show in the section 8.5 check, which
    // tolerates 2 s of disagreement.
    std::thread::sleep(Duration::from_millis(3200));
    let v = renew_all(sa.pcp, &mut trackers);
    assert!(
        v.values().flatten().all(|v| *v == EpochVerdict::Valid),
        "{v:?}"
    );
    a.kill9();
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["takeover"], "hot", "{promoted}");
    // m1 is told at once, at its request port, from B's PCP address.
    let mut buf = [0u8; 1100];
    let (n, from) = sockets[&m1].recv_from(&mut buf).expect("an ANNOUNCE to m1");
    assert_eq!(from, sb.pcp);
    let ann = Response::parse(&buf[..n], &CodePoints::default()).unwrap();
    assert_eq!(ann.data, OpData::Announce);
    assert!(
        trackers
            .get_mut(&m1)
            .unwrap()
            .observe(Instant::now(), ann.header.epoch)
            .is_invalid(),
        "m1's check sees the reset: epoch {}",
        ann.header.epoch
    );
    sockets[&m2]
        .set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    assert!(
        sockets[&m2].recv_from(&mut buf).is_err(),
        "m2 lost nothing and is told nothing"
    );
    // Renewals on B: m1's replies agree with its reset (one failure, not
    // a loop), m2's epoch continues.
    let v = renew_all(sb.pcp, &mut trackers);
    assert!(
        v.values().flatten().all(|v| *v == EpochVerdict::Valid),
        "{v:?}\n{}",
        b.log()
    );
}

/// Anyone who can reach the link port can open connections that never
/// finish their TLS handshake. At most 16 are held at once, each for at
/// most 5 s: the next is closed at once, and the pair's own active still
/// syncs once they time out.
#[test]
fn design_link_unfinished_handshakes_are_capped_and_time_out() {
    use std::io::Read;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb) = pair(dir.path());
    let b = Node::start(&sb, "backup");
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(sb.link).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut one_more = TcpStream::connect(sb.link).unwrap();
    one_more
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = match one_more.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(closed, "the 17th unfinished handshake is closed at once");
    let st = b.status();
    assert!(
        st["ha"]["last_refusal"]
            .as_str()
            .is_some_and(|l| l.contains("handshakes already in progress")),
        "{st}\n{}",
        b.log()
    );
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    drop(idle);
}

/// The previous release's `portkeepd` (scripts/test-all.sh builds it from
/// git history and names it in `PORTKEEP_PREVIOUS_RELEASE`).
fn previous_release() -> Option<PathBuf> {
    match std::env::var_os("PORTKEEP_PREVIOUS_RELEASE") {
        Some(p) if Path::new(&p).is_file() => Some(PathBuf::from(p)),
        other => {
            portkeep_test_support::skip::skip(
                "rolling upgrade",
                &format!(
                    "no previous release's portkeepd ({other:?}; scripts/test-all.sh builds it \
                     and sets PORTKEEP_PREVIOUS_RELEASE)"
                ),
            );
            None
        }
    }
}

/// A rolling upgrade, one node at a time, from the previous release (link
/// version 3, stores without the end of volatile state) under check-pointed
/// and volatile load: the backup is upgraded first and resumes from its
/// stored replica, speaking the old link version with the old active; the
/// old active is then stopped and the upgraded node promoted hot (RFC 7767
/// section 3.2: every acknowledged check-point served with its external
/// endpoint and nonce; failure-scenarios draft 2.6: a fully check-pointed
/// client keeps its epoch); the other node comes back upgraded as its
/// backup, and a second failover to it keeps every check-point again. No
/// step needs a cold promotion.
#[test]
fn draft_s2_6_rolling_upgrade_from_the_previous_release_keeps_every_checkpoint() {
    let Some(old) = previous_release() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut sa, mut sb) = pair(dir.path());
    sa.bin = Some(old.clone());
    sb.bin = Some(old);
    let b = Node::start(&sb, "backup");
    let mut a = Node::start(&sa, "active");
    a.wait_in_sync();
    let full: IpAddr = "127.0.0.70".parse().unwrap();
    let clients: Vec<(IpAddr, bool)> = vec![
        (full, false),
        ("127.0.0.71".parse().unwrap(), false),
        ("127.0.0.72".parse().unwrap(), true),
    ];
    let mut tracker = EpochTracker::new();
    assert_eq!(epoch_check(&mut tracker, sa.pcp, full), EpochVerdict::First);
    let acked: Arc<Mutex<HashMap<Key, Granted>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sa.pcp, &clients, 1000, stop.clone(), acked.clone());
    // Long enough that a reset epoch would fail the section 8.5 check.
    std::thread::sleep(Duration::from_millis(3000));
    // Quiet while the backup is away: a check-point asked for then is not
    // honoured, and the mapping made volatile would rightly reset its
    // client's epoch at the takeover.
    finish_load(&stop, threads, &acked);

    // 1. The backup is upgraded: stopped cleanly, started from its stored
    // replica by this release, which resumes with the old active (link
    // version 3), and more check-points are made.
    let mut b = b;
    b.proc.stop("TERM");
    sb.bin = None;
    let b = Node::start(&sb, "backup");
    a.wait_in_sync();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sa.pcp, &clients, 10_000, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let acked_before = finish_load(&stop, threads, &acked);
    verify_checkpoints_replicated(&a, &b);

    // 2. The old active is stopped; the upgraded backup takes over hot.
    a.kill9();
    let promoted = b.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}\n{}", b.log());
    assert_eq!(promoted["takeover"], "hot", "{promoted}");
    verify_checkpoints(&b, &acked_before);
    assert_eq!(
        epoch_check(&mut tracker, sb.pcp, full),
        EpochVerdict::Valid,
        "a fully check-pointed client keeps its epoch across the upgrade"
    );

    // 3. The other node comes back upgraded, as backup of the new active,
    // and more check-points are made with both on this release.
    sa.bin = None;
    let mut b2 = b;
    let a2 = Node::start(&sa, "backup");
    b2.wait_in_sync();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = load(sb.pcp, &clients, 20_000, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let acked_all = finish_load(&stop, threads, &acked);
    assert!(acked_all.len() > acked_before.len());

    // 4. A second failover, to the node upgraded last.
    b2.kill9();
    let promoted = a2.ctl(&["promote"]);
    assert_eq!(promoted["ok"], true, "{promoted}\n{}", a2.log());
    assert_eq!(promoted["takeover"], "hot", "{promoted}");
    verify_checkpoints(&a2, &acked_all);
    assert_eq!(
        epoch_check(&mut tracker, sa.pcp, full),
        EpochVerdict::Valid,
        "and keeps it across the second failover"
    );
}

/// The backup of `active` holds as many check-pointed mappings as it.
fn verify_checkpoints_replicated(active: &Node, backup: &Node) {
    let st = backup.status();
    assert_eq!(
        st["ha"]["checkpointed_mappings"].as_u64(),
        active.status()["checkpointed"].as_u64(),
        "{st}"
    );
}
