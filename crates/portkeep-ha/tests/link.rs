//! The replication link's two ends, connected by hand in memory with
//! made-up time: resync, acknowledgement, the bound on waiting, fencing and
//! takeover (RFC 7767 sections 1 and 3.2; failure-scenarios draft 2.6).

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portkeep_ha::wire::items_of;
use portkeep_ha::{
    Active, ActiveConfig, ActiveEvent, Backup, Item, LinkState, Message, Replica, TakeoverKind,
};
use portkeep_proto::Protocol;
use portkeep_server::{
    Change, ChangeRecord, MappingKey, MappingKind, MappingRecord, RemoveReason, RequesterState,
    SubscriberKeying, Timestamp,
};
use proptest::prelude::*;

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// The lease `ActiveConfig::default()` grants.
const LEASE: Duration = Duration::from_millis(1500);

fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

fn mapping(host: &str, port: u16, checkpoint: bool) -> MappingRecord {
    let ip: IpAddr = host.parse().unwrap();
    MappingRecord {
        kind: MappingKind::Map,
        key: MappingKey {
            internal_ip: ip,
            protocol: Protocol::TCP,
            internal_port: port,
        },
        external: SocketAddr::new("192.0.2.1".parse().unwrap(), 20000 + port),
        nonce: [port as u8; 12],
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

/// Delivers bytes to the backup and reports everything it applied as
/// persisted at once (a backup acknowledges only what is persisted).
fn feed(b: &mut Backup, now: Timestamp, bytes: &[u8]) -> Result<(), portkeep_ha::FrameError> {
    let r = b.handle_input(now, bytes);
    if let Some(seq) = b.take_unpersisted().iter().map(|(s, _)| *s).max() {
        b.persisted(seq);
    }
    r
}

/// What an active serving from log position `seq` vouches for.
fn seq_pos(seq: u64) -> portkeep_ha::Position {
    portkeep_ha::Position { term: 0, seq }
}

fn events(a: &mut Active) -> Vec<ActiveEvent> {
    std::iter::from_fn(|| a.poll_event()).collect()
}

/// Moves every pending byte both ways until quiet.
fn pump(a: &mut Active, b: &mut Backup, now: Timestamp) {
    loop {
        let mut moved = false;
        if let Some(bytes) = a.poll_transmit() {
            feed(b, now, &bytes).unwrap();
            moved = true;
        }
        if let Some(bytes) = b.poll_transmit() {
            a.handle_input(now, &bytes).unwrap();
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn linked(term: u64) -> (Active, Backup) {
    let k = SubscriberKeying::default();
    let mut a = Active::new(term, ActiveConfig::default(), k.clone());
    let mut b = Backup::new(term, k);
    a.connected(at(0), seq_pos(10), false);
    b.connected(at(0));
    pump(&mut a, &mut b, at(0));
    (a, b)
}

fn snapshot_items() -> Vec<Item> {
    vec![
        Item::ServerEpoch { anchor: T0 },
        Item::Upsert(mapping("198.51.100.1", 80, true)),
        Item::Upsert(mapping("198.51.100.2", 443, true)),
        Item::Volatile {
            subscriber: SubscriberKeying::default().subscriber_of("198.51.100.2".parse().unwrap()),
            hosts: vec!["198.51.100.2".parse().unwrap()],
            until: FAR,
        },
    ]
}

/// An end of volatile state beyond every takeover in these tests.
const FAR: Timestamp = Timestamp(u64::MAX / 2);

#[test]
fn rfc7767_s3_2_resync_then_in_sync() {
    let (mut a, mut b) = linked(3);
    assert_eq!(a.state(), LinkState::NeedSnapshot);
    assert_eq!(events(&mut a), vec![ActiveEvent::NeedSnapshot]);
    assert!(
        !a.in_sync(),
        "no check-point honoured before the snapshot is acknowledged"
    );
    assert!(
        !a.push(at(1), 11, vec![]),
        "nothing streams before the snapshot"
    );
    a.send_snapshot(at(1), 10, snapshot_items());
    assert!(!a.in_sync());
    pump(&mut a, &mut b, at(2));
    assert!(a.in_sync());
    assert_eq!(
        events(&mut a),
        vec![ActiveEvent::Acked(10), ActiveEvent::InSync]
    );
    assert!(b.in_sync());
    assert_eq!(b.mapping_count(), 2);
    assert_eq!(b.applied(), 10);
}

#[test]
fn rfc7767_s3_2_one_acknowledgement_covers_many_changes() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    events(&mut a);
    for (seq, port) in [(11, 81), (12, 82), (13, 83)] {
        let c = ChangeRecord {
            started: false,
            seq,
            change: Change::Upserted(mapping("198.51.100.1", port, true)),
        };
        assert!(a.push(at(2), seq, items_of(&[c])));
    }
    // The backup processes all three; only its last acknowledgement is
    // delivered (the others are still in flight, or coalesced).
    let bytes = a.poll_transmit().unwrap();
    feed(&mut b, at(2), &bytes).unwrap();
    let acks = b.poll_transmit().unwrap();
    let mut buf = acks.clone();
    let mut last = None;
    while let Some(m) = Message::decode(&mut buf, &SubscriberKeying::default()).unwrap() {
        last = Some(m);
    }
    let mut only_last = Vec::new();
    last.unwrap().encode(&mut only_last);
    a.handle_input(at(3), &only_last).unwrap();
    assert_eq!(
        events(&mut a),
        vec![ActiveEvent::Acked(13)],
        "releases 11, 12 and 13 at once"
    );
    assert_eq!(a.acked(), 13);
    assert_eq!(b.mapping_count(), 5);
}

/// What a backup acknowledges it has handed out to be stored first: the
/// writes, applied in order to a stored replica, give exactly the state it
/// holds; a backup restarted from them can vouch for every acknowledged
/// check-point, but for no epoch (failure-scenarios draft section 2.6).
#[test]
fn rfc7767_s3_2_the_stored_replica_holds_everything_acknowledged() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    let mut stored = Replica::default();
    let step = |a: &mut Active, b: &mut Backup, stored: &mut Replica, now| loop {
        let mut moved = false;
        if let Some(bytes) = a.poll_transmit() {
            b.handle_input(now, &bytes).unwrap();
            for (seq, w) in b.take_unpersisted() {
                stored.apply(w);
                b.persisted(seq);
            }
            moved = true;
        }
        if let Some(bytes) = b.poll_transmit() {
            a.handle_input(now, &bytes).unwrap();
            moved = true;
        }
        if !moved {
            return;
        }
    };
    step(&mut a, &mut b, &mut stored, at(1));
    let gone = mapping("198.51.100.2", 443, true);
    let changes = [
        ChangeRecord {
            started: false,
            seq: 11,
            change: Change::Upserted(mapping("198.51.100.3", 22, true)),
        },
        ChangeRecord {
            started: false,
            seq: 12,
            change: Change::Removed {
                mapping: gone.clone(),
                reason: RemoveReason::Deleted,
            },
        },
    ];
    for c in changes {
        let seq = c.seq;
        assert!(a.push(at(2), seq, items_of(&[c])));
        step(&mut a, &mut b, &mut stored, at(2));
    }
    assert_eq!(a.acked(), 12);
    assert_eq!(stored, b.replica(), "the writes add up to the replica");
    assert_eq!(stored.seq, 12);
    let resumed = Backup::resume(3, SubscriberKeying::default(), stored);
    assert_eq!(resumed.applied(), 12);
    assert!(!resumed.in_sync(), "no connection delivered a snapshot yet");
    let t = resumed.promote(at(3));
    assert_eq!(t.kind, TakeoverKind::Stale, "no lease survives a restart");
    assert_eq!(t.term, 4);
    let mut ports: Vec<u16> = t
        .state
        .mappings
        .iter()
        .map(|m| m.key.internal_port)
        .collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        vec![22, 80],
        "what was acknowledged, less the removal"
    );
    assert!(t.state.subscriber_anchors.is_empty(), "every epoch resets");
    assert_eq!(t.state.anchor, at(3));
    let mut hosts: Vec<String> = t
        .reset
        .iter()
        .flat_map(|(_, h)| h.iter().map(ToString::to_string))
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        vec!["198.51.100.1", "198.51.100.2", "198.51.100.3"],
        "every host the replica knows of is told, volatile ones included"
    );
}

fn change(seq: u64, port: u16, remove: bool) -> Vec<Item> {
    let m = mapping("198.51.100.3", port, true);
    items_of(&[ChangeRecord {
        started: false,
        seq,
        change: if remove {
            Change::Removed {
                mapping: m,
                reason: RemoveReason::Deleted,
            }
        } else {
            Change::Upserted(m)
        },
    }])
}

/// A backup whose link failed, or which restarted from its stored
/// replica, catches up from its position: the changes it missed, not a
/// whole snapshot, and ends with the state a snapshot would have given.
#[test]
fn rfc7767_s3_2_a_reconnecting_backup_resumes_from_its_position() {
    for restarted in [false, true] {
        let (mut a, mut b) = linked(3);
        a.send_snapshot(at(1), 10, snapshot_items());
        pump(&mut a, &mut b, at(1));
        assert!(a.push(at(2), 11, change(11, 22, false)));
        pump(&mut a, &mut b, at(2));
        assert_eq!(a.acked(), 11);
        let stored = b.replica();
        a.disconnected();
        b.disconnected(at(3));
        // Committed while the backup is away: kept, not sent.
        assert!(!a.push(at(4), 12, change(12, 23, false)));
        assert!(!a.push(at(4), 13, change(13, 22, true)));
        if restarted {
            b = Backup::resume(3, SubscriberKeying::default(), stored.clone());
        }
        events(&mut a);
        a.connected(at(5), seq_pos(13), false);
        b.connected(at(5));
        pump(&mut a, &mut b, at(5));
        let ev = events(&mut a);
        assert!(!ev.contains(&ActiveEvent::NeedSnapshot), "{ev:?}");
        assert!(ev.contains(&ActiveEvent::InSync), "{ev:?}");
        assert_eq!(a.resumes(), 1);
        assert_eq!(b.applied(), 13);
        assert!(b.in_sync());
        // The same as a backup synced from scratch at 13.
        let mut expect = stored.clone();
        expect.apply(portkeep_ha::ReplicaWrite::Apply {
            seq: 13,
            offset_ms: b.replica().offset_ms,
            items: [change(12, 23, false), change(13, 22, true)].concat(),
        });
        assert_eq!(b.replica(), expect, "restarted: {restarted}");
    }
}

/// A backup further behind than the changes kept, in another term, or
/// holding nothing, takes a snapshot.
#[test]
fn rfc7767_s3_2_a_backup_beyond_what_was_kept_takes_a_snapshot() {
    let k = SubscriberKeying::default();
    let cfg = ActiveConfig {
        resume_items: 2,
        ..ActiveConfig::default()
    };
    let mut a = Active::new(3, cfg, k.clone());
    let mut b = Backup::new(3, k.clone());
    a.connected(at(0), seq_pos(10), false);
    b.connected(at(0));
    pump(&mut a, &mut b, at(0));
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    a.disconnected();
    b.disconnected(at(2));
    for seq in 11..=13 {
        a.push(at(3), seq, change(seq, seq as u16, false));
    }
    events(&mut a);
    a.connected(at(4), seq_pos(13), false);
    b.connected(at(4));
    pump(&mut a, &mut b, at(4));
    assert!(events(&mut a).contains(&ActiveEvent::NeedSnapshot));
    assert_eq!(a.resumes(), 0);
    // A backup whose replica is of another term holds another node's
    // history, even when the backup itself heard of this term (it
    // restarted before its snapshot of this term completed).
    let mut a = Active::new(4, ActiveConfig::default(), k.clone());
    a.connected(at(0), seq_pos(10), false);
    let mut other = Backup::new(4, k.clone());
    other.connected(at(0));
    pump(&mut a, &mut other, at(0));
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut other, at(1));
    a.disconnected();
    let mut of_term_3 = other.replica();
    assert_eq!(of_term_3.term, 4);
    of_term_3.term = 3;
    let mut old = Backup::resume(4, k, of_term_3);
    events(&mut a);
    a.connected(at(2), seq_pos(10), false);
    old.connected(at(2));
    pump(&mut a, &mut old, at(2));
    assert!(events(&mut a).contains(&ActiveEvent::NeedSnapshot));
    assert_eq!(a.resumes(), 0);
}

#[test]
fn rfc7767_s3_2_changes_travel_as_upserts_and_removals() {
    let up = |c| ChangeRecord {
        started: false,
        seq: 1,
        change: Change::Upserted(mapping("198.51.100.1", 80, c)),
    };
    assert!(matches!(&items_of(&[up(true)])[..], [Item::Upsert(m)] if m.checkpoint));
    // A renewal without the option clears the flag; the record travels as
    // it is (the active sends it only for a mapping the backup follows).
    assert!(matches!(&items_of(&[up(false)])[..], [Item::Upsert(m)] if !m.checkpoint));
    let gone = ChangeRecord {
        started: false,
        seq: 2,
        change: Change::Removed {
            mapping: mapping("198.51.100.1", 80, true),
            reason: RemoveReason::Expired,
        },
    };
    assert!(matches!(items_of(&[gone])[..], [Item::Remove(_)]));
}

#[test]
fn rfc7767_s3_2_overdue_acknowledgement_stops_honouring_until_caught_up() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    events(&mut a);
    a.push(at(10), 11, vec![]);
    let held = a.poll_transmit().unwrap();
    a.handle_timeout(at(10 + 199));
    assert!(a.in_sync(), "within the bound");
    a.handle_timeout(at(10 + 200));
    assert_eq!(a.state(), LinkState::Lagging);
    assert!(events(&mut a).contains(&ActiveEvent::OutOfSync("acknowledgement overdue")));
    assert!(!a.in_sync());
    // The backup catches up: check-pointing resumes.
    feed(&mut b, at(300), &held).unwrap();
    pump(&mut a, &mut b, at(300));
    assert!(a.in_sync());
    assert_eq!(events(&mut a).last(), Some(&ActiveEvent::InSync));
}

#[test]
fn rfc7767_s3_2_silent_backup_is_out_of_sync() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    events(&mut a);
    let mut t = 1;
    while a.state() != LinkState::Disconnected {
        t += 50;
        a.handle_timeout(at(t));
        let _ = a.poll_transmit(); // heartbeats go nowhere
        assert!(t < 5_000);
    }
    assert!(t >= 1_000, "declared dead only after dead_after: {t}");
    assert!(events(&mut a).contains(&ActiveEvent::OutOfSync("backup silent")));
}

#[test]
fn design_fencing_higher_term_stops_the_active() {
    // The backup was promoted meanwhile (term 4); the old active (term 3)
    // comes back and connects: it must learn it is deposed.
    let k = SubscriberKeying::default();
    let mut old = Active::new(3, ActiveConfig::default(), k.clone());
    let mut newer = Backup::new(4, k);
    old.connected(at(0), seq_pos(0), false);
    newer.connected(at(0));
    pump(&mut old, &mut newer, at(0));
    assert_eq!(old.state(), LinkState::Fenced { term: 4 });
    assert!(events(&mut old).contains(&ActiveEvent::Fenced(4)));
    assert!(!old.push(
        at(1),
        99,
        vec![Item::Upsert(mapping("198.51.100.1", 1, true))]
    ));
    assert_eq!(
        newer.mapping_count(),
        0,
        "nothing injected by a stale active"
    );
}

#[test]
fn design_fencing_stale_stream_is_refused() {
    let k = SubscriberKeying::default();
    let mut b = Backup::new(5, k.clone());
    b.connected(at(0));
    let _ = b.poll_transmit();
    let mut stale = Vec::new();
    Message::SnapshotBegin { term: 4, seq: 1 }.encode(&mut stale);
    Message::SnapshotPart {
        term: 4,
        items: vec![Item::Upsert(mapping("198.51.100.1", 1, true))],
    }
    .encode(&mut stale);
    Message::SnapshotEnd { term: 4, seq: 1 }.encode(&mut stale);
    feed(&mut b, at(0), &stale).unwrap();
    assert!(!b.in_sync());
    assert_eq!(b.mapping_count(), 0);
    let mut reply = b.poll_transmit().unwrap();
    let m = Message::decode(&mut reply, &k).unwrap().unwrap();
    assert_eq!(m.term(), 5, "the stale sender is told the current term");
}

#[test]
fn draft_s2_6_takeover_keeps_checkpointed_epochs_and_resets_volatile_subscribers() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    // Within the lease the active granted with its acknowledgement.
    let t = b.promote(at(1_000));
    assert_eq!(t.term, 4);
    assert!(t.was_in_sync);
    assert_eq!(t.state.anchor, T0, "the anchor travelled: epochs continue");
    assert_eq!(t.state.mappings.len(), 2);
    let k = SubscriberKeying::default();
    let sub2 = k.subscriber_of("198.51.100.2".parse().unwrap());
    let sub1 = k.subscriber_of("198.51.100.1".parse().unwrap());
    assert_eq!(
        t.state.subscriber_anchors,
        vec![(sub2, at(1_000))],
        "only the volatile one resets"
    );
    assert!(!t.state.subscriber_anchors.iter().any(|(s, _)| *s == sub1));
    assert_eq!(
        t.reset,
        vec![(sub2, vec!["198.51.100.2".parse::<IpAddr>().unwrap()])]
    );
}

/// A node that took over after a loss owes the hosts it told an ANNOUNCE
/// for as long as their clients may still be repairing: a host with
/// neither a mapping nor volatile state left (everything it had was lost)
/// is known to the next node only through this record.
fn owed_items(until: Timestamp) -> Vec<Item> {
    let mut items = snapshot_items();
    items.push(Item::AnnounceOwed {
        subscriber: SubscriberKeying::default().subscriber_of("198.51.100.7".parse().unwrap()),
        hosts: vec!["198.51.100.7".parse().unwrap()],
        until,
    });
    items
}

#[test]
fn rfc6887_s14_1_3_a_stale_takeover_announces_to_hosts_owed_one() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, owed_items(at(600_000)));
    pump(&mut a, &mut b, at(1));
    b.disconnected(at(2));
    let t = b.promote(at(1) + LEASE);
    assert_eq!(t.kind, portkeep_ha::TakeoverKind::Stale);
    let owed: IpAddr = "198.51.100.7".parse().unwrap();
    let targets = t.announce_targets(&[]);
    assert!(targets.iter().any(|(_, h)| *h == owed), "{targets:?}");
    assert!(
        t.state.owed.iter().any(|(_, h, _)| h.contains(&owed)),
        "still owed by the new active, for its own backup"
    );
}

#[test]
fn rfc6887_s14_1_3_a_hot_takeover_announces_to_hosts_owed_one_without_a_reset() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, owed_items(at(600_000)));
    pump(&mut a, &mut b, at(1));
    let t = b.promote(at(1_000));
    assert_eq!(t.kind, portkeep_ha::TakeoverKind::Hot);
    let owed: IpAddr = "198.51.100.7".parse().unwrap();
    let sub7 = SubscriberKeying::default().subscriber_of(owed);
    assert!(t.announce_targets(&[]).contains(&(sub7, owed)));
    assert!(
        !t.reset.iter().any(|(s, _)| *s == sub7),
        "its epoch continues: it lost nothing in this takeover"
    );
    assert!(!t.state.subscriber_anchors.iter().any(|(s, _)| *s == sub7));
}

#[test]
fn rfc6887_s14_1_3_an_owed_announce_lapses() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, owed_items(at(500)));
    pump(&mut a, &mut b, at(1));
    let t = b.promote(at(1_000));
    let owed: IpAddr = "198.51.100.7".parse().unwrap();
    assert!(!t.announce_targets(&[]).iter().any(|(_, h)| *h == owed));
    assert!(t.state.owed.is_empty());
}

#[test]
fn draft_s2_6_cold_standby_resets_every_epoch() {
    let (mut a, b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    // The snapshot never arrived.
    let t = b.promote(at(9_000));
    assert!(!t.was_in_sync);
    assert_eq!(t.state.anchor, at(9_000));
    assert!(t.state.mappings.is_empty());
    assert!(t.state.subscriber_anchors.is_empty());
}

#[test]
fn frames_round_trip_and_reassemble_across_reads() {
    let k = SubscriberKeying::default();
    let msgs = vec![
        Message::Hello {
            term: 7,
            active: true,
            applied: 42,
            now: at(1),
            version: portkeep_ha::wire::LINK_VERSION,
            holds: portkeep_ha::Position::default(),
        },
        Message::SnapshotBegin { term: 7, seq: 42 },
        Message::SnapshotPart {
            term: 7,
            items: snapshot_items(),
        },
        Message::SnapshotEnd { term: 7, seq: 42 },
        Message::Changes {
            term: 7,
            seq: 43,
            items: vec![
                Item::Remove(vec![1, 2, 3]),
                Item::Epoch {
                    subscriber: k.subscriber_of("2001:db8::1".parse().unwrap()),
                    anchor: at(5),
                },
                Item::AnnounceOwed {
                    subscriber: k.subscriber_of("198.51.100.9".parse().unwrap()),
                    hosts: vec![
                        "198.51.100.9".parse().unwrap(),
                        "2001:db8::9".parse().unwrap(),
                    ],
                    until: at(86_400_000),
                },
                Item::Upsert(managed("10.2.0.1", 81, "10.1.0.1")),
                Item::Requester {
                    ip: "10.1.0.1".parse().unwrap(),
                    state: Some(RequesterState {
                        port: 41_000,
                        anchor: Some(at(9)),
                        volatile_until: Some(at(99)),
                    }),
                },
                Item::Requester {
                    ip: "2001:db8::77".parse().unwrap(),
                    state: None,
                },
            ],
        },
        Message::Ack {
            term: 7,
            seq: 43,
            now: at(3),
        },
        Message::Lease {
            term: 7,
            since: at(3),
            for_ms: 1500,
        },
        Message::Heartbeat {
            term: 7,
            now: at(2),
        },
    ];
    let mut bytes = Vec::new();
    for m in &msgs {
        m.encode(&mut bytes);
    }
    // Delivered one octet at a time.
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for b in bytes {
        buf.push(b);
        while let Some(m) = Message::decode(&mut buf, &k).unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    let mut huge = (portkeep_ha::wire::MAX_FRAME as u32 + 1)
        .to_be_bytes()
        .to_vec();
    assert!(
        Message::decode(&mut huge, &k).is_err(),
        "oversized frames are refused"
    );
}

proptest! {
    #[test]
    fn frames_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let k = SubscriberKeying::default();
        let mut buf = bytes;
        while let Ok(Some(_)) = Message::decode(&mut buf, &k) {}
        let mut b = Backup::new(1, k.clone());
        let _ = b.handle_input(at(0), &buf);
        let mut a = Active::new(1, ActiveConfig::default(), k);
        a.connected(at(0), seq_pos(0), false);
        let _ = a.handle_input(at(0), &buf);
    }
}

#[test]
fn link_timeouts_are_scheduled() {
    let (a, _b) = linked(1);
    let t = a.poll_timeout().unwrap();
    assert!(t <= at(0) + Duration::from_millis(100));
}

/// Like [`pump`], but the backup's clock runs `skew_ms` behind the
/// active's.
fn pump_skewed(a: &mut Active, b: &mut Backup, now: Timestamp, skew_ms: u64) {
    let theirs = Timestamp(now.0 - skew_ms);
    loop {
        let mut moved = false;
        if let Some(bytes) = a.poll_transmit() {
            feed(b, theirs, &bytes).unwrap();
            moved = true;
        }
        if let Some(bytes) = b.poll_transmit() {
            a.handle_input(now, &bytes).unwrap();
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn draft_s2_6_takeover_translates_anchors_into_the_backups_clock() {
    // The backup's clock is 40 s behind the active's. Epochs must continue
    // as the clients saw them, and expiry times must not move.
    let skew = 40_000;
    let k = SubscriberKeying::default();
    let mut a = Active::new(3, ActiveConfig::default(), k.clone());
    let mut b = Backup::new(3, k);
    a.connected(at(0), seq_pos(0), false);
    b.connected(Timestamp(at(0).0 - skew));
    pump_skewed(&mut a, &mut b, at(0), skew);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump_skewed(&mut a, &mut b, at(1), skew);
    assert_eq!(b.clock_offset_ms(), skew as i64);
    // Promoted 1.2 s later in the backup's own clock (within the lease,
    // which the backup counts in its own clock too).
    let now_backup = Timestamp(at(1_200).0 - skew);
    let t = b.promote(now_backup);
    assert_eq!(t.kind, portkeep_ha::TakeoverKind::Hot);
    // The server-wide epoch the clients see: (now - anchor) in each
    // node's own clock is the same.
    let epoch_before = at(1_200).secs_since(T0);
    assert_eq!(now_backup.secs_since(t.state.anchor), epoch_before);
    for m in &t.state.mappings {
        assert_eq!(m.expires.0, at(3_600_000).0 - skew, "expiry in our clock");
    }
}

#[test]
fn draft_s2_6_promotion_after_the_lease_ends_resets_every_epoch() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    b.disconnected(at(2));
    // Promoted within the lease: the active released nothing the backup
    // had not acknowledged, whether it died or only the link did.
    let hot = {
        let (mut a2, mut b2) = linked(3);
        a2.send_snapshot(at(1), 10, snapshot_items());
        pump(&mut a2, &mut b2, at(1));
        b2.disconnected(at(2));
        b2.promote(at(1) + (LEASE - Duration::from_millis(100)))
    };
    assert_eq!(hot.kind, portkeep_ha::TakeoverKind::Hot);
    // Promoted after it: the active may have lived on without us.
    let t = b.promote(at(1) + LEASE);
    assert_eq!(t.kind, portkeep_ha::TakeoverKind::Stale);
    assert_eq!(
        t.state.mappings.len(),
        2,
        "acknowledged check-points survive"
    );
    assert_eq!(t.state.anchor, at(1) + LEASE, "every epoch restarts");
    assert!(t.state.subscriber_anchors.is_empty());
    let hosts: Vec<IpAddr> = t.reset.iter().flat_map(|(_, h)| h.clone()).collect();
    assert!(
        hosts.contains(&"198.51.100.1".parse().unwrap()),
        "{hosts:?}"
    );
    assert!(
        hosts.contains(&"198.51.100.2".parse().unwrap()),
        "{hosts:?}"
    );
}

#[test]
fn draft_s2_6_the_backups_lease_never_outlasts_the_actives_promise() {
    // A slow link: the acknowledgement the backup sends at 100 ms reaches
    // the active at 900 ms, and the lease in answer reaches the backup at
    // 1,700 ms. The active promised until 900 + 1,500; the backup counts
    // from when it sent the acknowledgement, so its lease ends first.
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    let snap = a.poll_transmit().unwrap();
    feed(&mut b, at(100), &snap).unwrap();
    let ack = b.poll_transmit().unwrap();
    a.handle_input(at(900), &ack).unwrap();
    assert!(a.in_sync());
    let lease = a.poll_transmit().unwrap();
    feed(&mut b, at(1_700), &lease).unwrap();
    let promised = a.lease_until().unwrap();
    let held = b.lease_until().unwrap();
    assert_eq!(promised, at(900) + LEASE);
    assert!(held <= at(100) + LEASE, "{held:?}");
    assert!(held < promised);
    // Nothing extends it on the backup but a grant: a backup that hears
    // nothing more takes over stale once it ends, however long the link
    // took to fail.
    let t = b.promote(held);
    assert_eq!(t.kind, portkeep_ha::TakeoverKind::Stale);
}

/// A backup that is alive but acknowledges nothing (its disk stalled)
/// earns no lease: replies that wait for it are held at most one lease
/// past the last acknowledgement, never as long as it keeps answering
/// heartbeats.
#[test]
fn draft_s2_6_heartbeats_without_acknowledgements_earn_no_lease() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    assert!(a.in_sync());
    let c = ChangeRecord {
        started: false,
        seq: 11,
        change: Change::Upserted(mapping("198.51.100.1", 81, true)),
    };
    assert!(a.push(at(2), 11, items_of(&[c])));
    let last_grant = a.lease_until().unwrap();
    // The backup applies it and never persists it; the two ends go on
    // exchanging heartbeats for ten seconds.
    let mut now = 2;
    while now < 10_000 {
        now += 50;
        a.handle_timeout(at(now));
        if let Some(bytes) = a.poll_transmit() {
            b.handle_input(at(now), &bytes).unwrap();
            b.take_unpersisted();
        }
        if let Some(bytes) = b.poll_transmit() {
            a.handle_input(at(now), &bytes).unwrap();
        }
    }
    assert_eq!(a.state(), LinkState::Lagging);
    assert_eq!(
        a.lease_until(),
        Some(last_grant),
        "a lagging backup's heartbeats extended the lease"
    );
    assert!(!a.lease_holds(at(now)));
}

#[test]
fn draft_s2_6_a_lease_counts_only_for_a_synced_replica() {
    // A grant that reaches a backup mid-resync is ignored: what it holds
    // is not current.
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    assert!(b.lease_until().is_some());
    let before = b.lease_until();
    a.disconnected();
    b.disconnected(at(5));
    // The active restarted: it kept no changes to resume the backup from,
    // so the backup resyncs.
    a = Active::new(3, ActiveConfig::default(), SubscriberKeying::default());
    a.connected(at(6), seq_pos(10), false);
    b.connected(at(6));
    pump(&mut a, &mut b, at(6));
    let mut lease = Vec::new();
    Message::Lease {
        term: 3,
        since: at(6),
        for_ms: 60_000,
    }
    .encode(&mut lease);
    feed(&mut b, at(7), &lease).unwrap();
    assert_eq!(b.lease_until(), before);
}

#[test]
fn draft_s2_6_promotion_mid_resync_keeps_acknowledged_checkpoints() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    // The link drops and comes back; the new snapshot is cut short.
    a.disconnected();
    b.disconnected(at(5));
    // The active restarted: it kept no changes to resume the backup from,
    // so the backup resyncs.
    a = Active::new(3, ActiveConfig::default(), SubscriberKeying::default());
    a.connected(at(6), seq_pos(10), false);
    b.connected(at(6));
    pump(&mut a, &mut b, at(6));
    a.send_snapshot(at(7), 20, snapshot_items());
    let mut partial = a.poll_transmit().unwrap();
    partial.truncate(partial.len() / 2);
    feed(&mut b, at(7), &partial).unwrap();
    assert!(b.staging_count().is_some(), "resync in progress");
    let t = b.promote(at(8));
    assert_eq!(t.kind, portkeep_ha::TakeoverKind::Stale);
    assert_eq!(t.state.mappings.len(), 2);
}

#[test]
fn rfc7767_s1_resync_of_an_empty_log_completes() {
    // A fresh active (log position 0) syncs a fresh backup.
    let (mut a, mut b) = linked(1);
    a.send_snapshot(at(1), 0, vec![Item::ServerEpoch { anchor: T0 }]);
    pump(&mut a, &mut b, at(1));
    assert!(a.in_sync());
    assert!(events(&mut a).contains(&ActiveEvent::InSync));
    assert!(b.in_sync());
}

#[test]
fn rfc7767_s1_a_long_snapshot_keeps_the_link_alive() {
    // 20,000 items take 40 parts: the backup must be heard from while they
    // arrive, or the active would declare it dead mid-resync.
    let (mut a, mut b) = linked(2);
    let items: Vec<Item> = (0..20_000u32)
        .map(|i| Item::Upsert(mapping("198.51.100.1", (i % 60_000) as u16, true)))
        .collect();
    a.send_snapshot(at(1), 5, items);
    let bytes = a.poll_transmit().unwrap();
    // Deliver half, 2 s later (past dead_after): the backup has spoken.
    feed(&mut b, at(2_000), &bytes[..bytes.len() / 2]).unwrap();
    let heard = b.poll_transmit().expect("heartbeats during the snapshot");
    a.handle_input(at(2_000), &heard).unwrap();
    a.handle_timeout(at(2_500));
    assert!(
        matches!(a.state(), LinkState::Resyncing { .. }),
        "{:?}",
        a.state()
    );
    feed(&mut b, at(2_600), &bytes[bytes.len() / 2..]).unwrap();
    pump(&mut a, &mut b, at(2_600));
    assert!(a.in_sync());
}

/// A lagging link's overdue acknowledgement does not keep asking for the
/// timer: the next deadline is a heartbeat or the silence bound, never one
/// already past (a driver would otherwise spin).
#[test]
fn rfc7767_s3_2_lagging_link_schedules_no_deadline_in_the_past() {
    let (mut a, mut b) = linked(1);
    a.send_snapshot(at(0), 0, snapshot_items());
    pump(&mut a, &mut b, at(0));
    assert!(a.in_sync());
    assert!(a.push(
        at(1),
        1,
        vec![Item::Upsert(mapping("198.51.100.9", 80, true))]
    ));
    let _ = a.poll_transmit(); // never reaches the backup
    let late = at(1) + ActiveConfig::default().ack_timeout;
    a.handle_timeout(late);
    assert_eq!(a.state(), LinkState::Lagging);
    let next = a.poll_timeout().unwrap();
    assert!(next > late, "deadline {next:?} is not after {late:?}");
}

#[test]
fn link_version_1_hello_is_read_and_later_fields_are_ignored() {
    let k = SubscriberKeying::default();
    // A version 1 Hello: type, term, active, applied, now.
    let mut body = vec![1u8];
    body.extend_from_slice(&7u64.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&42u64.to_be_bytes());
    body.extend_from_slice(&5u64.to_be_bytes());
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    let m = Message::decode(&mut frame(&body), &k).unwrap().unwrap();
    assert_eq!(
        m,
        Message::Hello {
            term: 7,
            active: false,
            applied: 42,
            now: Timestamp(5),
            version: 1,
            holds: portkeep_ha::Position { term: 7, seq: 42 },
        }
    );
    // A later version's Hello: its version and holds are read, fields
    // this release does not know are skipped.
    body.extend_from_slice(&3u16.to_be_bytes());
    body.extend_from_slice(&6u64.to_be_bytes());
    body.extend_from_slice(&40u64.to_be_bytes());
    body.extend_from_slice(&[9; 11]);
    let m = Message::decode(&mut frame(&body), &k).unwrap().unwrap();
    assert!(matches!(
        m,
        Message::Hello {
            version: 3,
            holds: portkeep_ha::Position { term: 6, seq: 40 },
            ..
        }
    ));
    let mut out = Vec::new();
    Message::Handover { term: 7 }.encode(&mut out);
    assert_eq!(
        Message::decode(&mut out, &k).unwrap(),
        Some(Message::Handover { term: 7 })
    );
}

/// A check-pointed mapping for `host`, made with THIRD_PARTY by `manager`.
fn managed(host: &str, port: u16, manager: &str) -> MappingRecord {
    MappingRecord {
        third_party: true,
        manager: Some(manager.parse().unwrap()),
        ..mapping(host, port, true)
    }
}

fn requester(ip: &str, port: u16, anchor: Option<Timestamp>, volatile: bool) -> Item {
    Item::Requester {
        ip: ip.parse().unwrap(),
        state: Some(RequesterState {
            port,
            anchor,
            volatile_until: volatile.then_some(FAR),
        }),
    }
}

/// An active of term 3 whose backup's Hello says link `version`.
fn active_with_backup_of_version(version: u16) -> Active {
    let mut a = Active::new(3, ActiveConfig::default(), SubscriberKeying::default());
    a.connected(at(0), seq_pos(10), false);
    let _ = a.poll_transmit();
    let mut hello = Vec::new();
    Message::Hello {
        term: 3,
        active: false,
        applied: 0,
        now: at(0),
        version,
        holds: portkeep_ha::Position::default(),
    }
    .encode(&mut hello);
    a.handle_input(at(0), &hello).unwrap();
    assert_eq!(a.peer_version(), version);
    a
}

/// The items of the snapshot `a` wrote, as its backup reads them.
fn snapshot_items_sent(a: &mut Active, k: &SubscriberKeying) -> Vec<Item> {
    let mut bytes = a.poll_transmit().unwrap();
    let mut items = Vec::new();
    while let Some(m) = Message::decode(&mut bytes, k).unwrap() {
        if let Message::SnapshotPart { items: it, .. } = m {
            items.extend(it);
        }
    }
    items
}

#[test]
fn link_version_2_backups_get_nothing_they_cannot_read() {
    let k = SubscriberKeying::default();
    // A backup of the release before: its Hello says version 2.
    let mut a = active_with_backup_of_version(2);
    a.send_snapshot(
        at(1),
        10,
        vec![
            Item::ServerEpoch { anchor: T0 },
            Item::Upsert(managed("10.2.0.1", 80, "10.1.0.1")),
            requester("10.1.0.1", 41_000, None, true),
        ],
    );
    let items = snapshot_items_sent(&mut a, &k);
    // No requester item (type 7), and the record without its manager,
    // in record version 1, the only one a version-2 reader accepts.
    assert_eq!(
        items,
        vec![
            Item::ServerEpoch { anchor: T0 },
            Item::Upsert(MappingRecord {
                manager: None,
                ..managed("10.2.0.1", 80, "10.1.0.1")
            }),
        ]
    );
    let record = portkeep_server::record::encode_mapping(&MappingRecord {
        manager: None,
        ..managed("10.2.0.1", 80, "10.1.0.1")
    });
    assert_eq!(record[0], portkeep_server::record::RECORD_VERSION);
    // This release's backup gets both.
    let mut full = Vec::new();
    Message::Changes {
        term: 3,
        seq: 11,
        items: vec![
            Item::Upsert(managed("10.2.0.1", 80, "10.1.0.1")),
            requester("10.1.0.1", 41_000, None, true),
        ],
    }
    .encode(&mut full);
    let Some(Message::Changes { items, .. }) = Message::decode(&mut full, &k).unwrap() else {
        panic!("not a Changes message")
    };
    assert_eq!(items.len(), 2);
    assert!(matches!(&items[0], Item::Upsert(m) if m.manager.is_some()));
}

fn third_party_snapshot() -> Vec<Item> {
    let mut items = snapshot_items();
    // The server's epoch began 100 s before T0.
    items[0] = Item::ServerEpoch {
        anchor: Timestamp(T0.0 - 100_000),
    };
    items.push(Item::Upsert(managed("10.2.0.1", 80, "10.1.0.1")));
    // 10.1.0.1 also holds volatile mappings; 10.1.0.2 holds only
    // check-pointed ones, and its epoch restarted at T0.
    items.push(requester("10.1.0.1", 41_000, None, true));
    items.push(requester("10.1.0.2", 42_000, Some(T0), false));
    items
}

#[test]
fn draft_s2_6_1_a_hot_takeover_resets_exactly_the_third_party_clients_that_held_volatile_state() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, third_party_snapshot());
    pump(&mut a, &mut b, at(1));
    let now = at(1_000);
    let t = b.promote(now);
    assert_eq!(t.kind, TakeoverKind::Hot);
    let k = SubscriberKeying::default();
    let m1: IpAddr = "10.1.0.1".parse().unwrap();
    let m2: IpAddr = "10.1.0.2".parse().unwrap();
    let state = |ip: IpAddr| t.state.requesters.iter().find(|(i, _)| *i == ip).unwrap().1;
    assert_eq!(state(m1).anchor, Some(now), "lost its volatile mappings");
    assert_eq!(state(m1).port, 41_000);
    assert_eq!(state(m2).anchor, Some(T0), "lost nothing: continues");
    let targets = t.announce_targets(&[]);
    assert!(targets.contains(&(k.subscriber_of(m1), m1)), "{targets:?}");
    assert!(!targets.iter().any(|(_, h)| *h == m2), "{targets:?}");
    // The restored server answers each with its epoch and port.
    let cfg = portkeep_server::ServerConfig {
        external_addresses: vec!["192.0.2.1".parse().unwrap()],
        ..portkeep_server::ServerConfig::default()
    };
    let (s, _) = portkeep_server::Server::restore_replica(cfg, now, t.state.clone());
    let later = now + Duration::from_secs(3);
    assert_eq!(s.requester_epoch(later, m1), 3, "restarted at the takeover");
    assert_eq!(s.requester_epoch(later, m2), 4, "its own, from T0");
    assert_eq!(
        s.requester_epoch(later, "10.9.9.9".parse().unwrap()),
        104,
        "the server's"
    );
    let mut out = Vec::new();
    assert_eq!(
        s.announce_to(now, m1, &mut out),
        SocketAddr::new(m1, 41_000)
    );
}

#[test]
fn draft_s2_6_1_a_stale_takeover_tells_every_third_party_client() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, third_party_snapshot());
    pump(&mut a, &mut b, at(1));
    b.disconnected(at(2));
    let t = b.promote(at(1) + LEASE);
    assert_eq!(t.kind, TakeoverKind::Stale);
    let targets = t.announce_targets(&[]);
    for ip in ["10.1.0.1", "10.1.0.2"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(targets.iter().any(|(_, h)| *h == ip), "{targets:?}");
    }
    // Every epoch is the new server epoch (each requester anchored there,
    // so it stays known with no mapping left); the ports are kept.
    let now = at(1) + LEASE;
    assert!(t
        .state
        .requesters
        .iter()
        .all(|(_, r)| r.anchor == Some(now)));
    assert_eq!(t.state.requesters.len(), 2);
    let cfg = portkeep_server::ServerConfig {
        external_addresses: vec!["192.0.2.1".parse().unwrap()],
        ..portkeep_server::ServerConfig::default()
    };
    let (s, _) = portkeep_server::Server::restore_replica(cfg, now, t.state.clone());
    // 10.1.0.2 manages no mapping that came over: it is still told at
    // the port it asked from.
    let mut out = Vec::new();
    let m2: IpAddr = "10.1.0.2".parse().unwrap();
    assert_eq!(
        s.announce_to(now, m2, &mut out),
        SocketAddr::new(m2, 42_000)
    );
    assert_eq!(s.requester_epoch(now, m2), 0);
}

/// The link's reader decodes frames where they lie: many frames in one
/// read, frames split across reads, and the compaction between them all
/// give back exactly what was sent.
#[test]
fn frames_are_read_in_place_whatever_the_reads() {
    use portkeep_ha::wire::FrameReader;
    let k = SubscriberKeying::default();
    let msgs: Vec<Message> = (0..20_000u64)
        .map(|i| Message::Heartbeat {
            term: i,
            now: at(i),
        })
        .collect();
    let mut bytes = Vec::new();
    for m in &msgs {
        m.encode(&mut bytes);
    }
    // All at once.
    let mut r = FrameReader::default();
    r.push(&bytes);
    let mut got = Vec::new();
    while let Some(m) = r.next(&k).unwrap() {
        got.push(m);
    }
    assert_eq!(got, msgs);
    assert_eq!(r.buffered(), 0);
    // In reads of awkward sizes, each followed by what it completes.
    let mut r = FrameReader::default();
    let mut got = Vec::new();
    for chunk in bytes.chunks(7_777) {
        r.push(chunk);
        while let Some(m) = r.next(&k).unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    // Too long a frame is refused.
    let mut r = FrameReader::default();
    r.push(&(portkeep_ha::wire::MAX_FRAME as u32 + 1).to_be_bytes());
    assert!(r.next(&k).is_err());
}

/// Failure-scenarios draft section 2.6.1: volatile state whose end passed
/// before the takeover was not lost there, even though its expiry never
/// reached the backup; the epochs of its holders stay. State still alive
/// at the takeover is lost, as before.
#[test]
fn draft_s2_6_1_a_hot_takeover_after_volatile_state_ended_resets_nothing() {
    let k = SubscriberKeying::default();
    let host: IpAddr = "198.51.100.2".parse().unwrap();
    let manager: IpAddr = "10.1.0.1".parse().unwrap();
    let end = at(800);
    let items = vec![
        Item::ServerEpoch { anchor: T0 },
        Item::Upsert(mapping("198.51.100.1", 80, true)),
        Item::Volatile {
            subscriber: k.subscriber_of(host),
            hosts: vec![host],
            until: end,
        },
        Item::Requester {
            ip: manager,
            state: Some(RequesterState {
                port: 41_000,
                anchor: None,
                volatile_until: Some(end),
            }),
        },
    ];
    // The backup's clock runs 40 s behind the active's: the end is
    // translated like every other time.
    let skew = 40_000;
    for (now, lost) in [(at(600), true), (end, false), (at(1_200), false)] {
        let mut a = Active::new(3, ActiveConfig::default(), k.clone());
        let mut b = Backup::new(3, k.clone());
        a.connected(at(0), seq_pos(0), false);
        b.connected(Timestamp(at(0).0 - skew));
        pump_skewed(&mut a, &mut b, at(0), skew);
        a.send_snapshot(at(1), 10, items.clone());
        pump_skewed(&mut a, &mut b, at(1), skew);
        let now = Timestamp(now.0 - skew);
        let t = b.promote(now);
        assert_eq!(t.kind, TakeoverKind::Hot);
        let reset: Vec<IpAddr> = t.reset.iter().flat_map(|(_, h)| h.clone()).collect();
        let requester = t.state.requesters.iter().find(|(i, _)| *i == manager);
        if lost {
            assert_eq!(reset.len(), 2, "at {now:?}: {reset:?}");
            assert!(reset.contains(&host) && reset.contains(&manager));
            assert_eq!(requester.unwrap().1.anchor, Some(now));
        } else {
            assert!(
                reset.is_empty(),
                "at {now:?}: nothing alive was lost: {reset:?}"
            );
            assert_eq!(requester.unwrap().1.anchor, None, "its epoch stays");
            assert!(
                !t.state
                    .subscriber_anchors
                    .iter()
                    .any(|(s, _)| *s == k.subscriber_of(host)),
                "the host's subscriber keeps the server's epoch"
            );
        }
    }
}

/// A backup of link version 3 does not know when volatile state ends: it
/// gets the version-3 forms (item 5, an 11-octet requester), which this
/// release reads as state that never ends, the safe side.
#[test]
fn link_version_3_backups_get_volatile_state_without_its_end() {
    let k = SubscriberKeying::default();
    let mut a = active_with_backup_of_version(3);
    let host: IpAddr = "198.51.100.2".parse().unwrap();
    let volatile = Item::Volatile {
        subscriber: k.subscriber_of(host),
        hosts: vec![host],
        until: at(5_000),
    };
    a.send_snapshot(
        at(1),
        10,
        vec![
            Item::ServerEpoch { anchor: T0 },
            volatile,
            Item::Requester {
                ip: "10.1.0.1".parse().unwrap(),
                state: Some(RequesterState {
                    port: 41_000,
                    anchor: None,
                    volatile_until: Some(at(5_000)),
                }),
            },
        ],
    );
    let items = snapshot_items_sent(&mut a, &k);
    let never = Timestamp(u64::MAX);
    assert_eq!(
        items[1..],
        [
            Item::Volatile {
                subscriber: k.subscriber_of(host),
                hosts: vec![host],
                until: never,
            },
            Item::Requester {
                ip: "10.1.0.1".parse().unwrap(),
                state: Some(RequesterState {
                    port: 41_000,
                    anchor: None,
                    volatile_until: Some(never),
                }),
            },
        ]
    );
}

/// A hot takeover must follow the send of anything it did not hear within
/// the acknowledgement bound plus one lease (what lets volatile renewals
/// far from their end go unawaited): no lease is granted once an
/// acknowledgement is overdue, even before the timer that marks the link
/// lagging has run.
#[test]
fn draft_s2_6_no_lease_is_granted_while_an_acknowledgement_is_overdue() {
    let (mut a, mut b) = linked(3);
    a.send_snapshot(at(1), 10, snapshot_items());
    pump(&mut a, &mut b, at(1));
    let granted = a.lease_until();
    assert!(granted.is_some());
    // A change whose bytes never reach the backup.
    assert!(a.push(at(10), 11, vec![Item::ServerEpoch { anchor: T0 }]));
    let _ = a.poll_transmit();
    // The backup's heartbeat arrives once the acknowledgement is overdue.
    let late = at(10) + ActiveConfig::default().ack_timeout;
    let mut hb = Vec::new();
    Message::Heartbeat { term: 3, now: late }.encode(&mut hb);
    a.handle_input(late, &hb).unwrap();
    assert_eq!(a.lease_until(), granted, "no lease for a backup behind");
    assert!(a.poll_transmit().is_none_or(|bytes| {
        let k = SubscriberKeying::default();
        let mut bytes = bytes;
        !std::iter::from_fn(|| Message::decode(&mut bytes, &k).unwrap())
            .any(|m| matches!(m, Message::Lease { .. }))
    }));
}

/// Fencing needs a next term: a frame naming a term no pair reaches
/// (u64::MAX, found by fuzzing the link: the next promotion's term
/// overflowed) is malformed, the connection ends, and the node keeps its
/// own term and can still be promoted above it.
#[test]
fn design_fencing_a_frame_with_an_unreachable_term_is_refused() {
    let k = SubscriberKeying::default();
    let mut b = Backup::new(3, k.clone());
    b.connected(at(0));
    for term in [u64::MAX, portkeep_ha::wire::MAX_TERM] {
        let mut frame = Vec::new();
        Message::Heartbeat { term, now: at(1) }.encode(&mut frame);
        assert!(
            Message::decode(&mut frame.clone(), &k).is_err(),
            "term {term}"
        );
        assert!(b.handle_input(at(1), &frame).is_err(), "term {term}");
    }
    let mut ok = Vec::new();
    let term = portkeep_ha::wire::MAX_TERM - 1;
    Message::Heartbeat { term, now: at(1) }.encode(&mut ok);
    assert!(Message::decode(&mut ok.clone(), &k).unwrap().is_some());
    assert_eq!(b.term(), 3);
    assert_eq!(b.promote(at(2)).term, 4);
}

/// Link version 5 added held ports (RFC 6887 section 15): a backup of
/// version 4 is not sent them (it could not read the frame), this
/// release's backup reads them back as they were.
#[test]
fn link_version_4_backups_get_no_held_ports() {
    let k = SubscriberKeying::default();
    let hold = portkeep_server::PortHold {
        owner: portkeep_server::MappingKey {
            internal_ip: "10.0.0.1".parse().unwrap(),
            protocol: portkeep_proto::Protocol::TCP,
            internal_port: 80,
        },
        nonce: [5; 12],
        external: "192.0.2.1:20001".parse().unwrap(),
        until: Timestamp(T0.0 + 120_000),
    };
    let mut a = active_with_backup_of_version(4);
    a.send_snapshot(
        at(1),
        10,
        vec![Item::ServerEpoch { anchor: T0 }, Item::PortHeld(hold)],
    );
    assert_eq!(
        snapshot_items_sent(&mut a, &k),
        vec![Item::ServerEpoch { anchor: T0 }]
    );
    let mut a = active_with_backup_of_version(5);
    a.send_snapshot(
        at(1),
        10,
        vec![Item::ServerEpoch { anchor: T0 }, Item::PortHeld(hold)],
    );
    assert_eq!(
        snapshot_items_sent(&mut a, &k),
        vec![Item::ServerEpoch { anchor: T0 }, Item::PortHeld(hold)]
    );
}
