//! A deterministic simulator of Portkeep's active/backup pair.
//!
//! Real cores run on one seeded virtual clock: `portkeep_client::Session`s
//! for the clients, and for each node a `portkeep_server::Server`, a
//! `portkeep_ha::Node` and a model of the store with crash semantics. The
//! driver mirrors the daemon (`portkeepd`'s `runtime.rs`, `node.rs` and `link.rs`) rule
//! for rule; faults chosen by the seed hit the network, the replication
//! link, the stores and the nodes; invariants are checked after every step.
//! Any run replays exactly from its seed (STYLE.md: FoundationDB's
//! simulator, TigerBeetle's VOPR; neqo's test-fixture sim and smoltcp's
//! netsim for the network).
//!
//! `docs/testing.md` describes the fault model, the invariants and the
//! named schedules.
//!
//! With [`Options::witness`] the keepalived-like promoter gives way to a
//! modelled etcd and, on each node, the logic of `portkeepd`'s
//! `coordinator.rs` around a real `portkeep_ha::witness::Witness`.

mod etcd;
mod world;

use std::collections::BTreeMap;
use std::fmt;

pub use world::World;

/// A schedule that today's design is known not to survive; off by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Schedule {
    /// The promoter promotes a node that holds nothing (a backup restarted
    /// just before the active was lost).
    PromoteEmpty,
    /// The active is cut off from the backup and the promoter promotes the
    /// backup while the old active is alive.
    PartitionedOldActive,
    /// The active's process is frozen (SIGSTOP, a paused VM) long enough
    /// for the backup to be promoted, then resumes. Without the witness
    /// nothing stops it answering; with it (`--witness`) this is
    /// survivable.
    FrozenOldActive,
    /// Witness mode: etcd answers one node late (150 to 700 ms) for 2 to
    /// 10 s, three times; its requests still arrive. The coordinator
    /// keeps its fence open while it revokes the lease of a session that
    /// failed (docs/testing.md), so two nodes serve.
    EtcdSlow,
    /// The active's dataplane refuses changes for 2 to 6 s, once or twice
    /// a seed (`Refused::Kept`, `NotInstalled`, `Lost`). A reply queued
    /// behind a refused change, granting the same mapping, still leaves
    /// as a success while the core takes the mapping back
    /// (docs/testing.md).
    DataplaneRefusal,
}

impl Schedule {
    /// Every named schedule.
    pub const ALL: [Schedule; 5] = [
        Schedule::PromoteEmpty,
        Schedule::PartitionedOldActive,
        Schedule::FrozenOldActive,
        Schedule::EtcdSlow,
        Schedule::DataplaneRefusal,
    ];

    /// Whether it lifts the default faults' guards (the active lost only
    /// while the pair is healthy, and so on). The keepalived-era schedules
    /// do; the later ones keep them, so what they show is theirs alone.
    pub fn lifts_guards(self) -> bool {
        matches!(
            self,
            Schedule::PromoteEmpty | Schedule::PartitionedOldActive
        )
    }

    /// The name `--enable` takes.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::PromoteEmpty => "promote-empty",
            Schedule::PartitionedOldActive => "partitioned-old-active",
            Schedule::FrozenOldActive => "frozen-old-active",
            Schedule::EtcdSlow => "etcd-slow",
            Schedule::DataplaneRefusal => "dataplane-refusal",
        }
    }

    /// The schedule called `name`.
    pub fn parse(name: &str) -> Option<Schedule> {
        Schedule::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A defect planted in `portkeep_ha::Node` or `portkeep_server::Server`
/// (a cargo feature of `portkeep-ha` or `portkeep-server`, switched on per
/// run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Replies leave without waiting for the backup's acknowledgement.
    ReleaseBeforeAck,
    /// A higher term seen on the link is ignored (no fencing).
    SkipTermCheck,
    /// The backup acknowledges before it persisted.
    AckBeforePersist,
    /// A renewal the dataplane refused, the NAT still holding the mapping
    /// (`Refused::Kept`), is taken back as if never installed: the client
    /// loses the mapping without being told.
    RefusedKeptRemoves,
    /// A mapping the NAT lost (`Refused::Lost`) is removed without
    /// resetting its subscriber's epoch or owing an ANNOUNCE.
    RefusedLostKeepsEpoch,
}

impl PlantedBug {
    /// Every planted defect.
    pub const ALL: [PlantedBug; 5] = [
        PlantedBug::ReleaseBeforeAck,
        PlantedBug::SkipTermCheck,
        PlantedBug::AckBeforePersist,
        PlantedBug::RefusedKeptRemoves,
        PlantedBug::RefusedLostKeepsEpoch,
    ];

    /// The name `--planted` takes.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::ReleaseBeforeAck => "release-before-ack",
            PlantedBug::SkipTermCheck => "skip-term-check",
            PlantedBug::AckBeforePersist => "ack-before-persist",
            PlantedBug::RefusedKeptRemoves => "refused-kept-removes",
            PlantedBug::RefusedLostKeepsEpoch => "refused-lost-keeps-epoch",
        }
    }

    /// The defect called `name`.
    pub fn parse(name: &str) -> Option<PlantedBug> {
        PlantedBug::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What one run simulates.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed: everything else follows from it.
    pub seed: u64,
    /// Virtual duration of the workload, milliseconds.
    pub duration_ms: u64,
    /// Clients that map for themselves.
    pub clients: usize,
    /// THIRD_PARTY clients (each manages mappings of other hosts).
    pub third_party_clients: usize,
    /// Named schedules turned on.
    pub enable: Vec<Schedule>,
    /// A planted defect to switch on.
    pub planted: Option<PlantedBug>,
    /// Keep a trace of the run.
    pub trace: bool,
    /// Witness mode: etcd decides which node serves (both nodes
    /// configured `backup`, each running the coordinator's logic), not the
    /// keepalived-like promoter; adds the `freeze` fault and invariant 6.
    pub witness: bool,
    /// Witness mode only: whether a node answers PCP only while its lease
    /// allows (the fence). Off only to show invariant 6 catches its
    /// absence.
    pub witness_fence: bool,
}

impl Options {
    /// Ten virtual minutes, 20 + 3 clients, default faults only.
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            duration_ms: 10 * 60 * 1000,
            clients: 20,
            third_party_clients: 3,
            enable: Vec::new(),
            planted: None,
            trace: false,
            witness: false,
            witness_fence: true,
        }
    }
}

/// The invariants (see `docs/testing.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// 1: a reply that echoed CHECKPOINT_REQUIRED stays served.
    CheckpointServed,
    /// 2: one node answers PCP at a time, terms never go back.
    OneServer,
    /// 3: epoch checks fail only after lost state; lost state the check
    /// cannot see is ANNOUNCEd with an epoch that restarted at the loss.
    Epochs,
    /// 4: no external endpoint held by two subscribers.
    UniqueExternal,
    /// 5: queues and buffers stay within their bounds.
    Bounded,
    /// 6 (witness mode): at most one node answers PCP at any instant.
    OneAnswers,
    /// 7: after the dataplane refused a change, the core holds what the
    /// NAT forwards, and only a loss moves an epoch.
    Dataplane,
}

impl Invariant {
    /// Its number in the docs.
    pub fn number(self) -> u8 {
        match self {
            Invariant::CheckpointServed => 1,
            Invariant::OneServer => 2,
            Invariant::Epochs => 3,
            Invariant::UniqueExternal => 4,
            Invariant::Bounded => 5,
            Invariant::OneAnswers => 6,
            Invariant::Dataplane => 7,
        }
    }
}

/// One invariant that failed.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The run's seed.
    pub seed: u64,
    /// Virtual time, milliseconds from the start.
    pub at_ms: u64,
    /// Which invariant.
    pub invariant: Invariant,
    /// One line.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} t={}.{:03}s invariant {}: {}",
            self.seed,
            self.at_ms / 1000,
            self.at_ms % 1000,
            self.invariant.number(),
            self.what
        )
    }
}

/// What one run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Invariant violations (at most a few per invariant are kept; the
    /// count is in `violation_count`).
    pub violations: Vec<Violation>,
    /// All violations, including those not kept.
    pub violation_count: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Replies that echoed CHECKPOINT_REQUIRED, as accepted by clients.
    pub checkpoints_promised: u64,
    /// Check-points a node ended (a later answer without the option) whose
    /// answer never reached the client, found missing after a failover:
    /// the server reported it, so not a violation (see docs/testing.md).
    pub unseen_downgrades: u64,
    /// Takeovers (promotions).
    pub takeovers: u64,
    /// Backups that reconnected and caught up from their position.
    pub resumes: u64,
    /// Actives that handed the service to a backup holding fresher state.
    pub handovers: u64,
    /// Steps taken.
    pub steps: u64,
    /// Extensions of volatile state answered without waiting for the
    /// backup (`NodeStats::extensions_unawaited`).
    pub extensions_unawaited: u64,
    /// Changes the dataplane refused (`dataplane-refusal` fault), by what
    /// it said they left: a renewal it kept the mapping of
    /// (`Refused::Kept`).
    pub refused_kept: u64,
    /// A creation it never installed (`Refused::NotInstalled`).
    pub refused_not_installed: u64,
    /// A mapping the NAT lost (`Refused::Lost`).
    pub refused_lost: u64,
    /// Witness mode: elections won at etcd.
    pub elections: u64,
    /// Witness mode: elected nodes that held less than the record and gave
    /// the lease back (`Verdict::Yield`).
    pub yields: u64,
    /// Witness mode: elected actives of an older term than the record's,
    /// demoted first (`Verdict::StandDown`).
    pub stand_downs: u64,
    /// The trace, when asked for.
    pub trace: Vec<String>,
}

/// Runs one seed.
pub fn run(opts: &Options) -> Report {
    let mut w = World::new(opts.clone());
    w.run();
    w.into_report()
}

/// Totals over many seeds.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// Seeds run.
    pub seeds: u64,
    /// Violations over all seeds.
    pub violations: u64,
    /// The first violations found (a few per seed).
    pub examples: Vec<Violation>,
    /// Faults by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Check-points promised to clients.
    pub checkpoints_promised: u64,
    /// Check-points ended by an answer the client never received.
    pub unseen_downgrades: u64,
    /// Takeovers.
    pub takeovers: u64,
    /// Resumes.
    pub resumes: u64,
    /// Handovers.
    pub handovers: u64,
    /// Steps.
    pub steps: u64,
    /// Extensions of volatile state answered without waiting.
    pub extensions_unawaited: u64,
    /// Refused changes the NAT kept the mapping of.
    pub refused_kept: u64,
    /// Refused creations never installed.
    pub refused_not_installed: u64,
    /// Refused changes to mappings the NAT lost.
    pub refused_lost: u64,
    /// Elections won at etcd (witness mode).
    pub elections: u64,
    /// Yields (witness mode).
    pub yields: u64,
    /// Stand-downs (witness mode).
    pub stand_downs: u64,
    /// The fewest faults injected in one seed (promotions, returns of the
    /// old active and frozen holders found replaced, which follow from
    /// other faults, not counted).
    pub min_faults_per_seed: u64,
}

impl Totals {
    fn add(&mut self, r: Report) {
        let injected: u64 = r
            .faults
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("promote-") && **k != "old-active-return" && **k != "freeze-takeover"
            })
            .map(|(_, n)| n)
            .sum();
        self.min_faults_per_seed = if self.seeds == 0 {
            injected
        } else {
            self.min_faults_per_seed.min(injected)
        };
        self.seeds += 1;
        self.violations += r.violation_count;
        for v in r.violations {
            if self.examples.len() < 50 {
                self.examples.push(v);
            }
        }
        for (k, n) in r.faults {
            *self.faults.entry(k).or_default() += n;
        }
        self.checkpoints_promised += r.checkpoints_promised;
        self.unseen_downgrades += r.unseen_downgrades;
        self.takeovers += r.takeovers;
        self.resumes += r.resumes;
        self.handovers += r.handovers;
        self.steps += r.steps;
        self.extensions_unawaited += r.extensions_unawaited;
        self.refused_kept += r.refused_kept;
        self.refused_not_installed += r.refused_not_installed;
        self.refused_lost += r.refused_lost;
        self.elections += r.elections;
        self.yields += r.yields;
        self.stand_downs += r.stand_downs;
    }

    /// Seeds (of the examples) that failed, in order, without repeats.
    pub fn failing_seeds(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.examples.iter().map(|v| v.seed).collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// Runs seeds `first..first + n` with `template`'s other options, on
/// `threads` threads; the result does not depend on the thread count.
pub fn run_seeds(template: &Options, first: u64, n: u64, threads: usize) -> Totals {
    let threads = threads.clamp(1, 64) as u64;
    let mut parts: Vec<Vec<Report>> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut seed = first + t;
                    while seed < first + n {
                        let mut o = template.clone();
                        o.seed = seed;
                        o.trace = false;
                        out.push(run(&o));
                        seed += threads;
                    }
                    out
                })
            })
            .collect();
        for h in handles {
            parts.push(h.join().unwrap_or_default());
        }
    });
    let mut all: Vec<Report> = parts.into_iter().flatten().collect();
    all.sort_by_key(|r| r.seed);
    let mut t = Totals::default();
    for r in all {
        t.add(r);
    }
    t
}

/// Runs seeds from `first` in batches until one violates an invariant
/// (returning its first violation) or `max` seeds ran without any.
pub fn first_violation(
    template: &Options,
    first: u64,
    max: u64,
    threads: usize,
) -> Option<Violation> {
    let batch = (threads.max(1) as u64) * 8;
    let mut seed = first;
    while seed < first + max {
        let n = batch.min(first + max - seed);
        let t = run_seeds(template, seed, n, threads);
        if let Some(v) = t.examples.into_iter().next() {
            return Some(v);
        }
        seed += n;
    }
    None
}
