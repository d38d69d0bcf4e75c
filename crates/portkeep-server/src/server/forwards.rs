//! Static port forwards: mappings the operator configures
//! (`ServerConfig::static_forwards`), for servers behind the NAT that
//! speak no PCP. They are ordinary MAP mappings in the one table (the
//! store, the dataplane, GET/NEXT and the backup see them as any other),
//! owned by [`STATIC_NONCE`], with three differences:
//!
//! - they never expire: when one reaches the end of its lifetime (the
//!   server's longest) the server renews it itself;
//! - no client may renew, take over or delete one, whatever nonce it
//!   sends (NOT_AUTHORIZED, RFC 6887 section 11.3; NAT-PMP's result 2);
//! - `clear` leaves them: they are configuration, not state a client
//!   made.
//!
//! They are followed by the backup (replicated, not check-pointed: no
//! class's quota or rate applies to the operator's own forwards), so a
//! takeover neither loses them nor counts them as volatile state whose
//! loss would reset the epoch of the host they point at.

use std::time::Duration;

use portkeep_proto::Nonce;

use super::{make_extra, Server};
use crate::change::{Change, RemoveReason};
use crate::config::StaticForward;
use crate::table::{Entry, Id};
use crate::Timestamp;

/// The nonce of every static forward. A client that sends it gains
/// nothing: static forwards are recognised before any nonce is compared.
pub const STATIC_NONCE: Nonce = *b"static-fwd\0\0";

impl Server {
    /// Whether entry `id` is a static forward.
    pub(crate) fn is_static(&self, id: Id) -> bool {
        self.table.get(id).is_some_and(|e| e.nonce == STATIC_NONCE)
    }

    /// Static forwards in the table now (the configured ones a client's
    /// mapping did not stand in the way of). Linear in the table: for the
    /// control interface, not the request path.
    pub fn static_forward_count(&self) -> usize {
        self.table
            .entries
            .iter()
            .filter(|(_, e)| e.nonce == STATIC_NONCE)
            .count()
    }

    /// Puts the configured forwards into the table when a node starts
    /// serving it ([`Server::restore`] and [`Server::restore_replica`] call
    /// it; a fresh start calls it after [`Server::new`]): those already
    /// there as configured are kept, static mappings no longer configured
    /// are removed, and a forward whose internal or external endpoint a
    /// client's mapping holds is not installed (the client keeps what it
    /// was granted); those are returned, for the daemon to say so.
    pub fn install_static_forwards(&mut self, now: Timestamp) -> Vec<StaticForward> {
        let wanted = self.cfg.static_forwards.clone();
        let stale: Vec<Id> = self
            .table
            .entries
            .iter()
            .filter(|(_, e)| e.nonce == STATIC_NONCE)
            .map(|(id, _)| id)
            .filter(|&id| {
                let Some(r) = self.record(id) else {
                    return true;
                };
                !wanted
                    .iter()
                    .any(|f| f.key() == r.key && f.external == r.external)
            })
            .collect();
        for id in stale {
            self.remove_entry(id, RemoveReason::Deleted);
        }
        let mut skipped = Vec::new();
        for f in wanted {
            if self
                .table
                .map_entry(&f.key())
                .is_some_and(|id| self.is_static(id))
            {
                continue;
            }
            if self.table.map_entry(&f.key()).is_some() {
                skipped.push(f);
                continue;
            }
            let Ok(binding) = self.table.bind_exact(f.key(), f.external) else {
                skipped.push(f);
                continue;
            };
            let lifetime = self.cfg.max_lifetime.max(1);
            let expires = now + Duration::from_secs(u64::from(lifetime));
            let id = self.table.insert(Entry {
                binding,
                nonce: STATIC_NONCE,
                expires,
                lifetime,
                checkpoint: false,
                replicated: true,
                third_party: false,
                extra: make_extra(
                    Vec::new(),
                    f.description.clone().map(String::into_boxed_str),
                    None,
                    None,
                ),
            });
            let sub = self.cfg.subscriber_keying.subscriber_of(f.internal.ip());
            self.subscriber_mut(sub).mappings += 1;
            self.count_in_class(sub, true);
            if let Some(r) = self.record(id) {
                self.push_upsert(r, true);
            }
        }
        skipped
    }

    /// Renews static forward `id` for another longest lifetime.
    pub(crate) fn renew_static(&mut self, now: Timestamp, id: Id) {
        let lifetime = self.cfg.max_lifetime.max(1);
        let expires = now + Duration::from_secs(u64::from(lifetime));
        self.table.update(id, |e| {
            e.expires = expires;
            e.lifetime = lifetime;
        });
        if let Some(r) = self.record(id) {
            self.push(Change::Upserted(r));
        }
    }
}
