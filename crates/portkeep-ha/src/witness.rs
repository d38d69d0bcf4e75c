//! The right to serve as a lease held at an external witness (etcd), and
//! what a node does when it wins it, sans-IO.
//!
//! Two nodes that cannot see each other cannot tell a dead peer from a
//! cut link; a keepalived pair then has both serving (docs/ha.md). With a
//! witness, the node that holds the witness's lease is the only one that
//! may answer PCP, and [`Witness`] decides two things the daemon's
//! coordinator only carries out:
//!
//! - **Until when it may serve.** A lease of `ttl` that the witness
//!   confirmed in answer to a request sent at `t` cannot expire at the
//!   witness before `t + ttl` (the witness starts counting when it
//!   receives the request, later than `t`). The node stops answering at
//!   `t + ttl - margin`, so at most one node answers PCP at any instant:
//!   the other can only win the lease once the witness let it expire. A
//!   node frozen (SIGSTOP, a paused VM) that wakes after its deadline
//!   answers nothing, because the deadline is read against a clock that
//!   kept running while it was frozen.
//! - **What it serves once elected** ([`Witness::decide`]): the holder
//!   records at the witness the (term, log position) its backup has
//!   acknowledged (at each term change and periodically, never per
//!   commit). A newly elected node that holds less than that record lacks
//!   state its peer has (failure-scenarios draft section 2.6: state in
//!   stable storage, the epoch reset exactly when a client's state was
//!   lost), so it yields the lease to the peer, and serves what it has
//!   (resetting the epochs it cannot vouch for) only when the peer has not
//!   taken the lease within `peer_wait`.

use std::time::Duration;

use portkeep_server::Timestamp;

use crate::node::Role;
use crate::wire::Position;
use crate::Term;

/// Timing of the lease.
#[derive(Debug, Clone, Copy)]
pub struct WitnessConfig {
    /// The lease's time to live at the witness.
    pub ttl: Duration,
    /// How much sooner than the lease's earliest expiry the node stops
    /// serving: covers the time between reading the clock and the last
    /// reply leaving, and the witness's clock running faster.
    pub margin: Duration,
    /// How long an elected node that holds less than the record waits
    /// for its peer to take the lease before serving what it has.
    pub peer_wait: Duration,
}

/// What an elected node does ([`Witness::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The node is the active of the term recorded (or of a later one):
    /// it serves its state again as it is, every epoch continuing.
    Resume,
    /// The node is a backup: it promotes, in a term above `floor` and
    /// above every term it saw itself.
    Promote {
        /// The highest term the witness knows was served.
        floor: Term,
    },
    /// The node is an active of an older term than the one recorded:
    /// another node served since. It stands down (its state is not the
    /// truth any more) and is asked again as a backup.
    StandDown,
    /// The node holds less than the record and the peer may still come:
    /// it gives the lease back and campaigns again later.
    Yield,
}

/// What the holder last recorded at the witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The term last served.
    pub term: Term,
    /// The position its backup had acknowledged (or it took over at).
    pub position: Position,
}

/// The lease, and the decisions that depend on it.
#[derive(Debug, Clone)]
pub struct Witness {
    cfg: WitnessConfig,
    /// Whether this node is the elected holder.
    elected: bool,
    /// Whether what [`Witness::decide`] said was carried out: until then
    /// the elected node does not serve (an active of an older term must
    /// not answer from its stale state while it stands down).
    settled: bool,
    /// The end of the lease as confirmed, less the margin.
    valid_until: Option<Timestamp>,
    /// Since when this node has been elected while behind the record.
    behind_since: Option<Timestamp>,
}

impl Witness {
    /// A node that holds nothing yet.
    pub fn new(cfg: WitnessConfig) -> Witness {
        Witness {
            cfg,
            elected: false,
            settled: false,
            valid_until: None,
            behind_since: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &WitnessConfig {
        &self.cfg
    }

    /// The witness confirmed the lease, `ttl` from now on its clock, in
    /// answer to a request this node sent at `sent_at` (a grant or a
    /// keepalive). `ttl` zero: the lease is gone.
    pub fn confirmed(&mut self, sent_at: Timestamp, ttl: Duration) {
        if ttl.is_zero() {
            self.lost();
            return;
        }
        let ttl = ttl.min(self.cfg.ttl);
        let until = sent_at + ttl.saturating_sub(self.cfg.margin);
        // A late answer to an older request never shortens what a newer
        // one confirmed, and never lengthens past its own request.
        self.valid_until = Some(self.valid_until.map_or(until, |u| u.max(until)));
    }

    /// This node won the election (with a lease confirmed before). It
    /// serves only once the verdict is carried out ([`Witness::settled`]).
    pub fn elected(&mut self) {
        self.elected = true;
        self.settled = false;
    }

    /// The verdict ([`Verdict::Resume`] or [`Verdict::Promote`]) was
    /// carried out: the node serves from now, while the lease lasts.
    pub fn settled(&mut self) {
        self.settled = self.elected;
    }

    /// The lease is gone, or its state unknown (the connection to the
    /// witness failed): nothing more is confirmed. What was confirmed
    /// still holds until it runs out.
    pub fn lost(&mut self) {
        self.elected = false;
        self.settled = false;
    }

    /// The instant from which this node must not answer PCP; `None` if it
    /// may not now. Before election, and until its verdict is carried out,
    /// the node may never serve.
    pub fn serve_until(&self) -> Option<Timestamp> {
        if self.elected && self.settled {
            self.valid_until
        } else {
            None
        }
    }

    /// Whether what etcd confirmed has run out by `now` (or nothing was):
    /// the lease may be gone at the witness.
    pub fn valid_until_passed(&self, now: Timestamp) -> bool {
        self.valid_until.is_none_or(|u| now >= u)
    }

    /// Whether this node may answer PCP at `now`.
    pub fn may_serve(&self, now: Timestamp) -> bool {
        self.serve_until().is_some_and(|u| now < u)
    }

    /// What a node just elected does, given its role, term and the
    /// position it holds (`Node::holds`), and the witness's record (none
    /// yet: a pair that never had a holder).
    pub fn decide(
        &mut self,
        now: Timestamp,
        role: Role,
        term: Term,
        holds: Position,
        record: Option<Record>,
    ) -> Verdict {
        let verdict = match (role, record) {
            (Role::Active, None) => Verdict::Resume,
            (Role::Active, Some(r)) if term >= r.term => Verdict::Resume,
            (Role::Active, Some(_)) => Verdict::StandDown,
            (_, None) => Verdict::Promote { floor: 0 },
            (_, Some(r)) if holds >= r.position => Verdict::Promote { floor: r.term },
            (_, Some(r)) => {
                let since = *self.behind_since.get_or_insert(now);
                if now.as_millis().saturating_sub(since.as_millis())
                    < u64::try_from(self.cfg.peer_wait.as_millis()).unwrap_or(u64::MAX)
                {
                    Verdict::Yield
                } else {
                    Verdict::Promote { floor: r.term }
                }
            }
        };
        if !matches!(verdict, Verdict::Yield | Verdict::StandDown) {
            self.behind_since = None;
        }
        verdict
    }

    /// The record a holder in `term` writes: what its backup acknowledged
    /// (`acked`), never less than `previous` of the same term, so the
    /// record only grows.
    pub fn record(term: Term, acked: Position, previous: Option<Record>) -> Record {
        let position = match previous {
            Some(p) if p.term == term && p.position > acked => p.position,
            _ => acked,
        };
        Record { term, position }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WitnessConfig {
        WitnessConfig {
            ttl: Duration::from_secs(3),
            margin: Duration::from_millis(500),
            peer_wait: Duration::from_secs(10),
        }
    }

    fn t(ms: u64) -> Timestamp {
        Timestamp(1_000_000 + ms)
    }

    fn pos(term: Term, seq: u64) -> Position {
        Position { term, seq }
    }

    #[test]
    fn a_node_never_elected_may_not_serve() {
        let mut w = Witness::new(cfg());
        w.confirmed(t(0), Duration::from_secs(3));
        assert!(!w.may_serve(t(1)));
        w.elected();
        assert!(
            !w.may_serve(t(1)),
            "elected, but not yet resumed or promoted: a stale active standing down must not answer"
        );
        w.settled();
        assert!(w.may_serve(t(1)));
        w.lost();
        w.settled();
        assert!(!w.may_serve(t(1)), "only an elected node settles");
    }

    #[test]
    fn the_deadline_counts_from_the_request_not_the_answer() {
        let mut w = Witness::new(cfg());
        w.elected();
        w.settled();
        // Sent at 0, answered (say) 900 ms later: the witness may have
        // started counting at 1 ms, so the lease ends no sooner than 3 s
        // after the request, and the node stops 500 ms before that.
        w.confirmed(t(0), Duration::from_secs(3));
        assert!(w.may_serve(t(2_499)));
        assert!(
            !w.may_serve(t(2_500)),
            "a frozen node waking later answers nothing"
        );
    }

    #[test]
    fn a_late_answer_never_shortens_the_deadline() {
        let mut w = Witness::new(cfg());
        w.elected();
        w.settled();
        w.confirmed(t(2_000), Duration::from_secs(3));
        w.confirmed(t(1_000), Duration::from_secs(3));
        assert_eq!(w.serve_until(), Some(t(4_500)));
    }

    #[test]
    fn a_longer_ttl_than_asked_is_not_believed() {
        let mut w = Witness::new(cfg());
        w.elected();
        w.settled();
        w.confirmed(t(0), Duration::from_secs(60));
        assert_eq!(w.serve_until(), Some(t(2_500)));
    }

    #[test]
    fn a_lease_reported_gone_ends_service_at_once() {
        let mut w = Witness::new(cfg());
        w.elected();
        w.settled();
        w.confirmed(t(0), Duration::from_secs(3));
        w.confirmed(t(100), Duration::ZERO);
        assert!(!w.may_serve(t(101)));
    }

    #[test]
    fn draft_s2_6_the_active_of_the_recorded_term_resumes() {
        let mut w = Witness::new(cfg());
        let rec = Record {
            term: 4,
            position: pos(4, 100),
        };
        assert_eq!(
            w.decide(t(0), Role::Active, 4, pos(4, 150), Some(rec)),
            Verdict::Resume
        );
        assert_eq!(
            w.decide(t(0), Role::Active, 3, pos(3, 900), Some(rec)),
            Verdict::StandDown,
            "another node served term 4 since: this state is not the truth"
        );
    }

    #[test]
    fn draft_s2_6_a_backup_holding_the_record_promotes_above_its_term() {
        let mut w = Witness::new(cfg());
        let rec = Record {
            term: 4,
            position: pos(4, 100),
        };
        assert_eq!(
            w.decide(t(0), Role::Backup, 4, pos(4, 100), Some(rec)),
            Verdict::Promote { floor: 4 }
        );
        assert_eq!(
            w.decide(t(0), Role::Backup, 0, pos(0, 0), None),
            Verdict::Promote { floor: 0 }
        );
    }

    #[test]
    fn draft_s2_6_a_backup_behind_the_record_yields_until_the_peer_wait_ends() {
        let mut w = Witness::new(cfg());
        let rec = Record {
            term: 4,
            position: pos(4, 100),
        };
        let behind = pos(4, 99);
        assert_eq!(
            w.decide(t(0), Role::Backup, 4, behind, Some(rec)),
            Verdict::Yield
        );
        assert_eq!(
            w.decide(t(9_999), Role::Backup, 4, behind, Some(rec)),
            Verdict::Yield
        );
        assert_eq!(
            w.decide(t(10_000), Role::Backup, 4, behind, Some(rec)),
            Verdict::Promote { floor: 4 },
            "the peer never came: serve what is here"
        );
        // The wait starts over once it was settled.
        assert_eq!(
            w.decide(t(20_000), Role::Backup, 4, behind, Some(rec)),
            Verdict::Yield
        );
    }

    #[test]
    fn the_record_only_grows_within_a_term() {
        let prev = Record {
            term: 4,
            position: pos(4, 100),
        };
        assert_eq!(
            Witness::record(4, pos(4, 90), Some(prev)).position,
            pos(4, 100)
        );
        assert_eq!(
            Witness::record(4, pos(4, 120), Some(prev)).position,
            pos(4, 120)
        );
        assert_eq!(
            Witness::record(5, pos(5, 3), Some(prev)).position,
            pos(5, 3)
        );
    }
}
