//! The simulator's own gates: the default fault set finds no violation in
//! 1,000 seeds; each named schedule and each planted defect is found; in
//! witness mode (etcd decides who serves) 200 seeds hold every invariant,
//! and a node answering without its lease is caught.

#![allow(clippy::unwrap_used, clippy::panic)]

use portkeep_sim::{
    first_violation, run, run_seeds, Invariant, Options, PlantedBug, Schedule, Totals,
};

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

#[test]
fn default_faults_1000_seeds_hold_every_invariant() {
    let t = run_seeds(&Options::new(0), 0, 1000, threads());
    for v in &t.examples {
        eprintln!("{v}");
    }
    assert_eq!(t.seeds, 1000);
    assert_eq!(
        t.violations,
        0,
        "failing seeds {:?}: replay with `cargo run --release -p portkeep-sim -- --seed S`",
        t.failing_seeds()
    );
    // The faults happen: at least five per seed, and every kind.
    let total: u64 = t
        .faults
        .iter()
        .filter(|(k, _)| !k.starts_with("promote-") && **k != "old-active-return")
        .map(|(_, n)| n)
        .sum();
    assert!(total >= 5 * 1000, "{:?}", t.faults);
    assert!(t.min_faults_per_seed >= 5, "{}", t.min_faults_per_seed);
    for kind in [
        "pcp-loss",
        "pcp-delay",
        "pcp-dup",
        "pcp-reorder",
        "link-reset",
        "link-partition",
        "link-delay",
        "crash-active",
        "crash-backup",
        "fsync-failure",
        "partition-then-active-loss",
        "backup-restart-then-active-loss",
        "backup-disk-stall",
        "both-down",
        "operator-clear",
        "promote-early",
        "promote-late",
        "old-active-return",
    ] {
        assert!(
            t.faults.get(kind).copied().unwrap_or(0) > 0,
            "no {kind}: {:?}",
            t.faults
        );
    }
    assert!(t.takeovers > 1000, "{}", t.takeovers);
    // Backups that reconnect catch up from their position, not only by
    // snapshots.
    assert!(t.resumes > 1000, "{}", t.resumes);
    // After a double failure, a node configured active that comes back
    // with less than its backup hands the service over.
    assert!(t.handovers > 10, "{}", t.handovers);
    assert!(
        t.checkpoints_promised > 100_000,
        "{}",
        t.checkpoints_promised
    );
}

/// Every seed a long soak once found violating (`docs/testing.md`), each
/// a defect since fixed: they stay clean.
const SOAK_SEEDS: [u64; 33] = [
    8034, 8305, 8523, 9955, 10012, 10313, 17589, 18317, 19392, 26294, 32420, 44985, 47475, 50872,
    55924, 57190, 60324, 66095, 66563, 66767, 75166, 81994, 89627, 300250, 301401, 301924, 302185,
    10962, 60350, 2260, 2781, 6433, 90583,
];

#[test]
fn seeds_a_soak_once_failed_stay_clean() {
    for seed in SOAK_SEEDS {
        let r = run(&Options::new(seed));
        assert!(
            r.violations.is_empty(),
            "seed {seed}: {:?}",
            r.violations.first()
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    let mut o = Options::new(7);
    o.trace = true;
    let a = run(&o);
    let b = run(&o);
    assert!(a.trace.len() > 100);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.steps, b.steps);
}

fn schedule_is_caught(s: Schedule) {
    let mut o = Options::new(0);
    o.enable = vec![s];
    let v = first_violation(&o, 0, 20, threads());
    assert!(v.is_some(), "{} went unnoticed in 20 seeds", s.name());
}

#[test]
fn named_schedule_promote_empty_violates() {
    schedule_is_caught(Schedule::PromoteEmpty);
}

#[test]
fn named_schedule_partitioned_old_active_violates() {
    schedule_is_caught(Schedule::PartitionedOldActive);
}

#[test]
fn named_schedule_frozen_old_active_violates_without_a_witness() {
    schedule_is_caught(Schedule::FrozenOldActive);
}

fn witness(seed: u64) -> Options {
    let mut o = Options::new(seed);
    o.witness = true;
    o
}

fn invariants_of(t: &Totals) -> Vec<u8> {
    let mut v: Vec<u8> = t.examples.iter().map(|v| v.invariant.number()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn witness_200_seeds_hold_every_invariant_and_at_most_one_node_answers_at_any_instant() {
    let t = run_seeds(&witness(0), 0, 200, threads());
    for v in &t.examples {
        eprintln!("{v}");
    }
    assert_eq!(
        t.violations,
        0,
        "failing seeds {:?}: replay with `cargo run --release -p portkeep-sim -- --witness --seed S`",
        t.failing_seeds()
    );
    // Freezes happen in every seed, holders among them, and etcd's lease
    // moves the service: takeovers, elections, and nodes elected behind
    // the record that yield.
    assert!(
        t.faults.get("freeze").copied().unwrap_or(0) >= 200,
        "{:?}",
        t.faults
    );
    for kind in ["crash-active", "both-down", "partition-then-active-loss"] {
        assert!(t.faults.get(kind).copied().unwrap_or(0) > 0, "no {kind}");
    }
    assert!(t.takeovers > 400, "{}", t.takeovers);
    assert!(
        t.elections >= t.takeovers,
        "{} {}",
        t.elections,
        t.takeovers
    );
    assert!(
        t.checkpoints_promised > 10_000,
        "{}",
        t.checkpoints_promised
    );
}

#[test]
fn witness_without_the_fence_two_nodes_answer_at_once() {
    // The planted defect: nodes answer whatever their lease says. A holder
    // frozen past its lease wakes up and answers what queued while the
    // node etcd elected since answers too.
    let mut o = witness(0);
    o.witness_fence = false;
    let t = run_seeds(&o, 0, 20, threads());
    assert!(
        t.examples
            .iter()
            .any(|v| v.invariant == Invariant::OneAnswers),
        "invariant 6 saw nothing in 20 seeds: {:?}",
        invariants_of(&t)
    );
}

#[test]
fn witness_survives_a_frozen_old_active() {
    let mut o = witness(0);
    o.enable = vec![Schedule::FrozenOldActive];
    let t = run_seeds(&o, 0, 50, threads());
    assert_eq!(t.violations, 0, "failing seeds {:?}", t.failing_seeds());
    assert_eq!(t.faults.get("frozen-old-active").copied(), Some(50));
}

/// A defect of `portkeepd`'s coordinator the simulator found (see
/// docs/testing.md): a session that fails while serving (its record write
/// timed out) revokes its lease with its fence still open, and keeps
/// answering until the revoke's answer comes, while etcd already elected
/// the peer. This test fails once that is fixed: then `etcd-slow` belongs
/// in witness mode's default faults.
#[test]
fn witness_closes_the_fence_before_giving_the_lease_back() {
    // etcd answering one node late: its session ends on a timed-out call,
    // and the revoke that follows hands the peer the lease on arrival.
    // Before the fence closed ahead of the revoke, 300 seeds had 43
    // violations (seeds 4 and 213: both nodes serving).
    let mut o = witness(0);
    o.enable = vec![Schedule::EtcdSlow];
    let t = run_seeds(&o, 0, 60, threads());
    assert_eq!(t.violations, 0, "{:?}", invariants_of(&t));
}

#[test]
fn a_witness_seed_replays_exactly() {
    let mut o = witness(11);
    o.trace = true;
    let a = run(&o);
    let b = run(&o);
    assert!(a.trace.iter().any(|l| l.contains("frozen for")));
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.steps, b.steps);
}

fn planted_is_caught(bug: PlantedBug) {
    let mut o = Options::new(0);
    o.planted = Some(bug);
    let v = first_violation(&o, 0, 1000, threads());
    match v {
        Some(v) => eprintln!("{} found: {v}", bug.name()),
        None => panic!("{} went unnoticed in 1,000 seeds", bug.name()),
    }
}

#[test]
fn planted_release_before_ack_is_found() {
    planted_is_caught(PlantedBug::ReleaseBeforeAck);
}

#[test]
fn planted_skip_term_check_is_found() {
    planted_is_caught(PlantedBug::SkipTermCheck);
}

#[test]
fn planted_ack_before_persist_is_found() {
    planted_is_caught(PlantedBug::AckBeforePersist);
}

/// The named schedule dataplane-refusal: refusals of every kind happen,
/// and the server tells every client the truth through them (RFC 6887
/// section 7.4; failure-scenarios draft section 2.6.1), replies queued
/// behind a refused batch included.
#[test]
fn dataplane_refusals_of_every_kind_are_exercised() {
    let mut o = Options::new(0);
    o.enable = vec![Schedule::DataplaneRefusal];
    let t = run_seeds(&o, 0, 100, threads());
    assert!(t.faults.get("dataplane-refusal").copied().unwrap_or(0) >= 100);
    assert!(
        t.refused_kept > 50 && t.refused_not_installed > 20 && t.refused_lost > 20,
        "kept {}, not installed {}, lost {}",
        t.refused_kept,
        t.refused_not_installed,
        t.refused_lost
    );
    assert_eq!(t.violations, 0, "failing seeds {:?}", t.failing_seeds());
    // Seeds 1003 and 1533: a request answered while its refused batch
    // was applied waited in the committer's queue, and left as a grant of
    // a mapping the refusal took back; seed 3132: a reply made before the
    // NAT lost its mapping waited for the backup, and left as a grant
    // (docs/testing.md, "What it found").
    for seed in [1003, 1533, 3132] {
        let t = run_seeds(&o, seed, 1, 1);
        assert_eq!(t.violations, 0, "seed {seed}");
    }
}

/// A planted defect of `Server::refused`, under the dataplane-refusal
/// schedule: invariant 7 (or 3) finds it.
fn planted_refusal_is_caught(bug: PlantedBug) {
    let mut o = Options::new(0);
    o.planted = Some(bug);
    o.enable = vec![Schedule::DataplaneRefusal];
    let t = run_seeds(&o, 0, 40, threads());
    let v = t
        .examples
        .iter()
        .find(|v| matches!(v.invariant, Invariant::Dataplane | Invariant::Epochs));
    match v {
        Some(v) => eprintln!("{} found: {v}", bug.name()),
        None => panic!("{} went unnoticed in 40 seeds", bug.name()),
    }
}

#[test]
fn planted_refused_kept_removes_is_found() {
    planted_refusal_is_caught(PlantedBug::RefusedKeptRemoves);
}

#[test]
fn planted_refused_lost_keeps_epoch_is_found() {
    planted_refusal_is_caught(PlantedBug::RefusedLostKeepsEpoch);
}
