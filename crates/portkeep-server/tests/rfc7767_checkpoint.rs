//! CHECKPOINT_REQUIRED (RFC 7767) in the server core: the option's rules
//! (section 3.1), honouring, echoing and renewals (section 3.2), classes
//! (section 4) and abuse confinement (section 5), driven with made-up time
//! and the backup link state as an input. Each test is named after the
//! section it checks.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, MapData, OpData, PcpOption, PeerData, Protocol, Request, RequestHeader, Response,
    ResultCode,
};
use portkeep_server::{
    BackupState, CheckpointClass, CheckpointMode, CheckpointPolicy, NamedSubscriber, Outcome,
    RateLimit, RefusalReason, Restored, Server, ServerConfig, SubscriberKeying, Timestamp,
};

const A: &str = "198.51.100.10";
const B: &str = "198.51.100.20";
const T0: Timestamp = Timestamp(1_000_000);
const CP: PcpOption = PcpOption::CheckpointRequired;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn class(
    name: &str,
    mode: CheckpointMode,
    max: Option<u32>,
    rate: Option<(u32, u32)>,
) -> CheckpointClass {
    CheckpointClass {
        name: name.to_owned(),
        mode,
        max,
        rate: rate.map(|(count, burst)| RateLimit {
            count,
            per: Duration::from_secs(1),
            burst,
        }),
    }
}

/// One on-request class without limits unless a test sets them.
fn policy(classes: Vec<CheckpointClass>) -> CheckpointPolicy {
    CheckpointPolicy {
        max_mappings: 1000,
        classes,
        default_class: 0,
        assign: Vec::new(),
    }
}

fn cfg(checkpoint: CheckpointPolicy) -> ServerConfig {
    ServerConfig {
        external_addresses: vec![ip("192.0.2.1")],
        port_min: 20000,
        port_max: 29999,
        checkpoint,
        ..ServerConfig::default()
    }
}

fn unlimited() -> CheckpointPolicy {
    policy(vec![class("open", CheckpointMode::OnRequest, None, None)])
}

/// A server whose backup is in sync, so only the policy decides.
fn in_sync(p: CheckpointPolicy) -> Server {
    let mut s = Server::new(cfg(p), T0);
    s.set_backup_state(BackupState::InSync);
    s
}

fn map_req(client: &str, port: u16, lifetime: u32, n: u8, options: Vec<PcpOption>) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip(client)),
        },
        data: OpData::Map(MapData {
            nonce: [n; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options,
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

fn peer_req(client: &str, port: u16, n: u8, options: Vec<PcpOption>) -> Vec<u8> {
    let remote: SocketAddr = "203.0.113.9:443".parse().unwrap();
    Request {
        header: RequestHeader {
            lifetime: 600,
            client_ip: to_wire(ip(client)),
        },
        data: OpData::Peer(PeerData {
            map: MapData {
                nonce: [n; 12],
                protocol: Protocol::TCP,
                internal_port: port,
                external_port: 0,
                external_ip: Ipv6Addr::UNSPECIFIED,
            },
            remote_port: remote.port(),
            remote_ip: to_wire(remote.ip()),
        }),
        options,
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

fn raw(s: &mut Server, now: Timestamp, from: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let o = s.handle(now, SocketAddr::new(ip(from), 40000), bytes, &mut out);
    assert_eq!(o, Outcome::Reply);
    out
}

fn send(s: &mut Server, now: Timestamp, from: &str, bytes: &[u8]) -> Response {
    Response::parse(&raw(s, now, from, bytes), &CodePoints::default()).unwrap()
}

/// MAP TCP `port` from `client` with CHECKPOINT_REQUIRED; asserts the MAP
/// itself succeeds and returns whether the option was echoed.
fn map_cp(s: &mut Server, now: Timestamp, client: &str, port: u16) -> bool {
    let r = send(s, now, client, &map_req(client, port, 3600, 1, vec![CP]));
    assert_eq!(
        r.header.result,
        ResultCode::SUCCESS,
        "the MAP itself succeeds"
    );
    r.checkpoint_honoured()
}

fn flag(s: &Server, client: &str, port: u16) -> bool {
    s.mappings()
        .iter()
        .find(|m| m.key.internal_ip == ip(client) && m.key.internal_port == port)
        .unwrap()
        .checkpoint
}

fn refused(s: &Server, reason: RefusalReason) -> u64 {
    s.stats().checkpoint.refused(reason)
}

/// Every refusal counter except `reason` is zero, and `reason`'s is `n`.
fn only_refusal(s: &Server, reason: RefusalReason, n: u64) {
    for r in RefusalReason::ALL {
        let want = if r == reason { n } else { 0 };
        assert_eq!(refused(s, r), want, "refusals counted under {r}");
    }
}

// ---- Section 3.1: the option -----------------------------------------

#[test]
fn rfc7767_s3_1_second_occurrence_is_malformed_option() {
    let mut s = in_sync(unlimited());
    let r = send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![CP, CP]));
    assert_eq!(r.header.result, ResultCode::MALFORMED_OPTION);
    let r = send(&mut s, T0, A, &peer_req(A, 81, 1, vec![CP, CP]));
    assert_eq!(r.header.result, ResultCode::MALFORMED_OPTION);
    assert_eq!(s.mapping_count(), 0);
    assert_eq!(s.stats().checkpoint.granted, 0);
}

#[test]
fn rfc7767_s3_1_non_zero_length_is_malformed_option() {
    let mut s = in_sync(unlimited());
    let mut bytes = map_req(A, 80, 3600, 1, vec![]);
    // Option 192 with 4 octets of data.
    bytes.extend_from_slice(&[192, 0, 0, 4, 0, 0, 0, 0]);
    let r = send(&mut s, T0, A, &bytes);
    assert_eq!(r.header.result, ResultCode::MALFORMED_OPTION);
    assert_eq!(s.mapping_count(), 0);
}

#[test]
fn rfc7767_s3_1_option_on_announce_is_ignored() {
    let mut s = in_sync(unlimited());
    let bytes = Request {
        header: RequestHeader {
            lifetime: 0,
            client_ip: to_wire(ip(A)),
        },
        data: OpData::Announce,
        options: vec![CP],
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let r = send(&mut s, T0, A, &bytes);
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert!(r.options.is_empty(), "not echoed on ANNOUNCE");
    assert_eq!(s.stats().checkpoint.granted, 0);
    assert_eq!(s.stats().checkpoint.refused_total(), 0);
    // Not valid for ANNOUNCE, so not checked either: even with data it is
    // ignored (RFC 6887 section 7.3, optional-to-process options).
    let mut bytes = bytes[..24].to_vec();
    bytes.extend_from_slice(&[192, 0, 0, 4, 1, 2, 3, 4]);
    let r = send(&mut s, T0, A, &bytes);
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert!(r.options.is_empty());
}

// ---- Section 3.2: honouring, echoing, renewals ------------------------

#[test]
fn rfc7767_s3_2_honoured_option_is_echoed_and_flags_the_mapping() {
    let mut s = in_sync(unlimited());
    assert!(map_cp(&mut s, T0, A, 80));
    assert!(flag(&s, A, 80));
    let r = send(&mut s, T0, A, &peer_req(A, 5000, 2, vec![CP]));
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert!(r.checkpoint_honoured(), "PEER too");
    assert_eq!(s.checkpointed_count(), 2);
    assert_eq!(s.stats().checkpoint.granted, 2);
    // The change log carries the flag for the replica link.
    let flagged = s
        .drain_changes()
        .filter(|c| matches!(&c.change, portkeep_server::Change::Upserted(m) if m.checkpoint))
        .count();
    assert_eq!(flagged, 2);
}

#[test]
fn rfc7767_s3_2_refused_request_is_processed_as_if_the_option_were_absent() {
    // Two identical servers, one asked with the option (and refused: no
    // backup), one without: the responses are the same octets.
    let mut with = Server::new(cfg(unlimited()), T0);
    let mut without = Server::new(cfg(unlimited()), T0);
    let a = raw(&mut with, T0, A, &map_req(A, 80, 3600, 1, vec![CP]));
    let b = raw(&mut without, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert_eq!(a, b);
    let a = raw(&mut with, T0, A, &peer_req(A, 81, 2, vec![CP]));
    let b = raw(&mut without, T0, A, &peer_req(A, 81, 2, vec![]));
    assert_eq!(a, b);
    assert_eq!(with.mappings().iter().filter(|m| m.checkpoint).count(), 0);
}

#[test]
fn rfc7767_s3_2_never_echoed_when_not_requested() {
    // A gold subscriber's mapping is check-pointed without asking, but the
    // response must still not carry the option.
    let mut s = in_sync(policy(vec![class(
        "gold",
        CheckpointMode::Always,
        None,
        None,
    )]));
    let r = send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert!(
        r.options.is_empty(),
        "MUST NOT include it if not in the request"
    );
    assert!(flag(&s, A, 80));
    let r = send(&mut s, T0, A, &peer_req(A, 81, 2, vec![]));
    assert!(r.options.is_empty());
    assert_eq!(s.stats().checkpoint.forced, 2);
    assert_eq!(s.stats().checkpoint.granted, 0);
    // An on-request server honours nothing unasked.
    let mut s = in_sync(unlimited());
    let r = send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert!(r.options.is_empty());
    assert!(!flag(&s, A, 80));
}

#[test]
fn rfc7767_s3_2_renewal_with_option_sets_flag() {
    let mut s = in_sync(unlimited());
    let r = send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert!(!r.checkpoint_honoured());
    assert!(!flag(&s, A, 80));
    assert!(
        map_cp(&mut s, T0, A, 80),
        "a renewal can win the checkpoint"
    );
    assert!(flag(&s, A, 80));
    assert_eq!(s.checkpointed_count(), 1);
}

#[test]
fn rfc7767_s3_2_renewal_without_option_clears_flag_and_returns_quota() {
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(1),
        None,
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    assert!(!map_cp(&mut s, T0, A, 81), "quota of 1 is held by port 80");
    // Renew port 80 without the option: flag cleared, slot returned.
    let r = send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert!(r.options.is_empty());
    assert!(!flag(&s, A, 80));
    assert_eq!(s.checkpointed_count(), 0);
    assert!(map_cp(&mut s, T0, A, 81), "the returned slot is usable");
    // PEER renewals follow the same rule.
    let mut s = in_sync(unlimited());
    assert!(send(&mut s, T0, A, &peer_req(A, 5000, 2, vec![CP])).checkpoint_honoured());
    let r = send(&mut s, T0, A, &peer_req(A, 5000, 2, vec![]));
    assert!(!r.checkpoint_honoured());
    assert!(!flag(&s, A, 5000));
    assert_eq!(s.checkpointed_count(), 0);
}

#[test]
fn rfc7767_s3_2_delete_and_expiry_return_the_quota() {
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(1),
        None,
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    // Delete (lifetime 0) with the option: never echoed, not counted.
    let r = send(&mut s, T0, A, &map_req(A, 80, 0, 1, vec![CP]));
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert!(!r.checkpoint_honoured());
    assert_eq!(s.checkpointed_count(), 0);
    assert!(map_cp(&mut s, T0, A, 81));
    assert_eq!(s.stats().checkpoint.granted, 2);
    // Expiry gives it back too.
    let later = T0 + Duration::from_secs(3601);
    s.handle_timeout(later);
    assert_eq!(s.mapping_count(), 0);
    assert_eq!(s.checkpointed_count(), 0);
    assert!(map_cp(&mut s, later, A, 82));
}

#[test]
fn rfc7767_s3_2_renewals_of_a_checkpointed_mapping_are_not_charged_again() {
    // Rate 1/s, burst 1, quota 1: renewing the one protected mapping many
    // times a second must not cost it its protection.
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(1),
        Some((1, 1)),
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    for _ in 0..5 {
        assert!(map_cp(&mut s, T0, A, 80));
    }
    assert!(flag(&s, A, 80));
    assert_eq!(s.stats().checkpoint.granted, 6);
    assert_eq!(s.stats().checkpoint.refused_total(), 0);
}

// ---- Section 3.2: each refusal reason, in order -----------------------

#[test]
fn rfc7767_s3_2_refusal_policy_for_a_never_class() {
    let mut s = in_sync(policy(vec![class(
        "bronze",
        CheckpointMode::Never,
        None,
        None,
    )]));
    assert!(!map_cp(&mut s, T0, A, 80));
    assert!(!flag(&s, A, 80));
    only_refusal(&s, RefusalReason::Policy, 1);
    // Policy comes before the backup: a standalone server counts policy.
    let mut s = Server::new(
        cfg(policy(vec![class(
            "bronze",
            CheckpointMode::Never,
            None,
            None,
        )])),
        T0,
    );
    assert!(!map_cp(&mut s, T0, A, 80));
    only_refusal(&s, RefusalReason::Policy, 1);
}

#[test]
fn rfc7767_s3_2_refusal_capacity_of_the_server() {
    let mut p = unlimited();
    p.max_mappings = 2;
    let mut s = in_sync(p);
    assert!(map_cp(&mut s, T0, A, 80));
    assert!(map_cp(&mut s, T0, B, 80));
    assert!(!map_cp(&mut s, T0, A, 81), "server full");
    assert!(!flag(&s, A, 81));
    only_refusal(&s, RefusalReason::Capacity, 1);
    assert_eq!(s.mapping_count(), 3, "the mapping exists, unprotected");
}

#[test]
fn rfc7767_s3_2_refusal_subscriber_quota() {
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(2),
        None,
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    assert!(map_cp(&mut s, T0, A, 81));
    assert!(!map_cp(&mut s, T0, A, 82));
    assert!(!send(&mut s, T0, A, &peer_req(A, 5000, 2, vec![CP])).checkpoint_honoured());
    only_refusal(&s, RefusalReason::SubscriberQuota, 2);
}

#[test]
fn rfc7767_s3_2_refusal_rate_then_refill() {
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        None,
        Some((1, 2)),
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    assert!(map_cp(&mut s, T0, A, 81));
    assert!(!map_cp(&mut s, T0, A, 82), "burst of 2 spent");
    only_refusal(&s, RefusalReason::Rate, 1);
    // One second later one token is back: the renewal API's use case.
    let t1 = T0 + Duration::from_secs(1);
    assert!(
        map_cp(&mut s, t1, A, 82),
        "a later renewal wins the checkpoint"
    );
    assert!(!map_cp(&mut s, t1, A, 83));
    only_refusal(&s, RefusalReason::Rate, 2);
}

#[test]
fn rfc7767_s3_2_refusal_no_backup_unless_in_sync() {
    for state in [
        BackupState::Standalone,
        BackupState::Disconnected,
        BackupState::Syncing,
    ] {
        let mut s = Server::new(cfg(unlimited()), T0);
        s.set_backup_state(state);
        assert!(!map_cp(&mut s, T0, A, 80), "{state:?}");
        assert!(!send(&mut s, T0, A, &peer_req(A, 5000, 2, vec![CP])).checkpoint_honoured());
        assert!(!flag(&s, A, 80));
        only_refusal(&s, RefusalReason::NoBackup, 2);
        assert_eq!(s.checkpointed_count(), 0);
    }
}

#[test]
fn rfc7767_s3_2_a_new_server_is_standalone_and_honours_nothing() {
    let mut s = Server::new(cfg(unlimited()), T0);
    assert_eq!(s.backup_state(), BackupState::Standalone);
    assert!(!map_cp(&mut s, T0, A, 80));
}

#[test]
fn rfc7767_s3_2_losing_the_backup_clears_the_flag_at_the_next_renewal() {
    let mut s = in_sync(unlimited());
    assert!(map_cp(&mut s, T0, A, 80));
    s.set_backup_state(BackupState::Disconnected);
    assert!(!map_cp(&mut s, T0, A, 80), "cannot claim protection now");
    assert!(!flag(&s, A, 80));
    assert_eq!(s.checkpointed_count(), 0);
    s.set_backup_state(BackupState::InSync);
    assert!(map_cp(&mut s, T0, A, 80), "and wins it back once in sync");
    only_refusal(&s, RefusalReason::NoBackup, 1);
}

#[test]
fn rfc7767_s3_2_rate_is_checked_before_the_backup_and_counts_requests() {
    // On a standalone server the first `burst` requests are refused for
    // lack of a backup, the rest for rate: the rate limits check-point
    // requests, not grants.
    let mut s = Server::new(
        cfg(policy(vec![class(
            "silver",
            CheckpointMode::OnRequest,
            None,
            Some((1, 3)),
        )])),
        T0,
    );
    for port in 80..85 {
        assert!(!map_cp(&mut s, T0, A, port));
    }
    assert_eq!(refused(&s, RefusalReason::NoBackup), 3);
    assert_eq!(refused(&s, RefusalReason::Rate), 2);
}

#[test]
fn rfc7767_s3_2_rate_survives_deleting_every_mapping() {
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        None,
        Some((1, 1)),
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    send(&mut s, T0, A, &map_req(A, 80, 0, 1, vec![]));
    assert_eq!(s.mapping_count(), 0);
    assert!(
        !map_cp(&mut s, T0, A, 80),
        "delete and re-create gains nothing"
    );
    only_refusal(&s, RefusalReason::Rate, 1);
}

#[test]
fn rfc7767_s3_2_a_failed_map_spends_no_token() {
    let mut s = in_sync(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        None,
        Some((1, 1)),
    )]));
    assert!(map_cp(&mut s, T0, A, 80));
    // Wrong nonce: NOT_AUTHORIZED, no decision taken.
    let r = send(&mut s, T0, A, &map_req(A, 80, 3600, 9, vec![CP]));
    assert_eq!(r.header.result, ResultCode::NOT_AUTHORIZED);
    assert_eq!(s.stats().checkpoint.refused_total(), 0);
}

// ---- Network attachment point ------------------------------------------

#[test]
fn rfc7767_s3_2_third_party_counts_against_the_named_host() {
    let mut c = cfg(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(1),
        None,
    )]));
    c.third_party_clients = vec!["198.51.100.0/24".parse().unwrap()];
    let mut s = Server::new(c, T0);
    s.set_backup_state(BackupState::InSync);
    // B, on behalf of A, uses A's quota.
    let r = send(
        &mut s,
        T0,
        B,
        &map_req(
            B,
            80,
            3600,
            1,
            vec![PcpOption::ThirdParty(to_wire(ip(A))), CP],
        ),
    );
    assert!(r.checkpoint_honoured());
    assert!(!map_cp(&mut s, T0, A, 81), "A's quota is spent");
    assert!(map_cp(&mut s, T0, B, 81), "B's own is untouched");
    only_refusal(&s, RefusalReason::SubscriberQuota, 1);
}

#[test]
fn rfc7767_s3_2_named_prefix_is_one_subscriber() {
    let mut c = cfg(policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(1),
        None,
    )]));
    c.subscriber_keying = SubscriberKeying {
        named: vec![NamedSubscriber {
            prefix: "198.51.100.0/27".parse().unwrap(),
            name: "cust-42".into(),
        }],
        ..SubscriberKeying::default()
    };
    let mut s = Server::new(c, T0);
    s.set_backup_state(BackupState::InSync);
    assert!(map_cp(&mut s, T0, A, 80)); // .10
    assert!(!map_cp(&mut s, T0, B, 80), ".20 is the same subscriber");
    assert!(map_cp(&mut s, T0, "198.51.100.40", 80), ".40 is outside");
    let m = s.mappings();
    let sub = m
        .iter()
        .find(|m| m.key.internal_ip == ip(B))
        .unwrap()
        .subscriber;
    assert_eq!(sub.to_string(), "198.51.100.0/27");
    assert_eq!(s.config().subscriber_keying.name_of(sub), Some("cust-42"));
}

// ---- Section 4: classes --------------------------------------------------

fn gold_silver_bronze() -> CheckpointPolicy {
    CheckpointPolicy {
        max_mappings: 1000,
        classes: vec![
            class("gold", CheckpointMode::Always, None, None),
            class("silver", CheckpointMode::OnRequest, Some(2), Some((1, 4))),
            class("bronze", CheckpointMode::Never, None, None),
        ],
        default_class: 1,
        assign: vec![
            ("198.51.100.0/28".parse().unwrap(), 0),
            ("203.0.113.0/24".parse().unwrap(), 2),
        ],
    }
}

#[test]
fn rfc7767_s4_gold_silver_bronze_behave_as_configured() {
    const GOLD: &str = "198.51.100.5";
    const SILVER: &str = "198.51.100.20";
    const BRONZE: &str = "203.0.113.7";
    let mut s = in_sync(gold_silver_bronze());
    assert_eq!(
        s.checkpoint_class_of(s.config().subscriber_keying.subscriber_of(ip(GOLD)))
            .unwrap()
            .name,
        "gold"
    );
    // Gold: every mapping, asked or not, no quota; echo only when asked.
    for port in 80..85 {
        let r = send(&mut s, T0, GOLD, &map_req(GOLD, port, 3600, 1, vec![]));
        assert!(r.options.is_empty());
        assert!(flag(&s, GOLD, port));
    }
    assert!(map_cp(&mut s, T0, GOLD, 90));
    // Silver: only when asked, within its quota of 2.
    let r = send(&mut s, T0, SILVER, &map_req(SILVER, 80, 3600, 1, vec![]));
    assert!(!r.checkpoint_honoured());
    assert!(!flag(&s, SILVER, 80));
    assert!(map_cp(&mut s, T0, SILVER, 81));
    assert!(map_cp(&mut s, T0, SILVER, 82));
    assert!(!map_cp(&mut s, T0, SILVER, 83));
    // Bronze: never, whatever the client asks (section 5).
    assert!(!map_cp(&mut s, T0, BRONZE, 80));
    assert!(!flag(&s, BRONZE, 80));
    let c = s.stats().checkpoint;
    assert_eq!(c.forced, 5);
    assert_eq!(c.granted, 3);
    assert_eq!(c.refused(RefusalReason::SubscriberQuota), 1);
    assert_eq!(c.refused(RefusalReason::Policy), 1);
    // The same decisions, by the class that made them.
    let by = &s.stats().checkpoint_by_class;
    let gold = by["gold"];
    assert_eq!((gold.forced, gold.granted, gold.refused_total()), (5, 1, 0));
    let silver = by["silver"];
    assert_eq!((silver.forced, silver.granted), (0, 2));
    assert_eq!(silver.refused(RefusalReason::SubscriberQuota), 1);
    assert_eq!(silver.refused_total(), 1);
    let bronze = by["bronze"];
    assert_eq!((bronze.forced, bronze.granted), (0, 0));
    assert_eq!(bronze.refused(RefusalReason::Policy), 1);
    // Mappings by the class of their subscriber, check-pointed or not.
    assert_eq!(
        s.mapping_count_by_class(),
        [("gold", 6), ("silver", 4), ("bronze", 1)]
    );
    s.check_invariants().unwrap();
}

#[test]
fn rfc7767_s4_gold_is_still_bounded_by_capacity_and_backup() {
    let mut p = gold_silver_bronze();
    p.max_mappings = 2;
    let mut s = in_sync(p);
    const GOLD: &str = "198.51.100.5";
    assert!(map_cp(&mut s, T0, GOLD, 80));
    assert!(map_cp(&mut s, T0, GOLD, 81));
    assert!(!map_cp(&mut s, T0, GOLD, 82));
    only_refusal(&s, RefusalReason::Capacity, 1);
    let mut s = Server::new(cfg(gold_silver_bronze()), T0);
    assert!(!map_cp(&mut s, T0, GOLD, 80), "no backup, no protection");
    let r = send(&mut s, T0, GOLD, &map_req(GOLD, 81, 3600, 1, vec![]));
    assert!(r.options.is_empty());
    assert!(!flag(&s, GOLD, 80) && !flag(&s, GOLD, 81));
    only_refusal(&s, RefusalReason::NoBackup, 1);
    assert_eq!(s.stats().checkpoint.forced, 0);
}

// ---- Section 5: abuse is confined to the abuser ----------------------------

#[test]
fn rfc7767_s5_abuse_is_confined_to_the_abuser() {
    let p = policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(8),
        Some((1, 4)),
    )]);
    let mut s = in_sync(p.clone());
    // A floods: 500 requests in the same instant.
    let mut granted_a = 0;
    for port in 1000..1500 {
        if map_cp(&mut s, T0, A, port) {
            granted_a += 1;
        }
    }
    assert_eq!(granted_a, 4, "A gets its burst, nothing more");
    // B, untouched, gets exactly what it would have on an idle server.
    let mut idle = in_sync(p);
    for port in 80..90 {
        assert_eq!(
            map_cp(&mut s, T0, B, port),
            map_cp(&mut idle, T0, B, port),
            "B's grant for port {port} does not depend on A"
        );
    }
    assert_eq!(
        s.mappings()
            .iter()
            .filter(|m| m.checkpoint && m.key.internal_ip == ip(B))
            .count(),
        4
    );
    // Over time A is bounded by its quota of 8, B still unaffected.
    let mut t = T0;
    for port in 2000..2100 {
        t = t + Duration::from_secs(1);
        map_cp(&mut s, t, A, port);
    }
    let held_a = s
        .mappings()
        .iter()
        .filter(|m| m.checkpoint && m.key.internal_ip == ip(A))
        .count();
    assert_eq!(held_a, 8);
    assert!(map_cp(&mut s, t + Duration::from_secs(10), B, 200));
}

// ---- Stable storage and operator clearing -------------------------------

#[test]
fn rfc7767_s3_2_restored_checkpoints_keep_their_quota_and_clear_returns_it() {
    use portkeep_server::{ClearSelector, Restored};
    let p = policy(vec![class(
        "silver",
        CheckpointMode::OnRequest,
        Some(1),
        None,
    )]);
    let mut s = in_sync(p.clone());
    assert!(map_cp(&mut s, T0, A, 80));
    let state = Restored {
        anchor: s.anchor(),
        subscriber_anchors: s.subscriber_anchors(),
        mappings: s.mappings(),
        last_seq: s.last_seq(),
        term: 0,
        owed: Vec::new(),
        requesters: Vec::new(),
        holds: Vec::new(),
    };
    let (mut r, report) = Server::restore(cfg(p), T0, state);
    assert_eq!(report.restored, 1);
    r.set_backup_state(BackupState::InSync);
    assert!(flag(&r, A, 80), "the flag survives the restart");
    assert_eq!(r.checkpointed_count(), 1, "and holds its slot");
    assert!(
        !map_cp(&mut r, T0, A, 81),
        "so the quota of 1 is still spent"
    );
    only_refusal(&r, RefusalReason::SubscriberQuota, 1);
    // Clearing the subscriber gives the slot back.
    let sub = r.config().subscriber_keying.subscriber_of(ip(A));
    r.clear(T0, ClearSelector::Subscriber(sub));
    assert_eq!(r.checkpointed_count(), 0);
    assert!(map_cp(&mut r, T0, A, 82));
}

// ---- What the backup must know (failure-scenarios draft section 2.6) --

/// The subscriber of `client` under the default keying.
fn sub_of(s: &Server, client: &str) -> portkeep_server::SubscriberId {
    s.config().subscriber_keying.subscriber_of(ip(client))
}

/// What the backup hears of a subscriber's volatile state: its hosts and
/// when the last of that state ends.
type Marker = (portkeep_server::SubscriberId, Vec<IpAddr>, Timestamp);

/// The end of a mapping made at `now` with the lifetime `r` granted.
fn ends(now: Timestamp, r: &Response) -> Timestamp {
    now + Duration::from_secs(u64::from(r.header.lifetime))
}

#[test]
fn draft_2_6_volatile_hosts_are_tracked_per_subscriber() {
    let mut s = in_sync(unlimited());
    // A check-pointed mapping is not volatile state.
    assert!(map_cp(&mut s, T0, A, 80));
    assert!(s.drain_volatile().is_empty());
    assert!(s.volatile_hosts().is_empty());
    // The first volatile mapping of a host marks it, once, with its end.
    let r = send(&mut s, T0, A, &map_req(A, 81, 3600, 1, vec![]));
    let end = ends(T0, &r);
    let a = sub_of(&s, A);
    assert_eq!(s.drain_volatile(), vec![(a, vec![ip(A)], end)]);
    // A second one that ends no later changes nothing the backup knows.
    send(&mut s, T0, A, &map_req(A, 82, 60, 1, vec![]));
    assert!(s.drain_volatile().is_empty(), "drained, and nothing new");
    // A renewal without the option turns a check-pointed mapping volatile:
    // no new host, and it ends with the others.
    send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert!(!flag(&s, A, 80));
    assert!(s.drain_volatile().is_empty());
    // Deleting every volatile mapping of the host unmarks it.
    for port in [80, 81, 82] {
        send(&mut s, T0, A, &map_req(A, port, 0, 1, vec![]));
    }
    let gone: Vec<Marker> = s.drain_volatile();
    assert_eq!(gone.len(), 1);
    assert_eq!((gone[0].0, gone[0].1.len()), (a, 0));
    assert!(s.volatile_hosts().is_empty());
}

/// Failure-scenarios draft section 2.6.1: the epoch resets exactly when
/// state was lost, so the backup must know not just who holds volatile
/// state but until when: a renewal that makes it last longer is news the
/// backup must hear (its reply waits for that), and so is the end moving
/// earlier when the longest-lived mapping goes.
#[test]
fn draft_2_6_1_the_backup_hears_when_volatile_state_ends() {
    let mut s = in_sync(unlimited());
    let a = sub_of(&s, A);
    let r = send(&mut s, T0, A, &map_req(A, 81, 3000, 1, vec![]));
    let first = ends(T0, &r);
    let r = send(&mut s, T0, A, &map_req(A, 82, 600, 1, vec![]));
    let short = ends(T0, &r);
    assert!(short < first);
    assert_eq!(s.drain_volatile(), vec![(a, vec![ip(A)], first)]);
    // The renewal of the longest-lived one moves the end later.
    let t1 = T0 + Duration::from_secs(30);
    let r = send(&mut s, t1, A, &map_req(A, 81, 3000, 1, vec![]));
    let later = ends(t1, &r);
    assert!(later > first);
    assert_eq!(s.drain_volatile(), vec![(a, vec![ip(A)], later)]);
    assert_eq!(s.volatile_hosts(), vec![(a, vec![ip(A)], later)]);
    // Deleting it moves the end back to the other's.
    send(&mut s, t1, A, &map_req(A, 81, 0, 1, vec![]));
    assert_eq!(s.drain_volatile(), vec![(a, vec![ip(A)], short)]);
    // And its expiry ends it.
    s.handle_timeout(short);
    let gone = s.drain_volatile();
    assert_eq!((gone.len(), gone[0].1.is_empty()), (1, true));
}

#[test]
fn draft_2_6_volatile_markers_follow_peer_expiry_and_flag_changes() {
    let mut s = in_sync(unlimited());
    let b = sub_of(&s, B);
    let r = send(&mut s, T0, B, &peer_req(B, 5000, 2, vec![]));
    assert_eq!(s.drain_volatile(), vec![(b, vec![ip(B)], ends(T0, &r))]);
    // The renewal with the option check-points it: the host holds nothing
    // volatile any more.
    let r = send(&mut s, T0, B, &peer_req(B, 5000, 2, vec![CP]));
    assert!(r.checkpoint_honoured());
    let gone = s.drain_volatile();
    assert_eq!((gone.len(), gone[0].0, gone[0].1.is_empty()), (1, b, true));
    // Expiry of a volatile mapping unmarks its host too.
    let r = send(&mut s, T0, A, &map_req(A, 90, 60, 3, vec![]));
    let a = sub_of(&s, A);
    assert_eq!(s.volatile_hosts(), vec![(a, vec![ip(A)], ends(T0, &r))]);
    s.drain_volatile();
    s.handle_timeout(T0 + Duration::from_secs(100_000));
    let gone = s.drain_volatile();
    assert_eq!((gone.len(), gone[0].0, gone[0].1.is_empty()), (1, a, true));
}

#[test]
fn rfc7767_s3_2_unflag_when_the_backup_did_not_confirm() {
    let mut s = in_sync(unlimited());
    assert!(map_cp(&mut s, T0, A, 80));
    let m = s.checkpointed_mappings();
    assert_eq!(m.len(), 1);
    let m = m[0].clone();
    s.drain_changes();
    // A different nonce does not own the mapping.
    assert!(!s.unflag(&m.key, m.kind, [9; 12]));
    assert!(s.unflag(&m.key, m.kind, m.nonce));
    assert!(!flag(&s, A, 80));
    assert_eq!(s.checkpointed_count(), 0);
    assert!(s.checkpointed_mappings().is_empty());
    let changes: Vec<_> = s.drain_changes().collect();
    assert_eq!(changes.len(), 1, "the unflag is logged: {changes:?}");
    match &changes[0].change {
        portkeep_server::Change::Upserted(r) => {
            assert!(!r.checkpoint);
            assert_eq!(r.external, m.external, "the mapping itself stays");
        }
        other => panic!("unexpected change {other:?}"),
    }
    // The backup keeps following it (its client may not have heard yet
    // that the check-point ended), so it is not volatile state.
    assert!(s.volatile_hosts().is_empty());
    assert_eq!(s.replicated_mappings().len(), 1);
    // Twice is a no-op.
    assert!(!s.unflag(&m.key, m.kind, m.nonce));
}

/// RFC 7767 section 1 (resync): a table copied a page at a time, with
/// mappings made, renewed without the option and deleted between pages,
/// ends exactly at the table's state once the changes after the first
/// page's position are applied on top.
#[test]
fn rfc7767_s1_a_paged_copy_brought_forward_equals_the_table() {
    use portkeep_server::record::key_of;
    use portkeep_server::{Change, MappingRecord};
    use std::collections::BTreeMap;

    let mut s = in_sync(unlimited());
    let t = Timestamp(1_000);
    for p in 0..300u16 {
        assert!(map_cp(&mut s, t, "198.51.100.1", 1000 + p));
    }
    let _ = s.drain_changes().count();
    let start = s.last_seq();
    let mut copy: BTreeMap<Vec<u8>, MappingRecord> = BTreeMap::new();
    let mut from = Some(0u32);
    let mut round = 0u16;
    while let Some(f) = from {
        let (page, next) = s.replicated_page(f, 37);
        for m in page {
            copy.insert(key_of(&m), m);
        }
        from = next;
        // Between pages: a new check-pointed mapping, one renewed without
        // the option (no longer check-pointed, still replicated), one
        // deleted.
        round += 1;
        assert!(map_cp(&mut s, t, "198.51.100.2", 2000 + round));
        send(
            &mut s,
            t,
            "198.51.100.1",
            &map_req("198.51.100.1", 1000 + round, 600, 1, vec![]),
        );
        send(
            &mut s,
            t,
            "198.51.100.1",
            &map_req("198.51.100.1", 1100 + round, 0, 1, vec![]),
        );
    }
    assert!(round > 5, "the copy took several pages");
    for c in s.drain_changes().filter(|c| c.seq > start) {
        match c.change {
            Change::Upserted(m) if m.checkpoint || copy.contains_key(&key_of(&m)) => {
                copy.insert(key_of(&m), m);
            }
            Change::Upserted(_) => {}
            Change::Removed { mapping, .. } => {
                copy.remove(&key_of(&mapping));
            }
            _ => {}
        }
    }
    let table: BTreeMap<Vec<u8>, MappingRecord> = s
        .replicated_mappings()
        .into_iter()
        .map(|m| (key_of(&m), m))
        .collect();
    assert_eq!(copy, table);
    assert!(
        table.values().any(|m| !m.checkpoint),
        "the copy follows mappings that lost their flag"
    );
}

/// A mapping renewed without the option loses its check-point, but the
/// backup keeps following it (its client may not have heard yet): it stays
/// replicated, is not counted as volatile state, and a node that takes
/// over from the backup's replica keeps following it in turn, as does a
/// node restarted from its own store (the record says so): a client's
/// earlier check-point stands until the lifetime it was granted ends
/// (RFC 7767 section 3.2), across a restart of the active too.
#[test]
fn draft_2_6_a_mapping_that_lost_its_flag_stays_replicated() {
    let mut s = in_sync(unlimited());
    assert!(map_cp(&mut s, T0, A, 80));
    s.drain_volatile();
    send(&mut s, T0, A, &map_req(A, 80, 3600, 1, vec![]));
    assert!(!flag(&s, A, 80));
    assert!(s.checkpointed_mappings().is_empty());
    let followed = s.replicated_mappings();
    assert_eq!(followed.len(), 1);
    assert!(!followed[0].checkpoint);
    assert!(followed[0].followed, "the record carries it to the store");
    assert!(s.drain_volatile().is_empty());
    assert!(s.volatile_hosts().is_empty());
    let state = Restored {
        anchor: T0,
        subscriber_anchors: vec![],
        mappings: followed.clone(),
        last_seq: 10,
        term: 0,
        owed: Vec::new(),
        requesters: Vec::new(),
        holds: Vec::new(),
    };
    let (taken_over, _) = Server::restore_replica(cfg(unlimited()), T0, state.clone());
    assert_eq!(taken_over.replicated_mappings(), followed);
    assert!(taken_over.volatile_hosts().is_empty());
    // From its own store: still followed, so the next snapshot carries it
    // to the backup (simulator seeds 44985, 47475, 55924: a double
    // failure, the active restarted from its store, then lost).
    let (restarted, _) = Server::restore(cfg(unlimited()), T0, state);
    assert_eq!(restarted.replicated_mappings(), followed);
    assert!(restarted.volatile_hosts().is_empty());
}
