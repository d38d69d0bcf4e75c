//! Live reload against the real daemon (`ctl reload`, and SIGHUP): a
//! changed quota, check-point class or log level is served at once; a
//! broken file changes nothing and says why; what takes a restart (a
//! listen address, the store, ...) is named, not silently ignored; an external
//! address removed ends its mappings and resets exactly their
//! subscribers' epochs (failure-scenarios draft section 2.6.1).

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::sync::LazyLock;
use std::time::Duration;

use portkeep_client::RequestBuilder;
use portkeep_proto::{OpData, Protocol, ResultCode};
use portkeep_test_support::daemon::{Daemon, DaemonSpec};
use portkeep_test_support::pcp::{request, restartable_port, v4, LOCALHOST};
use portkeep_test_support::process::{wait_until, Bins};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

fn config(quota: u32, pool: &str, extra: &str) -> String {
    format!(
        "external_addresses = [{pool}]\nport_range = \"20000-20999\"\n[subscribers]\nmax_mappings = {quota}\n{extra}"
    )
}

fn reload(d: &Daemon, text: &str) -> serde_json::Value {
    std::fs::write(d.config_path(), text).unwrap();
    let r = d.ctl(&["--json", "reload"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    r.json()
}

/// A reload the daemon refuses: `ctl` exits 1 and says why.
fn refused_reload(d: &Daemon, text: &str) -> String {
    std::fs::write(d.config_path(), text).unwrap();
    let r = d.ctl(&["--json", "reload"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    r.stderr
}

#[test]
fn reload_serves_a_changed_quota_keeps_running_on_a_broken_file_and_names_what_takes_a_restart() {
    let pool = "\"192.0.2.1\"";
    let d = Daemon::with_config(&BINS, &config(2, pool, ""));
    let me = v4("127.0.0.1");
    let map = |port: u16| {
        request(
            me,
            d.addr(),
            &RequestBuilder::map(Protocol::TCP, port).nonce([7; 12]),
        )
    };
    assert_eq!(map(1).header.result, ResultCode::SUCCESS);
    assert_eq!(map(2).header.result, ResultCode::SUCCESS);
    assert_eq!(map(3).header.result, ResultCode::USER_EX_QUOTA);
    let digest = |d: &Daemon| d.ctl(&["--json", "status"]).json()["config_digest"].clone();
    let before = digest(&d);

    let r = reload(&d, &config(5, pool, ""));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["need_restart"], serde_json::json!([]), "{r}");
    assert_ne!(digest(&d), before, "the digest follows the policy");
    assert_eq!(
        map(3).header.result,
        ResultCode::SUCCESS,
        "the new quota is served"
    );

    let served = digest(&d);
    let why = refused_reload(&d, &config(5, pool, "[limits]\nmax_mappings = \"lots\"\n"));
    assert!(why.contains("limits.max_mappings"), "{why}");
    assert_eq!(
        d.ctl(&["--json", "status"]).json()["last_reload"]["ok"],
        false,
        "ctl status keeps the outcome"
    );
    assert_eq!(digest(&d), served, "a broken file changes nothing");
    assert_eq!(map(4).header.result, ResultCode::SUCCESS, "still serving");

    let r = reload(
        &d,
        &format!(
            "workers = 3\n{}",
            config(5, pool, "[store]\nmode = \"memory\"\n")
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["need_restart"],
        serde_json::json!(["workers", "store"]),
        "{r}"
    );
    assert_eq!(
        d.ctl(&["--json", "mappings"]).json()["mappings"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // SIGHUP does the same as ctl reload.
    std::fs::write(d.config_path(), config(1, pool, "")).unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    wait_until("SIGHUP reload", Duration::from_secs(10), || {
        let s = d.ctl(&["--json", "status"]).json();
        (s["last_reload"]["ok"] == true && s["config_digest"] != served).then_some(())
    });
    assert_eq!(
        map(9).header.result,
        ResultCode::USER_EX_QUOTA,
        "quota 1 now, 4 held"
    );
    assert_eq!(
        map(1).header.result,
        ResultCode::SUCCESS,
        "what is held is renewed"
    );
}

#[test]
fn draft_s2_6_1_an_external_address_removed_by_reload_ends_its_mappings_and_resets_their_epochs() {
    let d = Daemon::with_config(&BINS, &config(10, "\"192.0.2.1\", \"192.0.2.2\"", ""));
    let (a, b) = (v4("127.0.0.1"), v4("127.0.0.2"));
    let on = |host, ext: &str| {
        let r = request(
            host,
            d.addr(),
            &RequestBuilder::map(Protocol::TCP, 80)
                .nonce([3; 12])
                .suggest(Some(ext.parse().unwrap()), 0)
                .prefer_failure(),
        );
        assert_eq!(r.header.result, ResultCode::SUCCESS, "{r:?}");
        r
    };
    on(a, "192.0.2.1");
    on(b, "192.0.2.2");
    std::thread::sleep(Duration::from_millis(2100));
    let r = reload(&d, &config(10, "\"192.0.2.1\"", ""));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["ended"], 1, "{r}");
    let list = d.ctl(&["--json", "mappings"]).json();
    let held: Vec<&str> = list["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["internal_ip"].as_str().unwrap())
        .collect();
    assert_eq!(held, vec!["127.0.0.1"], "{list}");
    // The host that lost its mapping sees a new epoch; the other does not.
    let epoch = |host| {
        request(host, d.addr(), &RequestBuilder::announce())
            .header
            .epoch
    };
    assert!(epoch(b) < 2, "127.0.0.2 lost state: its epoch restarts");
    assert!(epoch(a) >= 2, "127.0.0.1 lost nothing: its epoch goes on");
    let again = request(
        b,
        d.addr(),
        &RequestBuilder::map(Protocol::TCP, 80).nonce([3; 12]),
    );
    match again.data {
        OpData::Map(m) => assert_eq!(
            m.external_ip,
            portkeep_proto::addr::to_wire("192.0.2.1".parse().unwrap())
        ),
        other => panic!("{other:?}"),
    }
}

/// `[log] level` is re-read by a reload: at `warn` the reload's own info
/// line is not logged, at `info` again it is; a filter that does not parse
/// is refused naming the key, and the level stays.
#[test]
fn reload_changes_the_log_level_and_refuses_a_bad_one() {
    let pool = "\"192.0.2.1\"";
    let level = |l: &str| config(2, pool, &format!("[log]\nlevel = \"{l}\"\n"));
    let d = Daemon::with_config(&BINS, &level("warn"));
    let reloaded = |d: &Daemon| d.log().matches("reloaded the configuration").count();
    assert!(
        !d.log().contains("portkeepd serving PCP"),
        "info logged at warn:\n{}",
        d.log()
    );

    let r = reload(&d, &level("warn"));
    assert_eq!(r["log_level"], "warn", "{r}");
    assert_eq!(reloaded(&d), 0, "info logged at warn:\n{}", d.log());

    let r = reload(&d, &level("info"));
    assert_eq!(r["log_level"], "info", "{r}");
    wait_until("the level change logged", Duration::from_secs(5), || {
        d.log().contains("log level changed").then_some(())
    });
    reload(&d, &level("info"));
    wait_until("an info line at info", Duration::from_secs(5), || {
        (reloaded(&d) >= 1).then_some(())
    });

    let why = refused_reload(&d, &level("info,=="));
    assert!(why.contains("log.level"), "{why}");
    let r = reload(&d, &config(2, pool, ""));
    assert_eq!(r["log_level"], "info", "no [log] level means info: {r}");
    // Going quieter is logged too, under the level it leaves.
    let changes = |d: &Daemon| d.log().matches("log level changed").count();
    let before = changes(&d);
    let r = reload(&d, &level("error"));
    assert_eq!(r["log_level"], "error", "{r}");
    wait_until("the change to error logged", Duration::from_secs(5), || {
        (changes(&d) > before).then_some(())
    });
}

/// SIGHUP with a changed check-point class is served at once (RFC 7767
/// section 4: the operator's policy per subscriber): the subscriber's
/// check-point requests, refused for want of a backup under an
/// `on-request` class, are refused by policy under a `never` one.
#[test]
fn rfc7767_s4_sighup_with_a_changed_class_serves_it_at_once() {
    let pool = "\"192.0.2.1\"";
    let classes = |default: &str| {
        config(
            10,
            pool,
            &format!(
                "[checkpoint]\ndefault_class = \"{default}\"\n[checkpoint.classes.open]\ncheckpoint = \"on-request\"\n[checkpoint.classes.closed]\ncheckpoint = \"never\"\n"
            ),
        )
    };
    let d = Daemon::with_config(&BINS, &classes("open"));
    let me = v4("127.0.0.1");
    let ask = |port: u16| {
        let r = request(
            me,
            d.addr(),
            &RequestBuilder::map(Protocol::TCP, port)
                .nonce([3; 12])
                .checkpoint_required(),
        );
        assert_eq!(r.header.result, ResultCode::SUCCESS);
    };
    let refused = |why: &str| {
        d.ctl(&["--json", "counters"]).json()["checkpoint"]["refused"][why]
            .as_u64()
            .unwrap()
    };
    ask(1);
    assert_eq!((refused("no_backup"), refused("policy")), (1, 0));

    std::fs::write(d.config_path(), classes("closed")).unwrap();
    let served = d.ctl(&["--json", "status"]).json()["config_digest"].clone();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    wait_until("SIGHUP reload", Duration::from_secs(10), || {
        let s = d.ctl(&["--json", "status"]).json();
        (s["last_reload"]["ok"] == true && s["config_digest"] != served).then_some(())
    });
    ask(2);
    assert_eq!(
        (refused("no_backup"), refused("policy")),
        (1, 1),
        "the new class decided"
    );
}

/// A changed `listen` takes a restart: the reload names it and the daemon
/// keeps serving where it listened (nothing answers at the new address).
#[test]
fn reload_names_a_changed_listen_address_and_keeps_serving_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        std::net::SocketAddr::new(LOCALHOST, restartable_port(LOCALHOST)),
        std::net::SocketAddr::new(LOCALHOST, restartable_port(LOCALHOST)),
    );
    let path = dir.path().join("portkeepd.toml");
    let text = |listen: std::net::SocketAddr| {
        format!(
            "listen = [\"{listen}\"]\n{}",
            config(10, "\"192.0.2.1\"", "")
        )
    };
    std::fs::write(&path, text(old)).unwrap();
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            raw_args: Some(vec!["--config".into(), path.display().to_string()]),
            fixed_addrs: vec![old],
            ..DaemonSpec::default()
        },
    );
    std::fs::write(&path, text(new)).unwrap();
    let r = d.ctl(&["--json", "reload"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = r.json();
    assert_eq!(r["need_restart"], serde_json::json!(["listen"]), "{r}");
    let me = v4("127.0.0.1");
    let granted = request(me, old, &RequestBuilder::map(Protocol::TCP, 80));
    assert_eq!(granted.header.result, ResultCode::SUCCESS);
    let sock = std::net::UdpSocket::bind((me, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let req = RequestBuilder::announce()
        .build(me)
        .unwrap()
        .to_bytes(&portkeep_proto::CodePoints::default())
        .unwrap();
    sock.send_to(&req, new).unwrap();
    let mut buf = [0u8; 1100];
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "something answered at the new address before a restart"
    );
}

/// A reload that changes the firewall prefixes (RFC 6887 section 1: for
/// them the external address is the internal one) is named as needing a
/// restart, and the core keeps answering as the dataplane's table, built
/// at start, still programs: as a NAT for a host the new file would
/// firewall.
#[test]
fn reload_leaves_the_firewall_prefixes_to_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::SocketAddr::new("::1".parse().unwrap(), restartable_port(LOCALHOST));
    let path = dir.path().join("portkeepd.toml");
    let text = |prefix: &str| {
        format!(
            "listen = [\"{addr}\"]\nexternal_addresses = [\"2001:db8:ff::1\"]\n\
             port_range = \"20000-20999\"\n\
             [dataplane]\nmode = \"firewall\"\nfirewall_prefixes = [\"{prefix}\"]\n"
        )
    };
    std::fs::write(&path, text("2001:db8:1::/48")).unwrap();
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            raw_args: Some(vec!["--config".into(), path.display().to_string()]),
            fixed_addrs: vec![addr],
            ..DaemonSpec::default()
        },
    );
    let me: std::net::IpAddr = "::1".parse().unwrap();
    let external = |port: u16| {
        let r = request(me, addr, &RequestBuilder::map(Protocol::TCP, port));
        assert_eq!(r.header.result, ResultCode::SUCCESS, "{r:?}");
        match r.data {
            OpData::Map(m) => portkeep_proto::addr::from_wire(m.external_ip),
            other => panic!("{other:?}"),
        }
    };
    let pool: std::net::IpAddr = "2001:db8:ff::1".parse().unwrap();
    assert_eq!(external(80), pool, "::1 is not firewalled: translated");
    std::fs::write(&path, text("::1/128")).unwrap();
    let r = d.ctl(&["--json", "reload"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = r.json();
    assert_eq!(
        r["need_restart"],
        serde_json::json!(["dataplane.firewall_prefixes"]),
        "{r}"
    );
    assert_eq!(r["ended"], 0, "nothing lost: {r}");
    assert_eq!(
        external(81),
        pool,
        "the table still translates ::1 until a restart"
    );
}
