//! A new configuration while serving (`portkeepd` SIGHUP, `ctl reload`).
//!
//! The state carries over as it does across a restart (`Server::restore`,
//! failure-scenarios draft section 2.6): every mapping keeps its external
//! endpoint, nonce and lifetime, every epoch continues, and the change log
//! goes on from where it was. What the new configuration no longer allows
//! ends exactly as a restore ends it:
//!
//! - a mapping on an external address removed from the pool ends
//!   (`RemoveReason::Cleared`); its subscriber's epoch resets and its host
//!   is owed an ANNOUNCE: it lost state (draft section 2.6.1);
//! - static forwards follow the new list;
//! - a lowered quota or a class change takes nothing away: mappings held
//!   beyond the new quota stay until they end, and new ones are refused
//!   until the subscriber is back under it (RFC 7767 section 3.2 decides
//!   each check-point at its next renewal).
//!
//! Changing how subscribers are keyed is refused: every subscriber's
//! identity, quota and epoch would move at once, which only a restart (and
//! its announcements) should do.

use super::{RestoreReport, Restored, Server};
use crate::{ServerConfig, Timestamp};

impl Server {
    /// Serves `cfg` from now on, with the state as it is (see the module
    /// documentation). `Err` names what cannot change while serving; the
    /// server is then unchanged.
    pub fn reconfigure(
        &mut self,
        now: Timestamp,
        cfg: ServerConfig,
    ) -> Result<RestoreReport, String> {
        if cfg.subscriber_keying != self.cfg.subscriber_keying {
            return Err(
                "[subscribers] prefix lengths and named subscribers cannot change while serving: restart"
                    .into(),
            );
        }
        let state = Restored {
            anchor: self.anchor,
            subscriber_anchors: self.subscriber_anchors(),
            mappings: self.mappings(),
            last_seq: self.seq,
            term: 0,
            owed: self.owed_announces(now),
            requesters: self.requesters(),
            holds: self.port_holds(),
        };
        // What was logged and not yet drained stays ahead of what the new
        // server logs.
        let pending: Vec<_> = self.log.drain(..).collect();
        let backup = self.backup;
        let stats = self.stats.clone();
        let mut announcer = std::mem::replace(
            &mut self.announcer,
            crate::announce::Announcer::new(cfg.announce),
        );
        announcer.set_config(cfg.announce);
        let (mut next, report) = Server::restore(cfg, now, state);
        next.backup = backup;
        next.stats = stats;
        // ANNOUNCEs under way go on (and the restore's own join them).
        for a in next.announcer.poll_all_scheduled() {
            announcer.schedule(now, a);
        }
        next.announcer = announcer;
        next.log.splice(0..0, pending);
        *self = next;
        Ok(report)
    }
}
