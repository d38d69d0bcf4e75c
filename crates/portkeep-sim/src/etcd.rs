//! The pair's witness in witness mode: a model of etcd, always correct and
//! always reachable (only a node that is down or frozen misses what it
//! sends). It keeps leases with a time to live counted from when it
//! *receives* a grant or a keepalive, an election (each candidate's key
//! lives on its lease; the oldest live key leads, as etcd's v3election
//! API does) and the record key, written only in a transaction guarded by
//! the leader's key (`crates/portkeepd/src/coordinator.rs`).
//!
//! It is pure state: the world carries its messages, with their delays,
//! and schedules the expiries it asks for.

use std::collections::BTreeMap;

use portkeep_ha::witness::Record;

/// A call a node makes to etcd.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Req {
    /// `LeaseGrant`.
    Grant { call: u64 },
    /// One keepalive of the lease's stream.
    KeepAlive { call: u64, lease: u64 },
    /// `Campaign`: puts the candidate's key on its lease (once per lease)
    /// and answers once it leads.
    Campaign { call: u64, lease: u64 },
    /// `Get` of the record.
    Get { call: u64 },
    /// The record's transaction: put if the leader key (named after
    /// `lease`, created at `rev`) still exists.
    Put {
        call: u64,
        lease: u64,
        rev: u64,
        record: Record,
    },
    /// `Resign` with the leader key.
    Resign { call: u64, lease: u64, rev: u64 },
    /// `LeaseRevoke`.
    Revoke { call: u64, lease: u64 },
}

/// What etcd answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resp {
    /// A lease of `ttl_ms`.
    Granted { call: u64, lease: u64, ttl_ms: u64 },
    /// The lease's time to live from now (0: it is gone).
    KeptAlive { call: u64, ttl_ms: u64 },
    /// The campaign's outcome: the leader key's revision, or an error (the
    /// lease is gone).
    Campaign { call: u64, won: Option<u64> },
    /// The record, if any.
    Got { call: u64, record: Option<Record> },
    /// Whether the transaction's guard held (the record was written).
    Put { call: u64, ok: bool },
    /// A resign or a revoke was carried out.
    Done { call: u64 },
}

impl Resp {
    pub(crate) fn call(&self) -> u64 {
        match *self {
            Resp::Granted { call, .. }
            | Resp::KeptAlive { call, .. }
            | Resp::Campaign { call, .. }
            | Resp::Got { call, .. }
            | Resp::Put { call, .. }
            | Resp::Done { call } => call,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Virtual ms from which the lease is gone.
    expires: u64,
}

/// A candidate's key under the election prefix.
#[derive(Debug, Clone, Copy)]
struct Key {
    rev: u64,
    lease: u64,
    node: usize,
}

/// A campaign waiting to lead.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    node: usize,
    gen: u64,
    call: u64,
}

/// What etcd does next: answers to send, an expiry to schedule.
#[derive(Debug, Default)]
pub(crate) struct Out {
    /// (node, its process generation, the answer).
    pub(crate) answers: Vec<(usize, u64, Resp)>,
    /// (lease, virtual ms): check the lease then.
    pub(crate) expiry: Option<(u64, u64)>,
}

/// etcd, as one always-correct member.
#[derive(Debug)]
pub(crate) struct Etcd {
    ttl_ms: u64,
    next_lease: u64,
    next_rev: u64,
    leases: BTreeMap<u64, Lease>,
    /// The election's keys, oldest first.
    keys: Vec<Key>,
    /// Campaigns not answered yet, by lease.
    waiting: BTreeMap<u64, Waiter>,
    record: Option<Record>,
}

impl Etcd {
    pub(crate) fn new(ttl_ms: u64) -> Etcd {
        Etcd {
            ttl_ms,
            next_lease: 0x7000,
            next_rev: 1,
            leases: BTreeMap::new(),
            keys: Vec::new(),
            waiting: BTreeMap::new(),
            record: None,
        }
    }

    fn alive(&self, lease: u64, now: u64) -> bool {
        self.leases.get(&lease).is_some_and(|l| l.expires > now)
    }

    /// The node whose key leads, if any.
    pub(crate) fn leader(&self) -> Option<usize> {
        self.keys.first().map(|k| k.node)
    }

    /// Removes a lease and the keys on it.
    fn drop_lease(&mut self, lease: u64, out: &mut Out) {
        self.leases.remove(&lease);
        self.keys.retain(|k| k.lease != lease);
        self.waiting.remove(&lease);
        self.elect(out);
    }

    /// Answers the campaign of the key that leads, if it waits.
    fn elect(&mut self, out: &mut Out) {
        if let Some(k) = self.keys.first().copied() {
            if let Some(w) = self.waiting.remove(&k.lease) {
                out.answers.push((
                    w.node,
                    w.gen,
                    Resp::Campaign {
                        call: w.call,
                        won: Some(k.rev),
                    },
                ));
            }
        }
    }

    /// A lease's expiry is due: gone unless kept alive since.
    pub(crate) fn expire(&mut self, lease: u64, now: u64) -> Out {
        let mut out = Out::default();
        if self.leases.get(&lease).is_some_and(|l| l.expires <= now) {
            self.drop_lease(lease, &mut out);
        }
        out
    }

    /// Handles a call from `node` (process generation `gen`), received at
    /// `now`.
    pub(crate) fn handle(&mut self, node: usize, gen: u64, req: Req, now: u64) -> Out {
        let mut out = Out::default();
        // Leases whose expiry is due at this very instant go first.
        let due: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in due {
            self.drop_lease(lease, &mut out);
        }
        let answer = |out: &mut Out, r: Resp| out.answers.push((node, gen, r));
        match req {
            Req::Grant { call } => {
                let lease = self.next_lease;
                self.next_lease += 1;
                let expires = now + self.ttl_ms;
                self.leases.insert(lease, Lease { expires });
                out.expiry = Some((lease, expires));
                answer(
                    &mut out,
                    Resp::Granted {
                        call,
                        lease,
                        ttl_ms: self.ttl_ms,
                    },
                );
            }
            Req::KeepAlive { call, lease } => {
                if self.alive(lease, now) {
                    let expires = now + self.ttl_ms;
                    self.leases.insert(lease, Lease { expires });
                    out.expiry = Some((lease, expires));
                    answer(
                        &mut out,
                        Resp::KeptAlive {
                            call,
                            ttl_ms: self.ttl_ms,
                        },
                    );
                } else {
                    answer(&mut out, Resp::KeptAlive { call, ttl_ms: 0 });
                }
            }
            Req::Campaign { call, lease } => {
                if !self.alive(lease, now) {
                    answer(&mut out, Resp::Campaign { call, won: None });
                } else {
                    // Campaigning again with the same lease is the same
                    // candidacy: the key is named after the lease.
                    if !self.keys.iter().any(|k| k.lease == lease) {
                        self.keys.push(Key {
                            rev: self.next_rev,
                            lease,
                            node,
                        });
                        self.next_rev += 1;
                    }
                    self.waiting.insert(lease, Waiter { node, gen, call });
                    self.elect(&mut out);
                }
            }
            Req::Get { call } => {
                answer(
                    &mut out,
                    Resp::Got {
                        call,
                        record: self.record,
                    },
                );
            }
            Req::Put {
                call,
                lease,
                rev,
                record,
            } => {
                let ok = self.alive(lease, now)
                    && self.keys.iter().any(|k| k.lease == lease && k.rev == rev);
                if ok {
                    self.record = Some(record);
                }
                answer(&mut out, Resp::Put { call, ok });
            }
            Req::Resign { call, lease, rev } => {
                self.keys.retain(|k| !(k.lease == lease && k.rev == rev));
                self.elect(&mut out);
                answer(&mut out, Resp::Done { call });
            }
            Req::Revoke { call, lease } => {
                if self.leases.contains_key(&lease) {
                    self.drop_lease(lease, &mut out);
                }
                answer(&mut out, Resp::Done { call });
            }
        }
        out
    }
}
