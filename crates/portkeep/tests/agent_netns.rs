//! `portkeep agent` where addresses really change, and where a DHCP lease
//! names its server: the agent and the servers run in two network
//! namespaces joined by a veth pair, and the tests change the agent's
//! source address, its default gateway and its lease.
//! Needs root and `ip`: under CI (`CI=true`) it fails without them;
//! elsewhere it is skipped, saying so and recording the skip
//! (`PORTKEEP_SKIP_LOG`).
//!
//! The agent learns of both changes from netlink address and route
//! notifications; its fallback poll is 30 s, so recovery within
//! [`NOTICED_WITHIN`] shows the notifications at work.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_test_support::netns::{ns_exec, setup, Lab};
use portkeep_test_support::process::{agent_call, now, wait_until, Bins, Children};
use serde_json::{json, Value};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_cli(env!("CARGO_BIN_EXE_portkeep")));

/// Names the test in skips.
const WHAT: &str = "agent address changes";

/// Bound on re-installing after an address or gateway change: far below
/// the agent's 30 s fallback poll, far above the few hundred milliseconds
/// the notification path takes (logged with each run).
const NOTICED_WITHIN: Duration = Duration::from_secs(3);

/// Two namespaces, `a` (the host with the agent, 10.77.N.2) and `s` (the
/// servers, 10.77.N.1 and 10.77.N.4), joined by veth `va`-`vs`; deleted on
/// drop.
struct Net {
    a: String,
    s: String,
    prefix: String,
    va: String,
    vs: String,
    lab: Lab,
}

impl Net {
    /// The namespaces; `Err` if this machine cannot make one.
    fn new() -> Result<Net, String> {
        let mut lab = Lab::new("pk7")?;
        let id = std::process::id() % 100_000;
        let (a, s) = (format!("pk7a-{}", lab.id), format!("pk7s-{}", lab.id));
        lab.add_ns(&a)?;
        lab.add_ns(&s).unwrap();
        let net = Net {
            a,
            s,
            prefix: format!("10.77.{}", id % 250),
            va: format!("pk7va{id}"),
            vs: format!("pk7vs{id}"),
            lab,
        };
        let (va, vs) = (&net.va, &net.vs);
        net.lab.veth(&net.a, va, &net.s, vs).unwrap();
        let p = &net.prefix;
        // .4 first: it is the link's primary address, the source of the
        // multicast ANNOUNCE of the server at .4 (which the agent believes
        // only from its server's address, RFC 6887 section 14.1.1).
        for host in ["4", "1"] {
            let addr = format!("{p}.{host}/24");
            net.exec_ok(&net.s, &["ip", "addr", "add", &addr, "dev", vs]);
        }
        net.exec_ok(
            &net.a,
            &["ip", "addr", "add", &format!("{p}.2/24"), "dev", va],
        );
        for (ns, dev) in [(&net.a, va), (&net.s, vs)] {
            net.exec_ok(ns, &["ip", "link", "set", dev, "up"]);
        }
        Ok(net)
    }

    fn exec_ok(&self, ns: &str, cmd: &[&str]) {
        ns_exec(ns, cmd).unwrap_or_else(|e| panic!("{e}"));
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

/// Internal addresses of the mappings of the server whose data dir is `dir`.
fn internal_ips(dir: &Path) -> Vec<String> {
    let out = Command::new(BINS.daemon())
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
    let Some(net) = setup(WHAT, &["ip"], Net::new) else {
        return;
    };
    let p = net.prefix.clone();
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Children::default();
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
            .push(net.spawn(&net.s, BINS.daemon(), &args, &dir, &dir.join("log")));
        dirs.push(dir.join("portkeep-data"));
    }
    let va = net.va.clone();
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
        BINS.cli(),
        &args,
        tmp.path(),
        &tmp.path().join("agent.log"),
    ));
    let sock = state.join("agent.sock");
    let log = || std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    wait_until("the agent", Duration::from_secs(10), || {
        agent_call(&sock, &json!({"op": "status"}))
    });
    let v = agent_call(
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
        let st = agent_call(&sock, &json!({"op": "status"})).unwrap();
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
    let st = agent_call(&sock, &json!({"op": "status"})).unwrap();
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
    let vs = net.vs.clone();
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
        .push(net.spawn(&net.s, BINS.daemon(), &args, &srv4, &srv4.join("log2")));
    let deadline = now() + Duration::from_secs(10);
    while internal_ips(&dirs[1]) != vec![format!("{p}.3")] {
        assert!(
            now() < deadline,
            "not re-created after the multicast ANNOUNCE\nserver:\n{}\nagent:\n{}\nstatus: {:?}",
            std::fs::read_to_string(srv4.join("log2")).unwrap_or_default(),
            log(),
            agent_call(&sock, &json!({"op": "status"}))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("multicast ANNOUNCE recovery: {:?}", t0.elapsed());
    let st = agent_call(&sock, &json!({"op": "status"})).unwrap();
    assert!(
        st["counters"]["epoch_failures"].as_u64().unwrap() > failures0,
        "{st}\n{}",
        log()
    );
}

/// A dhclient lease naming `pcp` in option 158 (RFC 7291 section 4.1),
/// written as dhclient writes an option it has no definition for, or no
/// option at all.
fn dhclient_lease(ip: &str, pcp: Option<&str>) -> String {
    let option = pcp.map_or_else(String::new, |a| {
        let o: Vec<String> = a
            .split('.')
            .map(|x| format!("{:x}", x.parse::<u8>().unwrap()))
            .collect();
        format!("  option unknown-158 4:{};\n", o.join(":"))
    });
    format!(
        "lease {{\n  interface \"eth0\";\n  fixed-address {ip};\n  option dhcp-lease-time 86400;\n\
         {option}  renew 4 2099/12/31 00:00:00;\n  rebind 4 2099/12/31 00:00:00;\n  \
         expire 4 2099/12/31 00:00:00;\n}}\n"
    )
}

/// RFC 7291 section 4: the agent with `--server-from-dhcp` maps through
/// the PCP server its DHCP lease names (.4), not its default gateway (.1,
/// RFC 6887 section 8.1's rule); a lease file that is not one is logged
/// once and ignored; when a new lease names no server (read again on
/// SIGHUP), the agent falls back to the gateway and its mapping follows.
#[test]
fn rfc7291_s4_agent_maps_through_the_server_its_dhcp_lease_names() {
    let Some(net) = setup("agent DHCP discovery", &["ip"], Net::new) else {
        return;
    };
    let p = net.prefix.clone();
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Children::default();
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
            .push(net.spawn(&net.s, BINS.daemon(), &args, &dir, &dir.join("log")));
        dirs.push(dir.join("portkeep-data"));
    }
    net.exec_ok(
        &net.a,
        &["ip", "route", "add", "default", "via", &format!("{p}.1")],
    );
    let leases = tmp.path().join("leases");
    std::fs::create_dir(&leases).unwrap();
    let lease = leases.join("dhclient.eth0.leases");
    std::fs::write(
        &lease,
        dhclient_lease(&format!("{p}.2"), Some(&format!("{p}.4"))),
    )
    .unwrap();
    // A dhcpcd lease that is not a DHCP message: ignored, logged once.
    std::fs::write(leases.join("eth1.lease"), b"garbage").unwrap();
    let state = tmp.path().join("agent");
    let args: Vec<String> = [
        "--server",
        "192.0.2.99:5351",
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "run",
        "--server-from-dhcp",
        "--dhcp-lease-dir",
        leases.to_str().unwrap(),
        "--no-announce-listen",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let agent = net.spawn(
        &net.a,
        BINS.cli(),
        &args,
        tmp.path(),
        &tmp.path().join("agent.log"),
    );
    let agent_pid = agent.id();
    procs.0.push(agent);
    let sock = state.join("agent.sock");
    let log = || std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    wait_until("the agent", Duration::from_secs(10), || {
        agent_call(&sock, &json!({"op": "status"}))
    });
    let v = agent_call(
        &sock,
        &json!({"op": "add", "app": "web", "protocol": "tcp", "port": 8080}),
    )
    .unwrap();
    assert_eq!(v["ok"], json!(true), "{v}");
    wait_until(
        "the mapping on the lease's server .4",
        Duration::from_secs(10),
        || (internal_ips(&dirs[1]) == vec![format!("{p}.2")]).then_some(()),
    );
    assert!(internal_ips(&dirs[0]).is_empty(), "nothing at the gateway");
    let st = agent_call(&sock, &json!({"op": "status"})).unwrap();
    assert_eq!(
        st["server"],
        json!(format!("{p}.4:5351")),
        "{st}\n{}",
        log()
    );
    assert!(
        log().contains(&format!("PCP server {p}.4 from DHCPv4 option 158")),
        "{}",
        log()
    );
    assert_eq!(
        log().matches("ignoring DHCP lease file").count(),
        1,
        "one line for the bad file: {}",
        log()
    );

    // The lease renewed without the option: the gateway rule.
    std::fs::write(&lease, dhclient_lease(&format!("{p}.2"), None)).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &agent_pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_until(
        "the mapping on the gateway .1",
        Duration::from_secs(12),
        || (internal_ips(&dirs[0]) == vec![format!("{p}.2")]).then_some(()),
    );
    let st = agent_call(&sock, &json!({"op": "status"})).unwrap();
    assert_eq!(
        st["server"],
        json!(format!("{p}.1:5351")),
        "{st}\n{}",
        log()
    );
    assert!(
        log().contains("no PCP server option in any DHCP lease"),
        "{}",
        log()
    );
}
