//! The server's own consistency, checked from outside: what the fuzz
//! target and the property tests assert after every step.

use std::collections::HashMap;
use std::net::IpAddr;

use super::Server;
use crate::{SubscriberId, Timestamp};

impl Server {
    /// Whether the table and every count kept beside it agree: the table's
    /// indices (the GET/NEXT order equal to the MAP entries, no external
    /// endpoint held twice), each subscriber's mapping and check-point
    /// counts against the entries and within its quotas (RFC 6887 section
    /// 17.2; RFC 7767 section 3.2), and the volatile state a backup is told
    /// of (failure-scenarios draft section 2.6.1) against the mappings
    /// that are not replicated, and each THIRD_PARTY client's counts and
    /// volatile end against the mappings it manages. Quotas are those of
    /// the configuration the mappings were granted under: a restore under
    /// lower quotas keeps what was granted, and fails this check. Linear in
    /// the table: for tests and fuzzing, not for the serving path. The
    /// error names the first disagreement.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check(true)
    }

    /// [`Server::check_invariants`] without the quotas: after
    /// [`Server::reconfigure`] lowered one, what was granted before may
    /// legitimately hold more.
    pub fn check_consistency(&self) -> Result<(), String> {
        self.check(false)
    }

    fn check(&self, quotas: bool) -> Result<(), String> {
        self.table.check()?;
        let keying = &self.cfg.subscriber_keying;
        let mut per_sub: HashMap<SubscriberId, (u32, u32)> = HashMap::new();
        let mut volatile: HashMap<SubscriberId, (Vec<IpAddr>, Vec<Timestamp>)> = HashMap::new();
        let mut managed: HashMap<IpAddr, (u32, Vec<Timestamp>)> = HashMap::new();
        let mut checkpointed = 0u32;
        for (_, e) in self.table.entries.iter() {
            let b = self
                .table
                .bindings
                .get(e.binding)
                .ok_or("an entry without a binding")?;
            let sub = keying.subscriber_of(b.key.internal_ip);
            let counts = per_sub.entry(sub).or_default();
            counts.0 += 1;
            if e.checkpoint {
                counts.1 += 1;
                checkpointed += 1;
            }
            if !e.replicated {
                let v = volatile.entry(sub).or_default();
                v.0.push(b.key.internal_ip);
                v.1.push(e.expires);
            }
            if let Some(m) = e.manager() {
                let r = managed.entry(m).or_default();
                r.0 += 1;
                if !e.replicated {
                    r.1.push(e.expires);
                }
            }
        }
        if quotas && self.table.len() > self.cfg.max_mappings as usize {
            return Err(format!(
                "{} mappings, more than max_mappings {}",
                self.table.len(),
                self.cfg.max_mappings
            ));
        }
        if checkpointed != self.checkpointed {
            return Err(format!(
                "{checkpointed} check-pointed mappings, counted {}",
                self.checkpointed
            ));
        }
        if quotas && checkpointed > self.cfg.checkpoint.max_mappings {
            return Err(format!(
                "{checkpointed} check-pointed mappings, more than the server's {}",
                self.cfg.checkpoint.max_mappings
            ));
        }
        let mut by_class = vec![0u64; self.cfg.checkpoint.classes.len()];
        for (sub, (n, _)) in &per_sub {
            if let Some(c) = by_class.get_mut(self.cfg.checkpoint.class_of(*sub)) {
                *c += u64::from(*n);
            }
        }
        if by_class != self.by_class {
            return Err(format!(
                "mappings by check-point class {by_class:?}, counted {:?}",
                self.by_class
            ));
        }
        for (sub, state) in &self.subscribers {
            let (n, cp) = per_sub.get(sub).copied().unwrap_or_default();
            if (state.mappings, state.checkpointed) != (n, cp) {
                return Err(format!(
                    "subscriber {sub:?} counts {} mappings ({} check-pointed), holds {n} ({cp})",
                    state.mappings, state.checkpointed
                ));
            }
        }
        for (sub, (n, cp)) in &per_sub {
            if !self.subscribers.contains_key(sub) {
                return Err(format!(
                    "subscriber {sub:?} holds {n} mappings but is not counted"
                ));
            }
            if quotas && *n > self.cfg.max_mappings_per_subscriber {
                return Err(format!(
                    "subscriber {sub:?} holds {n} mappings, more than its quota {}",
                    self.cfg.max_mappings_per_subscriber
                ));
            }
            // An `always` class's quota is the server's capacity (see
            // `policy::decide`); `max` binds only on-request grants.
            if let Some(max) = self
                .checkpoint_class_of(*sub)
                .filter(|_| quotas)
                .filter(|c| c.mode == crate::policy::CheckpointMode::OnRequest)
                .and_then(|c| c.max)
            {
                if *cp > max {
                    return Err(format!(
                        "subscriber {sub:?} holds {cp} check-pointed mappings, more than its class's {max}"
                    ));
                }
            }
        }
        for (sub, set) in &self.volatile {
            let Some((hosts, ends)) = volatile.get(sub) else {
                return Err(format!(
                    "subscriber {sub:?} has volatile state but no volatile mapping"
                ));
            };
            let mut counted: Vec<IpAddr> = set
                .hosts
                .iter()
                .flat_map(|(h, n)| std::iter::repeat_n(*h, *n as usize))
                .collect();
            let mut hosts = hosts.clone();
            counted.sort_unstable();
            hosts.sort_unstable();
            if counted != hosts {
                return Err(format!(
                    "subscriber {sub:?}'s volatile hosts differ from its mappings"
                ));
            }
            let kept = set.expiries.sorted();
            let mut ends = ends.clone();
            ends.sort_unstable();
            if kept != ends {
                return Err(format!(
                    "subscriber {sub:?}'s volatile ends differ from its mappings"
                ));
            }
            if set.expiries.latest() != ends.last().copied() {
                return Err(format!("subscriber {sub:?}'s latest volatile end is stale"));
            }
        }
        if let Some(sub) = volatile.keys().find(|s| !self.volatile.contains_key(*s)) {
            return Err(format!(
                "subscriber {sub:?}'s volatile mappings are not tracked"
            ));
        }
        for (ip, r) in &self.requesters {
            let (n, mut ends) = managed.get(ip).cloned().unwrap_or_default();
            if r.mappings != n {
                return Err(format!(
                    "THIRD_PARTY client {ip} counts {} mappings, manages {n}",
                    r.mappings
                ));
            }
            let kept = r.volatile.sorted();
            ends.sort_unstable();
            if kept != ends {
                return Err(format!(
                    "THIRD_PARTY client {ip}'s volatile ends differ from the mappings it manages"
                ));
            }
            if r.volatile.latest() != ends.last().copied() {
                return Err(format!(
                    "THIRD_PARTY client {ip}'s latest volatile end is stale"
                ));
            }
        }
        if let Some(ip) = managed.keys().find(|ip| !self.requesters.contains_key(*ip)) {
            return Err(format!(
                "THIRD_PARTY client {ip} manages mappings but is not tracked"
            ));
        }
        Ok(())
    }
}
