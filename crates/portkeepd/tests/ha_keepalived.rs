//! keepalived drives the pair: VRRPv3 between two node namespaces decides
//! which `portkeepd` is active, through `examples/keepalived/` (the
//! configuration generated from the example, the same notify script).
//!
//! ```text
//!            switch namespace: bridge br0
//!     ┌──────────────┬──────────────┬─────────────────┐
//!  node-a lan0     node-b lan0     client eth0
//!  10.78.0.11/24   10.78.0.12/24   10.78.0.100/24
//!  (VIP 10.78.0.1 and 10.78.0.2 on whichever keepalived is MASTER)
//! ```
//!
//! Both portkeepd start with `role = "backup"` and `listen = ["VIP:5351"]`
//! (bound before the VIP is theirs), replicating over mutual TLS between
//! the nodes' own addresses. The client makes check-pointed mappings
//! through the VIP; `kill -9` of the active node's portkeepd and
//! keepalived; the other keepalived takes the VIP and promotes its
//! portkeepd, and the client's refreshes through the VIP find the same
//! mappings. The old node comes back as backup and keepalived does not
//! hand it the VIP (nopreempt). Then the active's portkeepd is demoted
//! while its keepalived holds the VIP; then a partition splits VRRP (both
//! nodes MASTER, the old active fenced by the newer term); then the
//! active's portkeepd dies alone: each time keepalived's health check
//! (`portkeepd-check.sh`) gives the VIP up and the other node takes over.
//!
//! Needs root, `ip`, `nft` and `keepalived`: under CI (`CI=true`) it fails
//! without them; elsewhere it prints `SKIPPED: <reason>`, records the skip
//! (`PORTKEEP_SKIP_LOG`) and passes.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_test_support::keepalived::{
    ha_section, map_ok, refresh_until_answered, start_pair, udp_in, wait_for_node, Granted, Node,
};
use portkeep_test_support::netns::{assert_gone, ns_exec, setup, Lab};
use portkeep_test_support::process::{now, Bins};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

const VIP: &str = "10.78.0.1";
const EXT_VIP: &str = "10.78.0.2";
const CLIENT: &str = "10.78.0.100";
const ADDR: [&str; 2] = ["10.78.0.11", "10.78.0.12"];
const NAMES: [&str; 2] = ["node-a", "node-b"];

fn portkeepd_config(node: &Node, lab: &Lab, i: usize) -> String {
    format!(
        "data_dir = \"{}\"\nlisten = [\"{VIP}:5351\"]\nexternal_addresses = [\"{EXT_VIP}\"]\n\
         port_range = \"30000-30999\"\nworkers = 1\n{}",
        node.data.display(),
        ha_section(
            &lab.dir.join("certs"),
            NAMES[i],
            NAMES[1 - i],
            &format!("{}:7000", ADDR[i]),
            &format!("{}:7000", ADDR[1 - i]),
        )
    )
}

fn keepalived_conf(node: &Node) -> String {
    node.keepalived_conf(vec![
        // One network here: both instances on lan0.
        ("wan0", "lan0".to_owned()),
        ("10.0.0.1", VIP.to_owned()),
        ("192.0.2.1", EXT_VIP.to_owned()),
    ])
}

/// Every mapping in `granted` is on `node` with the same external endpoint
/// and nonce.
fn assert_listed(node: &Node, granted: &[Granted]) {
    let table = node.mappings();
    for g in granted {
        let m = table
            .iter()
            .find(|m| m["internal_ip"] == CLIENT && m["internal_port"] == g.port)
            .unwrap_or_else(|| {
                panic!(
                    "mapping {} missing on {}: {table:?}\n{}",
                    g.port,
                    node.name,
                    node.logs()
                )
            });
        assert_eq!(m["external"], g.external.to_string(), "{m}");
        assert_eq!(m["nonce"], hex::encode(g.nonce), "{m}");
    }
}

fn other(i: usize) -> usize {
    1 - i
}

/// The switch, both node namespaces with their `portkeepd` and keepalived
/// started, and the client's namespace; `None` where this machine cannot
/// (the test is then skipped, and fails under CI).
fn lab_with_pair(what: &str, prefix: &str) -> Option<(Lab, Vec<Node>, String)> {
    let mut lab = setup(what, &["ip", "nft", "keepalived"], || {
        Lab::with_switch(prefix, &["br0"])
    })?;
    let id = lab.id.clone();
    let ns = [format!("{prefix}a-{id}"), format!("{prefix}b-{id}")];
    let client_ns = format!("{prefix}c-{id}");
    for (i, n) in ns.iter().enumerate() {
        lab.add_ns(n).unwrap();
        lab.plug(n, "lan0", "br0", &[&format!("{}/24", ADDR[i])])
            .unwrap();
    }
    lab.add_ns(&client_ns).unwrap();
    lab.plug(&client_ns, "eth0", "br0", &[&format!("{CLIENT}/24")])
        .unwrap();
    let nodes = start_pair(
        &lab,
        BINS.daemon(),
        NAMES,
        &ns,
        |n, i| portkeepd_config(n, &lab, i),
        keepalived_conf,
    );
    Some((lab, nodes, client_ns))
}

#[test]
fn keepalived_moves_the_vip_and_promotes_the_backup_with_every_checkpoint() {
    let Some((lab, mut nodes, client_ns)) = lab_with_pair("keepalived failover", "pkk") else {
        return;
    };
    // keepalived elects one (both start BACKUP; the higher priority's
    // timer runs out first) and its notify script promotes it.
    let t = now();
    let mut active = wait_for_node(&nodes, Duration::from_secs(15), "promoted", Node::is_active);
    eprintln!("{} is active after {:?}", nodes[active].name, t.elapsed());
    nodes[active].wait(Duration::from_secs(15), "backup in sync", |n| {
        n.ha()["in_sync"] == true
    });
    assert!(nodes[active].holds(VIP), "{}", nodes[active].logs());
    assert!(!nodes[other(active)].holds(VIP));
    assert_eq!(nodes[other(active)].ha()["role"], "backup");

    // The client maps through the VIP: five check-pointed mappings, and
    // one without the option.
    let client: IpAddr = CLIENT.parse().unwrap();
    let server: SocketAddr = format!("{VIP}:5351").parse().unwrap();
    let sock = udp_in(&client_ns, client, Duration::from_millis(1500));
    let mut granted: Vec<Granted> = (1..=5u16)
        .map(|k| map_ok(&sock, server, client, 8000 + k, [k as u8; 12], true))
        .collect();
    for g in &granted {
        assert!(g.honoured, "check-point not honoured: {g:?}");
    }
    let volatile = map_ok(&sock, server, client, 9000, [0x90; 12], false);
    assert!(!volatile.honoured);
    nodes[other(active)].wait(Duration::from_secs(5), "check-points replicated", |n| {
        n.ha()["checkpointed_mappings"] == 5
    });

    let keepalived_log =
        |n: &Node| std::fs::read_to_string(n.dir.join("keepalived.log")).unwrap_or_default();
    for round in 0..4 {
        let old = active;
        let new = other(active);
        let log_before = keepalived_log(&nodes[old]).len();
        let t0 = now();
        let how = match round {
            0 => {
                nodes[old].crash();
                "kill -9 of the active's portkeepd and keepalived"
            }
            1 => {
                // The active's portkeepd stands down while keepalived keeps
                // the VIP there (an operator's demote; or fenced by a node
                // active in a newer term): the health check sees a backup
                // holding the VIP and keepalived gives the VIP up.
                let r = nodes[old].ctl(&["demote"]).unwrap();
                assert_eq!(r["changed"], true, "{r}");
                "ctl demote of the active (keepalived's health check)"
            }
            2 => {
                // A partition that splits VRRP but not the replication
                // link: each node stops hearing the other's adverts, both
                // are MASTER, and the backup is promoted in a newer term.
                // The old active meets that term on the link and stands
                // down; holding the VIP as a backup fails its health
                // check, so keepalived gives the VIP up.
                for n in &nodes {
                    ns_exec(
                        &n.ns,
                        &["nft", "add table inet vrrpcut; add chain inet vrrpcut in { type filter hook input priority -300; }; add rule inet vrrpcut in ip protocol vrrp drop"],
                    )
                    .unwrap();
                }
                nodes[old].wait(Duration::from_secs(15), "fenced and VIP given up", |n| {
                    n.ha()["role"] == "backup" && !n.holds(VIP)
                });
                eprintln!(
                    "split VRRP: {} fenced by the newer term and its VIP given up after {} ms",
                    nodes[old].name,
                    t0.elapsed().as_millis()
                );
                for n in &nodes {
                    ns_exec(&n.ns, &["nft", "delete table inet vrrpcut"]).unwrap();
                }
                "VRRP partition (fencing by term, then keepalived's health check)"
            }
            _ => {
                // Only portkeepd dies: the health check fails.
                nodes[old].kill_portkeepd();
                "kill -9 of the active's portkeepd (keepalived's health check)"
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (took, first) = refresh_until_answered(
            &sock,
            server,
            client,
            &granted[0],
            t0,
            Duration::from_secs(15),
        );
        eprintln!(
            "FAILOVER round {round}: {how} -> first refresh answered via the VIP: {} ms",
            took.as_millis()
        );
        assert_eq!(
            first.external, granted[0].external,
            "same external endpoint"
        );
        assert!(nodes[new].is_active(), "{}", nodes[new].logs());
        assert!(nodes[new].holds(VIP));
        // Every check-pointed mapping is on the new active (ctl mappings),
        // and the volatile one is not.
        assert_listed(&nodes[new], &granted);
        assert!(
            !nodes[new]
                .mappings()
                .iter()
                .any(|m| m["internal_port"] == 9000),
            "a volatile mapping survived the takeover"
        );
        // The client's refreshes, with the same nonces, get the same
        // external ports.
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        for g in &granted {
            let r = map_ok(&sock, server, client, g.port, g.nonce, true);
            assert_eq!(r.external, g.external, "{g:?}");
            if round == 0 || round == 3 {
                assert!(!r.honoured, "honoured with no backup: {r:?}");
            }
        }
        let notified = std::fs::read_to_string(nodes[new].notify_log()).unwrap_or_default();
        assert!(notified.contains("MASTER: promote: done"), "{notified}");
        if round > 0 {
            let log = keepalived_log(&nodes[old]);
            assert!(
                log[log_before..].contains("Entering FAULT STATE"),
                "{}",
                &log[log_before..]
            );
        }
        active = new;
        if round == 3 {
            break;
        }
        if round == 0 {
            // The old node comes back: portkeepd as backup (its data dir
            // and term as it left them), then keepalived.
            nodes[old].kill_keepalived();
            let cfg = portkeepd_config(&nodes[old], &lab, old);
            nodes[old].start_portkeepd(&cfg);
            let conf = keepalived_conf(&nodes[old]);
            nodes[old].start_keepalived(&conf);
        }
        // Rounds 1 and 2: the demoted node, without the VIP, passes the
        // health check again and goes from FAULT to BACKUP by itself.
        nodes[new].wait(Duration::from_secs(15), "old node back in sync", |n| {
            n.ha()["in_sync"] == true
        });
        // keepalived removed the address a crash left behind, and does not
        // preempt even with the higher priority.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!nodes[old].holds(VIP), "{}", nodes[old].logs());
        assert!(nodes[new].holds(VIP));
        assert!(nodes[new].is_active());
        assert_eq!(nodes[old].ha()["role"], "backup");
        // With a backup in sync again the renewals are honoured, so the
        // mappings are check-pointed anew (and replicated).
        granted = granted
            .iter()
            .map(|g| {
                let r = map_ok(&sock, server, client, g.port, g.nonce, true);
                assert!(r.honoured, "{r:?}");
                assert_eq!(r.external, g.external);
                r
            })
            .collect();
        nodes[old].wait(Duration::from_secs(5), "check-points replicated", |n| {
            n.ha()["checkpointed_mappings"] == 5
        });
    }
    let names = lab.names();
    drop(nodes);
    drop(lab);
    assert_gone(&names);
}

/// Failure-scenarios draft section 2.6 with the keepalived layout of
/// docs/ha.md (both nodes `role = "backup"`, keepalived's notify hook
/// promotes): both nodes lost at once (a site's power loss), then back in
/// either order, the node that was active first and then the node that
/// was the backup first. Whichever keepalived promotes serves every
/// acknowledged check-point with the same external endpoint and nonce
/// (the former active from its store, the former backup from its stored
/// replica), and the other becomes its backup in sync.
#[test]
fn draft_s2_6_keepalived_both_nodes_lost_then_back_in_either_order_keep_every_checkpoint() {
    let Some((lab, mut nodes, client_ns)) = lab_with_pair("keepalived double failure", "pkd")
    else {
        return;
    };
    let mut active = wait_for_node(&nodes, Duration::from_secs(15), "promoted", Node::is_active);
    nodes[active].wait(Duration::from_secs(15), "backup in sync", |n| {
        n.ha()["in_sync"] == true
    });
    let client: IpAddr = CLIENT.parse().unwrap();
    let server: SocketAddr = format!("{VIP}:5351").parse().unwrap();
    let sock = udp_in(&client_ns, client, Duration::from_millis(1500));
    let granted: Vec<Granted> = (1..=5u16)
        .map(|k| map_ok(&sock, server, client, 8100 + k, [0x40 + k as u8; 12], true))
        .collect();
    assert!(granted.iter().all(|g| g.honoured), "{granted:?}");
    nodes[other(active)].wait(Duration::from_secs(5), "check-points replicated", |n| {
        n.ha()["checkpointed_mappings"] == 5
    });
    for (round, active_first) in [true, false].into_iter().enumerate() {
        for n in &mut nodes {
            n.crash();
        }
        let first = if active_first { active } else { other(active) };
        for i in [first, other(first)] {
            let cfg = portkeepd_config(&nodes[i], &lab, i);
            nodes[i].start_portkeepd(&cfg);
            let conf = keepalived_conf(&nodes[i]);
            nodes[i].start_keepalived(&conf);
            if i == first {
                // Alone, keepalived makes it MASTER and promotes it.
                nodes[i].wait(Duration::from_secs(20), "promoted alone", Node::is_active);
            }
        }
        let t0 = now();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (_, got) = refresh_until_answered(
            &sock,
            server,
            client,
            &granted[0],
            t0,
            Duration::from_secs(20),
        );
        assert_eq!(got.external, granted[0].external, "round {round}");
        let now_active = wait_for_node(&nodes, Duration::from_secs(5), "active", Node::is_active);
        assert_eq!(
            now_active, first,
            "round {round}: the node back first serves (nopreempt)"
        );
        assert_listed(&nodes[now_active], &granted);
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        for g in &granted {
            let r = map_ok(&sock, server, client, g.port, g.nonce, true);
            assert_eq!(r.external, g.external, "round {round}: {g:?}");
        }
        nodes[now_active].wait(Duration::from_secs(20), "the other back in sync", |n| {
            n.ha()["in_sync"] == true
        });
        // Renewed with a backup in sync: check-pointed again, replicated.
        for g in &granted {
            let r = map_ok(&sock, server, client, g.port, g.nonce, true);
            assert!(r.honoured, "round {round}: {r:?}");
        }
        nodes[other(now_active)].wait(Duration::from_secs(5), "check-points replicated", |n| {
            n.ha()["checkpointed_mappings"] == 5
        });
        eprintln!(
            "round {round}: {} back first, served every check-point",
            nodes[first].name
        );
        active = now_active;
    }
    let names = lab.names();
    drop(nodes);
    drop(lab);
    assert_gone(&names);
}
