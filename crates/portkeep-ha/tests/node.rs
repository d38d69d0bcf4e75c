//! The node state machine: when replies leave, role changes, fencing.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::IpAddr;
use std::time::Duration;

use portkeep_ha::{
    ActiveConfig, Effect, LinkState, Node, NodeConfig, Role, SnapshotSource, TakeoverKind,
};
use portkeep_proto::Protocol;
use portkeep_server::{
    BackupState, Change, ChangeRecord, MappingKey, MappingKind, MappingRecord, SubscriberKeying,
    Timestamp,
};

const T0: Timestamp = Timestamp(1_000_000);

fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

fn mapping(host: &str, port: u16, checkpoint: bool) -> MappingRecord {
    let ip: IpAddr = host.parse().unwrap();
    MappingRecord {
        key: MappingKey {
            internal_ip: ip,
            protocol: Protocol::TCP,
            internal_port: port,
        },
        kind: MappingKind::Map,
        nonce: [7; 12],
        external: "192.0.2.1:40000".parse().unwrap(),
        expires: at(3_600_000),
        lifetime: 3600,
        checkpoint,
        filters: vec![],
        description: None,
        subscriber: SubscriberKeying::default().subscriber_of(ip),
        third_party: false,
        followed: false,
        manager: None,
    }
}

fn upsert(seq: u64, m: MappingRecord) -> Vec<ChangeRecord> {
    vec![ChangeRecord {
        started: false,
        seq,
        change: Change::Upserted(m),
    }]
}

fn node(role: Role) -> Node<u32> {
    Node::new(
        NodeConfig::new(role, Some(ActiveConfig::default()), Duration::from_secs(2)),
        1,
        SubscriberKeying::default(),
    )
}

fn effects(n: &mut Node<u32>) -> Vec<Effect<u32>> {
    std::iter::from_fn(|| n.poll_effect()).collect()
}

fn released(e: &[Effect<u32>]) -> Vec<u32> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Release(r) => Some(*r),
            _ => None,
        })
        .collect()
}

fn rewritten(e: &[Effect<u32>]) -> Vec<u32> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Rewrite { reply, .. } => Some(*reply),
            _ => None,
        })
        .collect()
}

/// Moves bytes both ways until quiet; the backup persists at once. Every
/// effect is kept, in order.
fn pump(a: &mut Node<u32>, b: &mut Node<u32>, now: Timestamp) -> Vec<Effect<u32>> {
    let mut seen = Vec::new();
    loop {
        let mut moved = false;
        if let Some(bytes) = a.poll_transmit() {
            b.handle_link_input(now, &bytes).unwrap();
            moved = true;
        }
        for e in effects(b) {
            if let Effect::Persist { seq, .. } = e {
                b.persisted(seq);
            }
        }
        if let Some(bytes) = b.poll_transmit() {
            a.handle_link_input(now, &bytes).unwrap();
            moved = true;
        }
        for e in effects(a) {
            if matches!(e, Effect::NeedSnapshot) {
                let snap = SnapshotSource {
                    term: a.term(),
                    seq: 0,
                    anchor: T0,
                    subscriber_anchors: vec![],
                    mappings: vec![],
                    volatile: vec![],
                    owed: vec![],
                    requesters: Vec::new(),
                    holds: Vec::new(),
                    version: a.peer_version(),
                }
                .encode(a.snapshot_part());
                a.send_snapshot(now, snap);
                moved = true;
            }
            seen.push(e);
        }
        if !moved {
            return seen;
        }
    }
}

fn in_sync_pair() -> (Node<u32>, Node<u32>) {
    let mut a = node(Role::Active);
    let mut b = node(Role::Backup);
    assert!(
        !a.serving(),
        "an active node with a peer waits for first contact"
    );
    a.link_connected(at(0));
    b.link_connected(at(0));
    pump(&mut a, &mut b, at(0));
    assert!(a.serving());
    assert_eq!(a.backup_state(), BackupState::InSync);
    (a, b)
}

#[test]
fn rfc7767_s3_2_checkpointed_reply_leaves_only_after_the_backups_ack() {
    let (mut a, mut b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    assert!(
        released(&effects(&mut a)).is_empty(),
        "held until acknowledged"
    );
    assert_eq!(a.held(), 1);
    let e = pump(&mut a, &mut b, at(2));
    assert_eq!(released(&e), vec![10]);
    assert_eq!(a.held(), 0);
}

#[test]
fn rfc7767_s3_2_backup_acknowledges_only_what_it_persisted() {
    let (mut a, mut b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    let bytes = a.poll_transmit().unwrap();
    b.handle_link_input(at(1), &bytes).unwrap();
    let persist: Vec<u64> = effects(&mut b)
        .into_iter()
        .filter_map(|e| match e {
            Effect::Persist { seq, .. } => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(persist, vec![1]);
    assert!(b.poll_transmit().is_none(), "no ack before persisted");
    b.persisted(1);
    let ack = b.poll_transmit().expect("ack after persisted");
    a.handle_link_input(at(2), &ack).unwrap();
    assert_eq!(released(&effects(&mut a)), vec![10]);
}

#[test]
fn rfc7767_s3_2_volatile_reply_is_not_held() {
    let (mut a, _b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, false)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    assert_eq!(released(&effects(&mut a)), vec![10]);
}

#[test]
fn rfc7767_s3_2_a_mapping_that_loses_its_flag_stays_followed_by_the_backup() {
    let (mut a, mut b) = in_sync_pair();
    let m = mapping("198.51.100.1", 80, true);
    let meta = a.prepare(&upsert(1, m.clone()), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    assert_eq!(released(&pump(&mut a, &mut b, at(2))), vec![10]);
    // Renewed without the option: its client may not hear that the
    // check-point ended before a takeover, so the backup keeps following
    // the mapping, and the reply waits for it like any other.
    let mut renewed = m.clone();
    renewed.checkpoint = false;
    renewed.expires = at(7_200_000);
    let meta = a.prepare(&upsert(2, renewed.clone()), vec![]);
    a.handle_commit(at(3), vec![(11, meta)]);
    assert!(released(&effects(&mut a)).is_empty());
    assert_eq!(released(&pump(&mut a, &mut b, at(4))), vec![11]);
    // A mapping that was never check-pointed costs the link nothing.
    let meta = a.prepare(&upsert(3, mapping("198.51.100.1", 81, false)), vec![]);
    a.handle_commit(at(5), vec![(12, meta)]);
    assert_eq!(released(&effects(&mut a)), vec![12]);
    let t = b.promote(at(6)).unwrap();
    assert_eq!(t.kind, TakeoverKind::Hot);
    assert_eq!(t.state.mappings, vec![renewed]);
    assert!(t.reset.is_empty(), "nothing it held was lost");
}

#[test]
fn rfc7767_s3_2_unconfirmed_checkpoints_are_rewritten_when_the_ack_is_late() {
    let (mut a, _b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    effects(&mut a);
    a.handle_timeout(at(1) + ActiveConfig::default().ack_timeout);
    let e = effects(&mut a);
    assert_eq!(rewritten(&e), vec![10]);
    assert!(released(&e).is_empty());
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::BackupState(BackupState::Syncing))));
    assert_eq!(a.stats().checkpoints_rewritten, 1);
}

#[test]
fn rfc7767_s3_2_checkpoint_granted_out_of_sync_is_rewritten_at_once() {
    let mut a = node(Role::Active);
    a.link_lost(at(0)); // the peer cannot be reached: serve, honour nothing
    assert!(a.serving());
    effects(&mut a);
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    assert_eq!(rewritten(&effects(&mut a)), vec![10]);
}

#[test]
fn draft_s2_6_unconfirmed_volatile_reply_waits_while_the_backup_may_take_over_hot() {
    let (mut a, _b) = in_sync_pair();
    // The link fails: until the lease the backup holds ends, it may be
    // promoted hot, keeping the epochs, so nothing it never heard of may
    // reach a client before then.
    a.link_lost(at(100));
    effects(&mut a);
    let host = "198.51.100.9";
    let ip: IpAddr = host.parse().unwrap();
    let sub = SubscriberKeying::default().subscriber_of(ip);
    let meta = a.prepare(
        &upsert(1, mapping(host, 80, false)),
        vec![(sub, vec![ip], Timestamp(u64::MAX))],
    );
    a.handle_commit(at(200), vec![(10, meta)]);
    assert!(
        effects(&mut a).is_empty(),
        "held: the backup never heard of the volatile state"
    );
    let end = a.active().unwrap().lease_until().unwrap();
    assert_eq!(end, at(0) + Duration::from_secs(2));
    assert_eq!(a.poll_timeout(), Some(end));
    a.handle_timeout(Timestamp(end.0 - 1));
    assert!(effects(&mut a).is_empty());
    // Once it ended, a promotion resets every epoch: the reply leaves,
    // to be made again as of its release, 1.8 s after it was made.
    a.handle_timeout(end);
    let e = effects(&mut a);
    assert!(
        matches!(
            e.as_slice(),
            [Effect::ReleaseAged {
                reply: 10,
                waited_ms: 1800
            }]
        ),
        "{e:?}"
    );
    assert_eq!(a.stats().released_unconfirmed, 1);
}

#[test]
fn draft_s2_6_a_reply_with_nothing_of_its_own_waits_for_what_was_sent_before_it() {
    let (mut a, mut b) = in_sync_pair();
    let host = "198.51.100.9";
    let ip: IpAddr = host.parse().unwrap();
    let sub = SubscriberKeying::default().subscriber_of(ip);
    // A host's first volatile mapping: its marker travels to the backup.
    let meta = a.prepare(
        &upsert(1, mapping(host, 80, false)),
        vec![(sub, vec![ip], Timestamp(u64::MAX))],
    );
    a.handle_commit(at(1), vec![(10, meta)]);
    // The request retransmitted and answered again: nothing new for the
    // backup, but the answer reports the same state, which the backup may
    // not hold yet (a hot takeover would not reset the host's epoch).
    let meta = a.prepare(&upsert(2, mapping(host, 80, false)), vec![]);
    a.handle_commit(at(2), vec![(11, meta)]);
    assert!(
        released(&effects(&mut a)).is_empty(),
        "both wait for the marker's acknowledgement"
    );
    let e = pump(&mut a, &mut b, at(3));
    assert_eq!(released(&e), vec![10, 11]);
    // With nothing in flight, such a reply leaves at once.
    let meta = a.prepare(&upsert(3, mapping(host, 80, false)), vec![]);
    a.handle_commit(at(4), vec![(12, meta)]);
    assert_eq!(released(&effects(&mut a)), vec![12]);
}

#[test]
fn rfc7767_s3_2_a_rewritten_reply_waits_for_what_its_first_version_depended_on() {
    let (mut a, mut b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    effects(&mut a);
    a.handle_timeout(at(1) + ActiveConfig::default().ack_timeout);
    let after = effects(&mut a)
        .into_iter()
        .find_map(|e| match e {
            Effect::Rewrite {
                reply: 10, after, ..
            } => Some(after),
            _ => None,
        })
        .unwrap();
    assert_eq!(after, 1);
    // The unflagging changed nothing (a retransmission answered twice, the
    // first answer already unflagged the mapping): the rewritten reply's
    // job has no change of its own, but still waits for position 1.
    let meta = a.prepare(&[], vec![]).after(after);
    a.handle_commit(at(300), vec![(11, meta)]);
    assert!(released(&effects(&mut a)).is_empty());
    let e = pump(&mut a, &mut b, at(400));
    assert_eq!(released(&e), vec![11]);
}

#[test]
fn design_fencing_deposed_node_releases_nothing_and_drops_what_it_held() {
    let (mut a, _b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    effects(&mut a);
    assert_eq!(a.held(), 1);
    // A node promoted meanwhile speaks in a higher term.
    let mut hello = Vec::new();
    portkeep_ha::Message::Hello {
        term: 5,
        active: false,
        applied: 0,
        now: at(2),
        version: portkeep_ha::wire::LINK_VERSION,
        holds: portkeep_ha::Position::default(),
    }
    .encode(&mut hello);
    a.handle_link_input(at(2), &hello).unwrap();
    let e = effects(&mut a);
    assert!(e.iter().any(|e| matches!(e, Effect::Deposed { term: 5 })));
    assert!(e.iter().any(|e| matches!(e, Effect::PersistTerm(5))));
    assert!(released(&e).is_empty() && rewritten(&e).is_empty());
    assert!(!a.serving());
    assert_eq!(a.role(), Role::Backup);
    assert_eq!(a.held(), 0);
    // Whatever it still commits is never answered.
    let meta = a.prepare(&upsert(2, mapping("198.51.100.1", 81, false)), vec![]);
    a.handle_commit(at(3), vec![(11, meta)]);
    assert!(released(&effects(&mut a)).is_empty());
}

#[test]
fn design_fencing_returning_active_serves_only_after_first_contact() {
    let mut a = node(Role::Active);
    assert!(!a.serving());
    a.link_connected(at(0));
    assert!(!a.serving(), "connected, but not heard yet");
    let mut hello = Vec::new();
    portkeep_ha::Message::Hello {
        term: 1,
        active: false,
        applied: 0,
        now: at(0),
        version: portkeep_ha::wire::LINK_VERSION,
        holds: portkeep_ha::Position::default(),
    }
    .encode(&mut hello);
    a.handle_link_input(at(1), &hello).unwrap();
    assert!(a.serving());
}

#[test]
fn draft_s2_6_promotion_persists_a_higher_term_and_serves() {
    let (mut a, mut b) = in_sync_pair();
    let meta = a.prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    pump(&mut a, &mut b, at(2));
    assert_eq!(b.promotion_term().unwrap(), 2);
    b.link_lost(at(3));
    let t = b.promote(at(4)).unwrap();
    assert_eq!(t.kind, TakeoverKind::Hot);
    assert_eq!(t.term, 2);
    assert_eq!(t.state.mappings.len(), 1);
    assert!(b.serving());
    assert_eq!(b.role(), Role::Active);
    assert!(b.promote(at(5)).is_err(), "already active");
}

#[test]
fn demotion_stops_serving_at_once() {
    let (mut a, _b) = in_sync_pair();
    assert!(a.demote());
    assert!(!a.serving());
    assert_eq!(a.role(), Role::Backup);
    assert!(!a.demote());
}

#[test]
fn rfc7767_s1_changes_committed_while_a_snapshot_is_copied_follow_it() {
    let mut a = node(Role::Active);
    let mut b = node(Role::Backup);
    a.link_connected(at(0));
    b.link_connected(at(0));
    // Hello both ways, but keep the snapshot request pending.
    let hb = b.poll_transmit().unwrap();
    a.handle_link_input(at(0), &hb).unwrap();
    let ha = a.poll_transmit().unwrap();
    b.handle_link_input(at(0), &ha).unwrap();
    assert!(effects(&mut a)
        .iter()
        .any(|e| matches!(e, Effect::NeedSnapshot)));
    assert_eq!(a.active().unwrap().state(), LinkState::NeedSnapshot);
    // Seq 1 is in the copy; seq 2 was committed after it.
    let m1 = mapping("198.51.100.1", 80, true);
    let m2 = mapping("198.51.100.2", 80, true);
    let meta1 = a.prepare(&upsert(1, m1.clone()), vec![]);
    let meta2 = a.prepare(&upsert(2, m2), vec![]);
    a.handle_commit(at(1), vec![(1, meta1), (2, meta2)]);
    let snap = SnapshotSource {
        term: a.term(),
        seq: 1,
        anchor: T0,
        subscriber_anchors: vec![],
        mappings: vec![m1],
        volatile: vec![],
        owed: vec![],
        requesters: vec![],
        holds: vec![],
        version: a.peer_version(),
    }
    .encode(a.snapshot_part());
    a.send_snapshot(at(2), snap);
    pump(&mut a, &mut b, at(3));
    assert_eq!(a.backup_state(), BackupState::InSync);
    assert_eq!(b.backup().unwrap().mapping_count(), 2);
}

#[test]
fn design_fencing_returning_active_in_the_peers_own_term_stands_down() {
    // Node a was deposed by term 1 (and persisted it); it comes back
    // configured active in term 1, where node b is the active. b answers
    // its connection with a hello of term 1, active: a must not serve.
    let mut a: Node<u32> = Node::new(
        NodeConfig::new(
            Role::Active,
            Some(ActiveConfig::default()),
            Duration::from_secs(2),
        ),
        1,
        SubscriberKeying::default(),
    );
    a.link_connected(at(0));
    let mut hello = Vec::new();
    portkeep_ha::Message::Hello {
        term: 1,
        active: true,
        applied: 0,
        now: at(0),
        version: portkeep_ha::wire::LINK_VERSION,
        holds: portkeep_ha::Position::default(),
    }
    .encode(&mut hello);
    a.handle_link_input(at(1), &hello).unwrap();
    let e = effects(&mut a);
    assert!(!a.serving(), "two actives in term 1");
    assert_eq!(a.role(), Role::Backup);
    assert!(e.iter().any(|e| matches!(e, Effect::Deposed { term: 1 })));
}

#[test]
fn design_fencing_serving_active_is_not_deposed_by_a_stale_peer_in_its_term() {
    // The active that serves connects to a stale node that still claims to
    // be active in the same term: it keeps serving (the stale node is the
    // one fenced, by its own connection).
    let (mut a, _b) = in_sync_pair();
    a.link_lost(at(5));
    a.link_connected(at(6));
    let mut hello = Vec::new();
    portkeep_ha::Message::Hello {
        term: a.term(),
        active: true,
        applied: 0,
        now: at(6),
        version: portkeep_ha::wire::LINK_VERSION,
        holds: portkeep_ha::Position::default(),
    }
    .encode(&mut hello);
    a.handle_link_input(at(7), &hello).unwrap();
    assert!(a.serving());
    assert_eq!(a.role(), Role::Active);
}

/// Moves bytes both ways until quiet; returns the effects of each side.
fn exchange(
    a: &mut Node<u32>,
    b: &mut Node<u32>,
    now: Timestamp,
) -> (Vec<Effect<u32>>, Vec<Effect<u32>>) {
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    loop {
        let mut moved = false;
        if let Some(bytes) = a.poll_transmit() {
            b.handle_link_input(now, &bytes).unwrap();
            moved = true;
        }
        if let Some(bytes) = b.poll_transmit() {
            a.handle_link_input(now, &bytes).unwrap();
            moved = true;
        }
        ea.extend(effects(a));
        eb.extend(effects(b));
        if !moved {
            return (ea, eb);
        }
    }
}

/// Term 1, log position `seq`.
fn pos(seq: u64) -> portkeep_ha::Position {
    portkeep_ha::Position { term: 1, seq }
}

/// A backup resumed from a replica of term 1 standing for log position
/// `seq`.
fn backup_holding(seq: u64) -> Node<u32> {
    let mut b = node(Role::Backup);
    b.resume_replica(portkeep_ha::Replica {
        term: 1,
        seq,
        server_anchor: Some(T0),
        mappings: vec![mapping("198.51.100.1", 80, true)],
        ..portkeep_ha::Replica::default()
    });
    b
}

#[test]
fn draft_s2_6_an_active_that_has_not_served_hands_over_to_a_fresher_backup() {
    // Both nodes come back after a double failure: the one configured
    // active holds less (it had been deposed, its store emptied) than the
    // backup (its stored replica).
    let mut a = node(Role::Active);
    a.set_position(pos(3));
    let mut b = backup_holding(10);
    a.link_connected(at(0));
    b.link_connected(at(0));
    let (ea, seen) = exchange(&mut a, &mut b, at(0));
    assert!(
        ea.iter().any(|e| matches!(
            e,
            Effect::HandedOver {
                term: 1,
                held,
                peer_holds,
            } if *held == pos(3) && *peer_holds == pos(10)
        )),
        "{ea:?}"
    );
    assert!(!a.serving(), "the older state is never served");
    assert_eq!(a.role(), Role::Backup);
    assert!(
        seen.iter().any(|e| matches!(e, Effect::TakeOver)),
        "the backup is told to take over: {seen:?}"
    );
    // The node that stood down refuses a promotion (keepalived moves the
    // address to the peer) until it syncs from an active.
    assert_eq!(
        a.promotion_term(),
        Err(portkeep_ha::PromoteError::PeerFresher {
            own: pos(3),
            peer: pos(10)
        })
    );
    // The backup takes over from what it holds.
    let t = b.promote(at(1)).unwrap();
    assert_eq!(t.term, 2);
    assert_eq!(t.state.mappings.len(), 1);
    assert_eq!(t.kind, TakeoverKind::Stale, "volatile state was lost");
}

#[test]
fn draft_s2_6_an_active_that_holds_as_much_serves() {
    let mut a = node(Role::Active);
    a.set_position(pos(10));
    let mut b = backup_holding(10);
    a.link_connected(at(0));
    b.link_connected(at(0));
    let (ea, seen) = exchange(&mut a, &mut b, at(0));
    assert!(a.serving());
    assert!(!seen.iter().any(|e| matches!(e, Effect::TakeOver)));
    assert!(!ea.iter().any(|e| matches!(e, Effect::HandedOver { .. })));
}

#[test]
fn draft_s2_6_an_active_that_served_never_hands_over() {
    // The peer was unreachable past the wait: this node served. A fresher
    // backup coming back later follows it (its clients were answered from
    // this state), it does not take the service.
    let mut a = Node::<u32>::new(
        NodeConfig {
            peer_wait: Duration::from_secs(10),
            ..NodeConfig::new(
                Role::Active,
                Some(ActiveConfig::default()),
                Duration::from_secs(2),
            )
        },
        1,
        SubscriberKeying::default(),
    );
    a.set_position(pos(3));
    a.link_lost(at(0));
    assert!(!a.serving(), "waits for its peer");
    a.link_lost(at(9_999));
    assert!(!a.serving());
    a.link_lost(at(10_000));
    assert!(a.serving(), "serves what it stored once the wait is over");
    let mut b = backup_holding(10);
    a.link_connected(at(10_100));
    b.link_connected(at(10_100));
    let (_, seen) = exchange(&mut a, &mut b, at(10_100));
    assert!(a.serving());
    assert!(!seen.iter().any(|e| matches!(e, Effect::TakeOver)));
}

#[test]
fn draft_s2_6_a_later_term_outranks_a_longer_log() {
    // The backup's replica is of an older term, however far its log
    // reaches: the active's state, served in a later term, stands.
    let mut a = node(Role::Active);
    a.set_position(pos(3));
    let mut b = node(Role::Backup);
    b.resume_replica(portkeep_ha::Replica {
        term: 0,
        seq: 500,
        server_anchor: Some(T0),
        ..portkeep_ha::Replica::default()
    });
    a.link_connected(at(0));
    b.link_connected(at(0));
    let (ea, eb) = exchange(&mut a, &mut b, at(0));
    assert!(a.serving());
    assert!(!ea.iter().any(|e| matches!(e, Effect::HandedOver { .. })));
    assert!(!eb.iter().any(|e| matches!(e, Effect::TakeOver)));
}

#[test]
fn rfc6887_s8_5_a_held_reply_ages_from_when_it_was_made_not_from_its_commit() {
    let (mut a, _b) = in_sync_pair();
    a.link_lost(at(100));
    effects(&mut a);
    let host = "198.51.100.9";
    let ip: IpAddr = host.parse().unwrap();
    let sub = SubscriberKeying::default().subscriber_of(ip);
    // Handled at 0.9 s, committed (the store's fsync) at 1.2 s: held until
    // the lease ends at 2 s, 1.1 s after it was made, so it leaves made
    // again; counted from its commit (0.8 s) it would leave a whole
    // second behind what the server says when it is sent.
    let meta = a
        .prepare(
            &upsert(1, mapping(host, 80, false)),
            vec![(sub, vec![ip], Timestamp(u64::MAX))],
        )
        .made_at(at(900));
    a.handle_commit(at(1_200), vec![(10, meta)]);
    assert!(effects(&mut a).is_empty());
    let end = a.active().unwrap().lease_until().unwrap();
    a.handle_timeout(end);
    let e = effects(&mut a);
    assert!(
        matches!(
            e.as_slice(),
            [Effect::ReleaseAged {
                reply: 10,
                waited_ms: 1100
            }]
        ),
        "{e:?}"
    );
}

#[test]
fn rfc6887_s8_5_a_reply_held_a_quarter_second_leaves_made_again() {
    // Made 0.25 s before the lease ends, held until then: the wait plus
    // the network's delay could put it 2 s behind a newer reply, which a
    // client's check takes for a lost state; so it is made again.
    let (mut a, _b) = in_sync_pair();
    a.link_lost(at(100));
    effects(&mut a);
    let host = "198.51.100.9";
    let ip: IpAddr = host.parse().unwrap();
    let sub = SubscriberKeying::default().subscriber_of(ip);
    let end = a.active().unwrap().lease_until().unwrap();
    let made = Timestamp(end.0 - 250);
    let meta = a
        .prepare(
            &upsert(1, mapping(host, 80, false)),
            vec![(sub, vec![ip], Timestamp(u64::MAX))],
        )
        .made_at(made);
    a.handle_commit(made, vec![(10, meta)]);
    assert!(effects(&mut a).is_empty());
    a.handle_timeout(end);
    let e = effects(&mut a);
    assert!(
        matches!(
            e.as_slice(),
            [Effect::ReleaseAged {
                reply: 10,
                waited_ms: 250
            }]
        ),
        "{e:?}"
    );
}

/// Failure-scenarios draft section 2.6.1: the backup must never believe
/// volatile state ended while it lives, yet RFC 7767 keeps volatile
/// renewals off the backup's critical path. A renewal that only moves a
/// subscriber's end later, from one the backup has far ahead, is
/// answered at once (a takeover that misses it still comes before the old
/// end, and resets the subscriber); near that end, or for a new host, the
/// reply waits for the acknowledgement.
#[test]
fn draft_s2_6_1_a_renewal_that_extends_volatile_state_far_from_its_end_does_not_wait() {
    let (mut a, mut b) = in_sync_pair();
    let host = "198.51.100.9";
    let ip: IpAddr = host.parse().unwrap();
    let sub = SubscriberKeying::default().subscriber_of(ip);
    let marker = |until: u64| vec![(sub, vec![ip], at(until))];
    // The host's first volatile mapping, ending at 60 s: the backup must
    // hear of it first.
    let meta = a.prepare(&upsert(1, mapping(host, 80, false)), marker(60_000));
    a.handle_commit(at(1), vec![(10, meta)]);
    assert!(released(&effects(&mut a)).is_empty());
    assert_eq!(released(&pump(&mut a, &mut b, at(2))), vec![10]);
    // Renewed at 30 s to end at 90 s: the backup's 60 s is far ahead.
    let meta = a.prepare(&upsert(2, mapping(host, 80, false)), marker(90_000));
    a.handle_commit(at(30_000), vec![(11, meta)]);
    assert_eq!(released(&effects(&mut a)), vec![11], "answered at once");
    // Nor does a reply with nothing of its own wait for that extension.
    let meta = a.prepare(&upsert(3, mapping(host, 80, false)), vec![]);
    a.handle_commit(at(30_001), vec![(12, meta)]);
    assert_eq!(released(&effects(&mut a)), vec![12]);
    assert_eq!(a.stats().extensions_unawaited, 1);
    pump(&mut a, &mut b, at(30_002));
    // Renewed 1.5 s before the end the backup has (less than the
    // acknowledgement bound, one lease and a second): it waits.
    let meta = a.prepare(&upsert(4, mapping(host, 80, false)), marker(200_000));
    a.handle_commit(at(88_500), vec![(13, meta)]);
    assert!(released(&effects(&mut a)).is_empty(), "waits near the end");
    assert_eq!(released(&pump(&mut a, &mut b, at(88_501))), vec![13]);
    // A second host of the subscriber is news the backup must hear.
    let other: IpAddr = "198.51.100.10".parse().unwrap();
    let meta = a.prepare(
        &upsert(5, mapping("198.51.100.10", 80, false)),
        vec![(sub, vec![ip, other], at(300_000))],
    );
    a.handle_commit(at(100_000), vec![(14, meta)]);
    assert!(released(&effects(&mut a)).is_empty(), "a new host waits");
    assert_eq!(released(&pump(&mut a, &mut b, at(100_001))), vec![14]);
    // After the link was lost and came back, nothing is taken for known.
    a.link_lost(at(100_002));
    b.link_lost(at(100_002));
    a.link_connected(at(100_003));
    b.link_connected(at(100_003));
    pump(&mut a, &mut b, at(100_003));
    let meta = a.prepare(
        &upsert(6, mapping(host, 80, false)),
        vec![(sub, vec![ip, other], at(400_000))],
    );
    a.handle_commit(at(100_010), vec![(15, meta)]);
    assert!(
        released(&effects(&mut a)).is_empty(),
        "waits after a reconnection"
    );
    assert_eq!(released(&pump(&mut a, &mut b, at(100_011))), vec![15]);
    assert_eq!(a.stats().extensions_unawaited, 1);
}

/// RFC 6887 section 8.5 (a client that believes in a mapping the server
/// lost can never learn of it): a reply made before an operator cleared
/// mappings is restamped at its release however short its wait, so
/// `Server::restamp` can drop one whose mapping the clear took (seed
/// 90583: released 24 ms after it was made, 3 ms after the clear); a
/// reply made after the clear leaves as it is.
#[test]
fn rfc6887_s8_5_replies_made_before_a_clear_are_restamped_at_release() {
    let (mut a, mut b) = in_sync_pair();
    let meta = a
        .prepare(&upsert(1, mapping("198.51.100.1", 80, true)), vec![])
        .made_at(at(10));
    a.handle_commit(at(11), vec![(10, meta)]);
    a.cleared(at(12));
    let e = pump(&mut a, &mut b, at(13));
    assert!(
        e.iter().any(|e| matches!(
            e,
            Effect::ReleaseAged {
                reply: 10,
                waited_ms: 3
            }
        )),
        "held across the clear: restamped, {e:?}"
    );
    // Committed after the clear, but made before it: restamped too.
    let meta = a
        .prepare(&upsert(2, mapping("198.51.100.1", 81, false)), vec![])
        .made_at(at(12));
    a.handle_commit(at(14), vec![(11, meta)]);
    let e = effects(&mut a);
    assert!(
        matches!(e.as_slice(), [Effect::ReleaseAged { reply: 11, .. }]),
        "{e:?}"
    );
    // Made after it: as it is.
    let meta = a
        .prepare(&upsert(3, mapping("198.51.100.1", 82, false)), vec![])
        .made_at(at(15));
    a.handle_commit(at(16), vec![(12, meta)]);
    assert_eq!(released(&effects(&mut a)), vec![12]);
}

/// A held port (RFC 6887 section 15) reaches the backup, so a node that
/// takes over does not hand it to another client early; the reply to the
/// delete that made it does not wait for it.
#[test]
fn rfc6887_s15_a_port_hold_travels_to_the_backup_and_survives_a_takeover() {
    let (mut a, mut b) = in_sync_pair();
    let m = mapping("198.51.100.1", 80, false);
    let hold = portkeep_server::PortHold {
        owner: m.key,
        nonce: m.nonce,
        external: m.external,
        until: at(120_000),
    };
    let changes = vec![
        ChangeRecord {
            started: false,
            seq: 1,
            change: Change::Removed {
                mapping: m,
                reason: portkeep_server::RemoveReason::Deleted,
            },
        },
        ChangeRecord {
            started: false,
            seq: 2,
            change: Change::PortHeld(hold),
        },
    ];
    let meta = a.prepare(&changes, vec![]);
    a.handle_commit(at(1), vec![(10, meta)]);
    assert_eq!(
        released(&effects(&mut a)),
        vec![10],
        "a hold is not waited for"
    );
    pump(&mut a, &mut b, at(2));
    b.link_lost(at(3));
    let t = b.promote(at(4)).unwrap();
    assert_eq!(t.kind, TakeoverKind::Hot);
    assert_eq!(t.state.holds, vec![hold], "same clock here: unchanged");
    // One whose end passed before the takeover is not carried over.
    let (mut a, mut b) = in_sync_pair();
    let short = portkeep_server::PortHold {
        until: at(3),
        ..hold
    };
    let meta = a.prepare(
        &[ChangeRecord {
            started: false,
            seq: 1,
            change: Change::PortHeld(short),
        }],
        vec![],
    );
    a.handle_commit(at(1), vec![(11, meta)]);
    pump(&mut a, &mut b, at(2));
    b.link_lost(at(3));
    assert!(b.promote(at(4)).unwrap().state.holds.is_empty());
}
