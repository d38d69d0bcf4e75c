//! CHECKPOINT_REQUIRED (RFC 7767) end to end: the real `portkeepd` and
//! `portkeep` binaries on loopback, and `portkeepd ctl` for the admin view.
//!
//! A standalone daemon has no backup, so it honours nothing (section 3.2:
//! the option is never echoed, honestly telling the client its mapping is
//! not protected). The checks before the backup gate (policy, capacity,
//! quota, rate) run first, so their refusals are observable here too. The
//! grant path end to end comes with the HA link.

#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;

use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::process::Bins;
use serde_json::Value;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

fn counters(d: &Daemon) -> Value {
    let run = d.ctl(&["--json", "counters"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    run.json()["checkpoint"].clone()
}

fn refused(c: &Value, reason: &str) -> u64 {
    c["refused"][reason].as_u64().unwrap()
}

#[test]
fn rfc7767_s3_2_standalone_daemon_never_honours_and_counts_no_backup() {
    let d = Daemon::start(&BINS);
    let server = d.server();
    let map = BINS.cli_at(&server, &["--json", "map", "tcp", "8080", "--checkpoint"]);
    assert_eq!(map.code, Some(0), "the MAP itself succeeds: {map:?}");
    let v = map.json();
    assert_eq!(v["checkpoint_requested"], true);
    assert_eq!(v["checkpoint_honoured"], false);
    let peer = BINS.cli_at(
        &server,
        &["peer", "udp", "5000", "203.0.113.9:3478", "--checkpoint"],
    );
    assert_eq!(peer.code, Some(0), "{peer:?}");
    assert!(
        peer.stdout.contains("checkpoint honoured: no (not echoed"),
        "plainly reported: {peer:?}"
    );
    // Without the option: nothing is counted.
    assert_eq!(BINS.cli_at(&server, &["map", "tcp", "8081"]).code, Some(0));

    let c = counters(&d);
    assert_eq!(c["granted"], 0, "{c}");
    assert_eq!(refused(&c, "no_backup"), 2, "{c}");
    for reason in ["policy", "capacity", "subscriber_quota", "rate"] {
        assert_eq!(refused(&c, reason), 0, "{reason}: {c}");
    }
    assert_eq!(c["checkpointed"], 0);

    let list = d.ctl(&["--json", "mappings"]).json();
    let list = list["mappings"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    for m in list {
        assert_eq!(m["checkpoint"], false, "{m}");
        assert_eq!(m["class"], "default", "{m}");
    }
    let status = d.ctl(&["--json", "status"]).json();
    assert_eq!(status["backup"], "standalone");
    assert_eq!(status["checkpointed"], 0);
    let human = d.ctl(&["counters"]);
    assert!(
        human.stdout.contains("checkpoint refused no_backup: 2"),
        "{human:?}"
    );
    assert!(human.stdout.contains("checkpoint granted: 0"), "{human:?}");
}

#[test]
fn rfc7767_s5_never_class_refuses_for_policy() {
    let d = Daemon::with_config(
        &BINS,
        r#"
[checkpoint]
default_class = "bronze"
[checkpoint.classes.bronze]
checkpoint = "never"
[checkpoint.classes.silver]
checkpoint = "on-request"
"#,
    );
    let map = BINS.cli_at(
        &d.server(),
        &["--json", "map", "tcp", "8080", "--checkpoint"],
    );
    assert_eq!(map.code, Some(0), "{map:?}");
    assert_eq!(map.json()["checkpoint_honoured"], false);
    let c = counters(&d);
    assert_eq!(refused(&c, "policy"), 1, "{c}");
    assert_eq!(refused(&c, "no_backup"), 0, "policy is checked first: {c}");
    let list = d.ctl(&["--json", "mappings"]).json();
    assert_eq!(list["mappings"][0]["class"], "bronze");
    assert_eq!(list["mappings"][0]["checkpoint"], false);
}

#[test]
fn rfc7767_s3_2_rate_bites_before_the_backup_gate() {
    // Burst 2, then one an hour: the first two requests reach the backup
    // gate (no backup), the third is refused for rate.
    let d = Daemon::with_config(
        &BINS,
        r#"
[checkpoint.classes.silver]
checkpoint = "on-request"
max = 8
rate = "1/h"
burst = 2
"#,
    );
    let server = d.server();
    for port in ["8080", "8081", "8082"] {
        let run = BINS.cli_at(&server, &["--json", "map", "tcp", port, "--checkpoint"]);
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.json()["checkpoint_honoured"], false);
    }
    let c = counters(&d);
    assert_eq!(refused(&c, "no_backup"), 2, "{c}");
    assert_eq!(refused(&c, "rate"), 1, "{c}");
    let raw = d.ctl(&["--json", "counters"]).json();
    assert!(raw["results"]["SUCCESS"].as_u64().unwrap() >= 3);
}

#[test]
fn rfc7767_s3_2_named_subscriber_and_class_in_the_admin_view() {
    let d = Daemon::with_config(
        &BINS,
        r#"
[[subscribers.named]]
prefix = "127.0.0.0/8"
id = "loopback-cust"
[checkpoint]
default_class = "silver"
[checkpoint.classes.gold]
checkpoint = "always"
[checkpoint.classes.silver]
checkpoint = "on-request"
[[checkpoint.assign]]
prefix = "127.0.0.0/8"
class = "gold"
"#,
    );
    let map = BINS.cli_at(&d.server(), &["--json", "map", "tcp", "8080"]);
    assert_eq!(map.code, Some(0), "{map:?}");
    // Gold without a backup: not protected; never echoed unasked.
    assert_eq!(map.json()["checkpoint_honoured"], false);
    let list = d.ctl(&["--json", "mappings"]).json();
    let m = &list["mappings"][0];
    assert_eq!(m["subscriber"], "127.0.0.0/8");
    assert_eq!(m["subscriber_name"], "loopback-cust");
    assert_eq!(m["class"], "gold");
    assert_eq!(m["checkpoint"], false);
    let table = d.ctl(&["mappings"]);
    assert!(
        table.stdout.contains("loopback-cust") && table.stdout.contains("gold"),
        "{table:?}"
    );
    let c = counters(&d);
    assert_eq!(c["forced"], 0);
    assert_eq!(c["refused_total"], 0, "unasked refusals are not requests");
}
