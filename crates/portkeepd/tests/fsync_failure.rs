//! A failed fsync stops the node: the daemon answers nothing whose change
//! it could not make durable, never retries the fsync (after a failure the
//! kernel may have dropped the dirty pages, so a retry that succeeds
//! proves nothing), and exits; a restart finds every acknowledged mapping
//! (failure-scenarios draft section 6: state in stable storage). The same
//! holds for a backup's stored replica (RFC 7767 section 3.2): a failed
//! write stops the backup, and it acknowledged nothing it did not store.
//!
//! The failure is real, not simulated in the store: strace injects EIO
//! into the daemon's own fdatasync(2) calls from the Nth on.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portkeep_test_support::pcp::{exchange_once, map_request, restartable_port, LOCALHOST};
use portkeep_test_support::skip;

fn daemon_bin() -> &'static str {
    env!("CARGO_BIN_EXE_portkeepd")
}
use portkeep_proto::ResultCode;

/// strace injects the failure; without it the test cannot run (under CI
/// that fails it).
fn have_strace() -> bool {
    if skip::find_tool("strace").is_some() {
        return true;
    }
    skip::skip(
        "fsync failure injection",
        "`strace` not found on PATH (apt-get install strace)",
    );
    false
}

/// A process group killed on drop: killing strace alone would detach the
/// daemon it traces and leave it running.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

/// The daemon under strace (in a process group of its own), counting its
/// fdatasync calls into `trace`, and failing them with EIO from the
/// `fail_from`th on (if given).
fn traced(data: &Path, addr: SocketAddr, trace: &Path, fail_from: Option<u32>) -> Group {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=fdatasync,fsync"]);
    if let Some(n) = fail_from {
        cmd.args(["-e", &format!("inject=fdatasync,fsync:error=EIO:when={n}+")]);
    }
    cmd.arg("-o")
        .arg(trace)
        .arg(daemon_bin())
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    Group(cmd.spawn().unwrap())
}

fn syncs(trace: &Path) -> u32 {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
        .count() as u32
}

fn wait_ready(data: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.join("control.sock").exists() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let start-up's last commit (expiries found while restoring) land.
    std::thread::sleep(Duration::from_millis(300));
}

fn map(sock: &UdpSocket, server: SocketAddr, port: u16) -> Option<ResultCode> {
    let req = map_request(LOCALHOST, port, 3600, [port as u8; 12], false);
    exchange_once(sock, server, &req).map(|r| r.header.result)
}

#[test]
fn draft_s6_failed_fsync_stops_the_node_and_loses_nothing_acknowledged() {
    if !have_strace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();

    // Syncs from the 16th on fail: start-up takes fewer, and each MAP's
    // commit takes one or more, so a few MAPs are acknowledged first.
    // Each is sent only after the previous one was answered.
    let data = dir.path().join("data");
    let trace = dir.path().join("data.trace");
    let addr = SocketAddr::new(LOCALHOST, restartable_port(LOCALHOST));
    let mut child = traced(&data, addr, &trace, Some(16));
    wait_ready(&data);
    assert!(
        syncs(&trace) < 16,
        "start-up took more syncs than the test allows for"
    );
    let mut acked = Vec::new();
    let mut unanswered = None;
    for port in 8001..8040 {
        match map(&sock, addr, port) {
            Some(rc) => {
                assert_eq!(rc, ResultCode::SUCCESS);
                acked.push(port);
            }
            None => {
                unanswered = Some(port);
                break;
            }
        }
    }
    assert!(
        !acked.is_empty(),
        "no MAP was acknowledged before the fault"
    );
    assert!(
        unanswered.is_some(),
        "every MAP was answered although fsync failed"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("the daemon kept running after its fsync failed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(70), "exit status after a failed fsync");
    assert_eq!(map(&sock, addr, 9000), None, "it answered after stopping");
    let log = std::fs::read_to_string(&trace).unwrap();
    let failed = log.lines().filter(|l| l.contains("(INJECTED)")).count();
    assert_eq!(
        failed, 1,
        "the failed fsync was retried (or none failed):\n{log}"
    );

    // A restart (without the fault) has every acknowledged mapping.
    let addr = SocketAddr::new(LOCALHOST, restartable_port(LOCALHOST));
    let _child = Group(
        Command::new(daemon_bin())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    wait_ready(&data);
    let out = Command::new(daemon_bin())
        .args(["ctl", "--json", "--data-dir"])
        .arg(&data)
        .arg("mappings")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ports: Vec<u64> = v["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["internal_port"].as_u64())
        .collect();
    for p in acked {
        assert!(
            ports.contains(&u64::from(p)),
            "acknowledged mapping {p} lost: {ports:?}"
        );
    }
}

/// A node of a plaintext pair on loopback, from a configuration file.
fn pair_config(
    data: &Path,
    pcp: SocketAddr,
    role: &str,
    link: SocketAddr,
    peer: SocketAddr,
) -> String {
    format!(
        "data_dir = \"{}\"\nlisten = [\"{pcp}\"]\nworkers = 1\n\
         [checkpoint]\ndefault_class = \"open\"\n[checkpoint.classes.open]\ncheckpoint = \"on-request\"\n\
         [store]\nmode = \"durable\"\ncommit_delay_us = 0\n\
         [ha]\nrole = \"{role}\"\nlisten = \"{link}\"\npeer = \"{peer}\"\nplaintext = true\n\
         ack_timeout_ms = 200\nheartbeat_ms = 50\ndead_after_ms = 500\n",
        data.display()
    )
}

/// The daemon with configuration `cfg`, under strace as [`traced`] if
/// `trace` is given.
fn spawn_cfg(cfg: &Path, trace: Option<(&Path, Option<u32>)>) -> Group {
    let mut cmd = match trace {
        Some((trace, fail_from)) => {
            let mut c = Command::new("strace");
            c.args(["-f", "-qq", "-e", "trace=fdatasync,fsync"]);
            if let Some(n) = fail_from {
                c.args(["-e", &format!("inject=fdatasync,fsync:error=EIO:when={n}+")]);
            }
            c.arg("-o").arg(trace).arg(daemon_bin());
            c
        }
        None => Command::new(daemon_bin()),
    };
    cmd.arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    Group(cmd.spawn().unwrap())
}

fn ctl(data: &Path, args: &[&str]) -> serde_json::Value {
    portkeep_test_support::process::ctl_json(Path::new(daemon_bin()), data, args)
        .unwrap_or(serde_json::Value::Null)
}

fn wait_status(data: &Path, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = ctl(data, &["status"]);
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files and addresses of a pair, a traced backup and a plain active.
struct PairRun {
    backup: (std::path::PathBuf, std::path::PathBuf, SocketAddr),
    active: (std::path::PathBuf, std::path::PathBuf, SocketAddr),
}

fn pair_run(dir: &Path) -> PairRun {
    std::fs::create_dir_all(dir).unwrap();
    let port = || SocketAddr::new(LOCALHOST, restartable_port(LOCALHOST));
    let (lb, la, pb, pa) = (port(), port(), port(), port());
    let node = |name: &str, role: &str, pcp, link, peer| {
        let data = dir.join(name);
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, pair_config(&data, pcp, role, link, peer)).unwrap();
        (data, cfg, pcp)
    };
    PairRun {
        backup: node("b", "backup", pb, lb, la),
        active: node("a", "active", pa, la, lb),
    }
}

/// RFC 7767 section 3.2 (an acknowledged check-point survives the
/// backup's crash too), with a real failed fsync: the backup whose replica
/// write fails stops (exit 70) without retrying the fsync, acknowledges
/// nothing that was not stored (so the active answers that check-point as
/// not honoured), and every check-point that was honoured is in the
/// replica it restarts from, and served once it is promoted.
#[test]
fn rfc7767_s3_2_failed_replica_fsync_stops_the_backup_and_acknowledges_nothing_unstored() {
    if !have_strace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // How many syncs a backup takes to start and store its first
    // snapshot, counted on a pair of its own.
    let calibration = {
        let run = pair_run(&dir.path().join("calibration"));
        let trace = dir.path().join("calibration.trace");
        let _b = spawn_cfg(&run.backup.1, Some((&trace, None)));
        let _a = spawn_cfg(&run.active.1, None);
        wait_status(&run.active.0, "in sync", |s| s["ha"]["in_sync"] == true);
        std::thread::sleep(Duration::from_millis(300));
        syncs(&trace)
    };
    let run = pair_run(&dir.path().join("run"));
    let trace = dir.path().join("run.trace");
    // A few check-points are stored before the fault.
    let mut backup = spawn_cfg(&run.backup.1, Some((&trace, Some(calibration + 4))));
    let active = spawn_cfg(&run.active.1, None);
    wait_status(&run.active.0, "in sync", |s| s["ha"]["in_sync"] == true);
    let sock = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let mut honoured = Vec::new();
    let mut refused = 0;
    for port in 1..200u16 {
        let req = map_request(LOCALHOST, port, 3600, [port as u8; 12], true);
        let r = exchange_once(&sock, run.active.2, &req).expect("the active answers");
        assert_eq!(r.header.result, ResultCode::SUCCESS);
        if r.checkpoint_honoured() {
            honoured.push(port);
        } else {
            refused += 1;
            if refused >= 3 {
                break;
            }
        }
    }
    eprintln!("{} check-points honoured before the fault", honoured.len());
    assert!(!honoured.is_empty(), "nothing honoured before the fault");
    assert!(
        refused > 0,
        "every check-point honoured although the backup's fsync failed"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = backup.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the backup kept running after its fsync failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(70), "exit status after a failed fsync");
    let log = std::fs::read_to_string(&trace).unwrap();
    let failed = log.lines().filter(|l| l.contains("(INJECTED)")).count();
    assert_eq!(
        failed, 1,
        "the failed fsync was retried (or none failed):\n{log}"
    );
    // The active goes too: only the replica can bring the check-points back.
    drop(active);
    let _backup = spawn_cfg(&run.backup.1, None);
    wait_status(&run.backup.0, "restarted", |s| s["ok"] == true);
    let promoted = ctl(&run.backup.0, &["promote"]);
    assert_eq!(promoted["takeover"], "stale", "{promoted}");
    let v = ctl(&run.backup.0, &["mappings"]);
    let ports: Vec<u64> = v["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["checkpoint"] == true)
        .filter_map(|m| m["internal_port"].as_u64())
        .collect();
    for p in honoured {
        assert!(
            ports.contains(&u64::from(p)),
            "honoured check-point {p} lost: {ports:?}"
        );
    }
}
