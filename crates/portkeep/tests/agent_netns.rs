//! `portkeep agent` where addresses really change: the agent and the
//! server run in two network namespaces joined by a veth pair, and the
//! test changes the agent's source address and its default gateway.
//! Needs root (`ip netns`); skipped otherwise, saying so.
//!
//! The agent learns of both changes from netlink address and route
//! notifications; its fallback poll is 30 s, so recovery within
//! [`NOTICED_WITHIN`] shows the notifications at work.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod netns_support;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns_support::{cli_bin, daemon_bin, ip, ip_ok, now, wait_until};
use serde_json::{json, Value};

/// Bound on re-installing after an address or gateway change: far below
/// the agent's 30 s fallback poll, far above the few hundred milliseconds
/// the notification path takes (logged with each run).
const NOTICED_WITHIN: Duration = Duration::from_secs(3);

/// Two namespaces, `a` (the host with the agent, 10.77.N.2) and `s` (the
/// servers, 10.77.N.1 and 10.77.N.4), deleted on drop.
struct Net {
    a: String,
    s: String,
    prefix: String,
}

impl Net {
    fn new() -> Option<Net> {
        let id = std::process::id() % 100_000;
        let net = Net {
            a: format!("pk7a-{id}"),
            s: format!("pk7s-{id}"),
            prefix: format!("10.77.{}", id % 250),
        };
        if !ip(&["netns", "add", &net.a]) {
            return None;
        }
        ip_ok(&["netns", "add", &net.s]);
        let (va, vs) = (format!("pk7va{id}"), format!("pk7vs{id}"));
        ip_ok(&["link", "add", &va, "type", "veth", "peer", "name", &vs]);
        ip_ok(&["link", "set", &va, "netns", &net.a]);
        ip_ok(&["link", "set", &vs, "netns", &net.s]);
        let p = &net.prefix;
        // .4 first: it is the link's primary address, the source of the
        // multicast ANNOUNCE of the server at .4 (which the agent believes
        // only from its server's address, RFC 6887 section 14.1.1).
        for host in ["4", "1"] {
            let addr = format!("{p}.{host}/24");
            net.exec_ok(&net.s, &["ip", "addr", "add", &addr, "dev", &vs]);
        }
        net.exec_ok(
            &net.a,
            &["ip", "addr", "add", &format!("{p}.2/24"), "dev", &va],
        );
        for (ns, dev) in [(&net.a, &va), (&net.s, &vs)] {
            net.exec_ok(ns, &["ip", "link", "set", dev, "up"]);
            net.exec_ok(ns, &["ip", "link", "set", "lo", "up"]);
        }
        Some(net)
    }

    fn va(&self) -> String {
        format!("pk7va{}", std::process::id() % 100_000)
    }

    fn exec_ok(&self, ns: &str, cmd: &[&str]) {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(cmd);
        ip_ok(&all);
    }

    fn spawn(&self, ns: &str, prog: &Path, args: &[String], cwd: &Path, log: &Path) -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(prog)
            .args(args)
            .current_dir(cwd)
            .env_remove("PORTKEEPD_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.s]);
    }
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn call(sock: &Path, req: &Value) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    writeln!(s, "{req}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Internal addresses of the mappings of the server whose data dir is `dir`.
fn internal_ips(dir: &Path) -> Vec<String> {
    let out = Command::new(daemon_bin())
        .args([
            "ctl",
            "--data-dir",
            dir.to_str().unwrap(),
            "--json",
            "mappings",
        ])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut ips: Vec<String> = v["mappings"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|m| m["internal_ip"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

#[test]
fn draft_s2_1_and_2_4_addresses_change_under_a_running_agent() {
    let Some(net) = Net::new() else {
        eprintln!("SKIPPED: cannot create network namespaces (needs root and iproute2)");
        return;
    };
    let p = net.prefix.clone();
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Kill(Vec::new());
    // Two servers in namespace `s`: .1 (the first gateway) and .4.
    let mut dirs = Vec::new();
    for host in ["1", "4"] {
        let dir = tmp.path().join(format!("srv{host}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pk.toml"), "[store]\nmode = \"relaxed\"\n").unwrap();
        let args = vec![
            "--config".to_owned(),
            "pk.toml".to_owned(),
            "--listen".to_owned(),
            format!("{p}.{host}:5351"),
        ];
        procs
            .0
            .push(net.spawn(&net.s, &daemon_bin(), &args, &dir, &dir.join("log")));
        dirs.push(dir.join("portkeep-data"));
    }
    let va = net.va();
    net.exec_ok(
        &net.a,
        &["ip", "route", "add", "default", "via", &format!("{p}.1")],
    );
    let state = tmp.path().join("agent");
    let args: Vec<String> = [
        "--server",
        "192.0.2.99:5351",
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "run",
        "--server-from-gateway",
        "--announce-listen",
        "0.0.0.0:5350",
        "--recreate-jitter-ms",
        "200",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    procs.0.push(net.spawn(
        &net.a,
        &cli_bin(),
        &args,
        tmp.path(),
        &tmp.path().join("agent.log"),
    ));
    let sock = state.join("agent.sock");
    let log = || std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    wait_until("the agent", Duration::from_secs(10), || {
        call(&sock, &json!({"op": "status"}))
    });
    let v = call(
        &sock,
        &json!({"op": "add", "app": "web", "protocol": "tcp", "port": 8080}),
    )
    .unwrap();
    assert_eq!(v["ok"], json!(true), "{v}");
    wait_until("the mapping on server .1", Duration::from_secs(10), || {
        (internal_ips(&dirs[0]) == vec![format!("{p}.2")]).then_some(())
    });

    // Draft 2.4: a new source address (the old one still configured, so
    // the stale mapping can be deleted from it).
    net.exec_ok(
        &net.a,
        &["ip", "addr", "add", &format!("{p}.3/24"), "dev", &va],
    );
    // The secondary address does not change the route's source; the
    // route change does, so the clock starts with it.
    let t0 = now();
    net.exec_ok(
        &net.a,
        &[
            "ip",
            "route",
            "change",
            &format!("{p}.0/24"),
            "dev",
            &va,
            "src",
            &format!("{p}.3"),
        ],
    );
    // The agent's own view first, polled tightly: when it moved.
    loop {
        let st = call(&sock, &json!({"op": "status"})).unwrap();
        if st["client_ip"] == json!(format!("{p}.3")) {
            break;
        }
        assert!(t0.elapsed() < NOTICED_WITHIN, "{st}\n{}", log());
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "draft 2.4 internal address change, agent moved to the new address: {:?}",
        t0.elapsed()
    );
    wait_until(
        "re-installed from .3, stale .2 deleted",
        Duration::from_secs(12),
        || (internal_ips(&dirs[0]) == vec![format!("{p}.3")]).then_some(()),
    );
    let took = t0.elapsed();
    eprintln!("draft 2.4 internal address change, re-installed and stale deleted: {took:?}");
    assert!(
        took < NOTICED_WITHIN,
        "address change took {took:?}: netlink notifications not at work?\n{}",
        log()
    );

    // Draft 2.1: the default gateway, hence the server, changes.
    let t0 = now();
    net.exec_ok(
        &net.a,
        &["ip", "route", "change", "default", "via", &format!("{p}.4")],
    );
    wait_until("the mapping on server .4", Duration::from_secs(12), || {
        (internal_ips(&dirs[1]) == vec![format!("{p}.3")]).then_some(())
    });
    let took = t0.elapsed();
    eprintln!("draft 2.1 server change via the gateway, noticed by netlink: {took:?}");
    assert!(
        took < NOTICED_WITHIN,
        "gateway change took {took:?}: netlink notifications not at work?\n{}",
        log()
    );
    let st = call(&sock, &json!({"op": "status"})).unwrap();
    assert_eq!(
        st["server"],
        json!(format!("{p}.4:5351")),
        "{st}\n{}",
        log()
    );
    assert_eq!(st["client_ip"], json!(format!("{p}.3")));

    // RFC 6887 section 14.1.1: server .4 restarts empty and multicasts
    // its ANNOUNCE to 224.0.0.1:5350 on the link; the agent (listening on
    // 0.0.0.0:5350, member of 224.0.0.1) notices and re-creates.
    std::thread::sleep(Duration::from_secs(3)); // beyond section 8.5's 2 s slack
    let failures0 = st["counters"]["epoch_failures"].as_u64().unwrap();
    let mut old = procs.0.remove(1);
    let _ = old.kill();
    let _ = old.wait();
    let srv4 = dirs[1].parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&dirs[1]).unwrap();
    let vs = format!("pk7vs{}", std::process::id() % 100_000);
    std::fs::write(
        srv4.join("pk.toml"),
        format!("[store]\nmode = \"relaxed\"\n[announce]\nmulticast_interfaces = [\"{vs}\"]\n"),
    )
    .unwrap();
    let args = vec![
        "--config".to_owned(),
        "pk.toml".to_owned(),
        "--listen".to_owned(),
        format!("{p}.4:5351"),
    ];
    let t0 = now();
    procs
        .0
        .push(net.spawn(&net.s, &daemon_bin(), &args, &srv4, &srv4.join("log2")));
    let deadline = now() + Duration::from_secs(10);
    while internal_ips(&dirs[1]) != vec![format!("{p}.3")] {
        assert!(
            now() < deadline,
            "not re-created after the multicast ANNOUNCE\nserver:\n{}\nagent:\n{}\nstatus: {:?}",
            std::fs::read_to_string(srv4.join("log2")).unwrap_or_default(),
            log(),
            call(&sock, &json!({"op": "status"}))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("multicast ANNOUNCE recovery: {:?}", t0.elapsed());
    let st = call(&sock, &json!({"op": "status"})).unwrap();
    assert!(
        st["counters"]["epoch_failures"].as_u64().unwrap() > failures0,
        "{st}\n{}",
        log()
    );
}
