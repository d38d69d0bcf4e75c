//! The backup node's end of the replication link.

use std::collections::BTreeMap;
use std::net::IpAddr;

use portkeep_server::record::key_of;
use portkeep_server::{MappingRecord, Restored, SubscriberId, SubscriberKeying, Timestamp};

use crate::wire::{FrameError, Item, Message};
use crate::Term;

/// The replicated state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    mappings: BTreeMap<Vec<u8>, MappingRecord>,
    anchors: BTreeMap<SubscriberId, Timestamp>,
    server_anchor: Option<Timestamp>,
    volatile: BTreeMap<SubscriberId, Vec<IpAddr>>,
}

impl State {
    fn apply(&mut self, item: Item) {
        match item {
            Item::Upsert(m) => {
                self.mappings.insert(key_of(&m), m);
            }
            Item::Remove(k) => {
                self.mappings.remove(&k);
            }
            Item::Epoch { subscriber, anchor } => {
                self.anchors.insert(subscriber, anchor);
            }
            Item::ServerEpoch { anchor } => {
                self.server_anchor = Some(anchor);
                self.anchors.clear();
            }
            Item::Volatile { subscriber, hosts } => {
                if hosts.is_empty() {
                    self.volatile.remove(&subscriber);
                } else {
                    self.volatile.insert(subscriber, hosts);
                }
            }
        }
    }
}

/// What a promoted backup starts from.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// The new term (one above the highest seen).
    pub term: Term,
    /// The state to restore the server core from
    /// (`portkeep_server::Server::restore`).
    pub state: Restored,
    /// Subscribers whose state was lost (they held volatile mappings, or
    /// this was a cold standby), with the hosts to send an unsolicited
    /// ANNOUNCE to. Their epochs are already reset in `state`.
    pub reset: Vec<(SubscriberId, Vec<IpAddr>)>,
    /// Whether the backup was in sync: if not, this is a cold takeover and
    /// every epoch resets.
    pub was_in_sync: bool,
}

/// The backup node's end of one replication link.
#[derive(Debug)]
pub struct Backup {
    term: Term,
    keying: SubscriberKeying,
    state: State,
    staging: Option<State>,
    applied: u64,
    synced: bool,
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

impl Backup {
    /// A backup in `term` (as stored from its last run).
    pub fn new(term: Term, keying: SubscriberKeying) -> Backup {
        Backup {
            term,
            keying,
            state: State::default(),
            staging: None,
            applied: 0,
            synced: false,
            out: Vec::new(),
            inbuf: Vec::new(),
        }
    }

    /// The highest term seen.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Whether a full snapshot has been received and applied.
    pub fn in_sync(&self) -> bool {
        self.synced
    }

    /// Last log position applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Number of check-pointed mappings held.
    pub fn mapping_count(&self) -> usize {
        self.state.mappings.len()
    }

    /// A connection from the active is up.
    pub fn connected(&mut self) {
        self.inbuf.clear();
        self.staging = None;
        // Until a new snapshot completes, this backup cannot vouch for
        // being current.
        self.synced = false;
        let (term, applied) = (self.term, self.applied);
        Message::Hello {
            term,
            active: false,
            applied,
        }
        .encode(&mut self.out);
    }

    /// Feeds bytes from the active.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.inbuf.extend_from_slice(bytes);
        while let Some(m) = Message::decode(&mut self.inbuf, &self.keying)? {
            if m.term() < self.term {
                // A deposed active still streaming: tell it the current
                // term, and take nothing from it (fencing).
                let (term, applied) = (self.term, self.applied);
                Message::Hello {
                    term,
                    active: false,
                    applied,
                }
                .encode(&mut self.out);
                continue;
            }
            self.term = m.term();
            match m {
                Message::SnapshotBegin { .. } => self.staging = Some(State::default()),
                Message::SnapshotPart { items, .. } => {
                    if let Some(s) = &mut self.staging {
                        for i in items {
                            s.apply(i);
                        }
                    }
                }
                Message::SnapshotEnd { seq, term } => {
                    if let Some(s) = self.staging.take() {
                        self.state = s;
                        self.applied = seq;
                        self.synced = true;
                        Message::Ack { term, seq }.encode(&mut self.out);
                    }
                }
                Message::Changes { seq, items, term } => {
                    if !self.synced || seq <= self.applied {
                        continue;
                    }
                    for i in items {
                        self.state.apply(i);
                    }
                    self.applied = seq;
                    Message::Ack { term, seq }.encode(&mut self.out);
                }
                Message::Heartbeat { term } => Message::Heartbeat { term }.encode(&mut self.out),
                Message::Hello { .. } | Message::Ack { .. } => {}
            }
        }
        Ok(())
    }

    /// Bytes to write to the active.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// Becomes active (keepalived's notify hook, `portkeepd ctl promote`).
    ///
    /// Failure-scenarios draft section 2.6: a subscriber whose whole state
    /// was check-pointed keeps its epoch (the anchor travelled, so the two
    /// nodes' clocks need not agree); one that held volatile mappings lost
    /// state: its epoch resets at `now` and its hosts get an ANNOUNCE. A
    /// backup that never completed a snapshot is a cold standby: every
    /// epoch resets.
    pub fn promote(self, now: Timestamp) -> Takeover {
        let term = self.term + 1;
        let synced = self.synced;
        let st = self.state;
        if !synced {
            return Takeover {
                term,
                state: Restored {
                    anchor: now,
                    subscriber_anchors: Vec::new(),
                    mappings: Vec::new(),
                    last_seq: self.applied,
                },
                reset: Vec::new(),
                was_in_sync: false,
            };
        }
        let mut anchors = st.anchors.clone();
        let mut reset = Vec::new();
        for (sub, hosts) in &st.volatile {
            anchors.insert(*sub, now);
            reset.push((*sub, hosts.clone()));
        }
        // Subscribers the active never reset share its server anchor, which
        // the snapshot carries.
        let anchor = st.server_anchor.unwrap_or(now);
        Takeover {
            term,
            state: Restored {
                anchor,
                subscriber_anchors: anchors.into_iter().collect(),
                mappings: st.mappings.into_values().collect(),
                last_seq: self.applied,
            },
            reset,
            was_in_sync: true,
        }
    }
}
