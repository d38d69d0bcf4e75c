//! Unsolicited ANNOUNCEs (RFC 6887 section 14.1.3): who is told, when, and
//! how often, as data. The server core schedules them after every loss it
//! sees; the driver sends what [`Announcer::poll`] says is due.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hashbrown::HashMap;

use crate::Timestamp;

/// Who an ANNOUNCE is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Audience {
    /// One client, by unicast (a host that lost state, or a THIRD_PARTY
    /// client that manages one), with the epoch that client sees.
    Client(IpAddr),
    /// Every client at once, with the server-wide epoch: multicast on the
    /// configured interfaces and unicast to the configured addresses
    /// (after a start or a promotion that lost every epoch).
    Everyone,
}

/// How ANNOUNCEs are repeated and paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Sends per announcement, the first included: RFC 6887 section
    /// 14.1.3 allows up to ten, the first two at least 250 ms apart and
    /// each later interval at least double the one before.
    pub sends: u8,
    /// Most ANNOUNCEs per second, server-wide. Those due beyond it wait
    /// their turn (never dropped): after a takeover that lost every epoch a
    /// large server owes one to every client at once, and a burst of
    /// hundreds of thousands of datagrams would be lost in the queues it
    /// overflows.
    pub rate: u32,
}

impl Default for AnnounceConfig {
    /// Four sends, over 1.75 s: enough against the loss of one or two,
    /// and done before a client's next exchanges could overtake a late
    /// one (a repeat delayed past a newer reply reads, to the section
    /// 8.5 check, as an epoch gone backwards).
    fn default() -> Self {
        AnnounceConfig {
            sends: 4,
            rate: 10_000,
        }
    }
}

/// The first interval between two sends.
const FIRST_INTERVAL_MS: u64 = 250;

#[derive(Debug, Clone, Copy)]
struct Series {
    due: Timestamp,
    left: u8,
    interval_ms: u64,
}

/// Scheduled ANNOUNCEs.
#[derive(Debug)]
pub struct Announcer {
    cfg: AnnounceConfig,
    /// By due time (and an order number, so two due at once both stay).
    queue: BTreeMap<(Timestamp, u64), Audience>,
    series: HashMap<Audience, (u64, Series)>,
    next: u64,
    /// The rate limit as a GCRA: the theoretical time of the next send,
    /// in microseconds; a send is allowed if it leaves that at most a
    /// second ahead of now (a burst of one second's worth).
    tat_us: u64,
}

impl Announcer {
    /// An announcer with nothing scheduled.
    pub fn new(cfg: AnnounceConfig) -> Announcer {
        Announcer {
            cfg: AnnounceConfig {
                sends: cfg.sends.clamp(1, 10),
                rate: cfg.rate.max(1),
            },
            queue: BTreeMap::new(),
            series: HashMap::new(),
            next: 0,
            tat_us: 0,
        }
    }

    /// Takes a new configuration; what is scheduled stays scheduled.
    pub fn set_config(&mut self, cfg: AnnounceConfig) {
        self.cfg = AnnounceConfig {
            sends: cfg.sends.clamp(1, 10),
            rate: cfg.rate.max(1),
        };
    }

    /// Starts a series of sends to `audience` at `now`; one already under
    /// way starts again (a new loss: the client must hear of this one
    /// too), except one whose first send still waits (for the rate): it
    /// keeps its place, and will say what is true when it leaves.
    pub fn schedule(&mut self, now: Timestamp, audience: Audience) {
        if let Some(&(n, s)) = self.series.get(&audience) {
            if s.left == self.cfg.sends && s.due <= now {
                return;
            }
            self.series.remove(&audience);
            self.queue.remove(&(s.due, n));
        }
        self.insert(
            audience,
            Series {
                due: now,
                left: self.cfg.sends,
                interval_ms: FIRST_INTERVAL_MS,
            },
        );
    }

    fn insert(&mut self, audience: Audience, s: Series) {
        let n = self.next;
        self.next += 1;
        self.queue.insert((s.due, n), audience);
        self.series.insert(audience, (n, s));
    }

    /// The ANNOUNCEs to send at `now`, in the order they fell due, within
    /// the rate; each goes on to its next send.
    pub fn poll(&mut self, now: Timestamp) -> Vec<Audience> {
        let mut out = Vec::new();
        let now_us = now.as_millis().saturating_mul(1000);
        let step_us = (1_000_000 / u64::from(self.cfg.rate)).max(1);
        while let Some((&(due, n), &audience)) = self.queue.first_key_value() {
            if due > now || self.tat_us.max(now_us) + step_us > now_us + 1_000_000 {
                break;
            }
            self.tat_us = self.tat_us.max(now_us) + step_us;
            self.queue.remove(&(due, n));
            let Some((_, mut s)) = self.series.remove(&audience) else {
                continue;
            };
            out.push(audience);
            s.left -= 1;
            if s.left > 0 {
                // Counted from this send, which a rate limit may have
                // delayed: the intervals never shrink.
                s.due = now + std::time::Duration::from_millis(s.interval_ms);
                s.interval_ms *= 2;
                self.insert(audience, s);
            }
        }
        out
    }

    /// When [`Announcer::poll`] next has something to send.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let (&(due, _), _) = self.queue.first_key_value()?;
        // Waiting for the rate: the next send is allowed once it leaves the
        // theoretical time at most a second ahead.
        let step_us = (1_000_000 / u64::from(self.cfg.rate)).max(1);
        let free = Timestamp(
            (self.tat_us + step_us)
                .saturating_sub(1_000_000)
                .div_ceil(1000),
        );
        Some(due.max(free))
    }

    /// Everyone something is scheduled for, dropping the schedule.
    pub fn poll_all_scheduled(&mut self) -> Vec<Audience> {
        self.queue.clear();
        self.series.drain().map(|(a, _)| a).collect()
    }

    /// Announcements scheduled (each series once).
    pub fn pending(&self) -> usize {
        self.series.len()
    }

    /// Drops everything scheduled (a node that stops serving tells no one).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.series.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp(1_000_000 + ms)
    }

    fn host(n: u8) -> Audience {
        Audience::Client(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn rfc6887_s14_1_3_repeats_at_intervals_that_double_from_250_ms() {
        let mut a = Announcer::new(AnnounceConfig {
            sends: 4,
            rate: 1000,
        });
        a.schedule(at(0), host(1));
        let mut sent = Vec::new();
        let mut t = at(0);
        for _ in 0..20 {
            for x in a.poll(t) {
                sent.push((t.as_millis() - at(0).as_millis(), x));
            }
            match a.poll_timeout() {
                Some(next) => t = next,
                None => break,
            }
        }
        let times: Vec<u64> = sent.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![0, 250, 750, 1750]);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn rfc6887_s14_1_3_a_new_loss_starts_the_series_again() {
        let mut a = Announcer::new(AnnounceConfig {
            sends: 3,
            rate: 1000,
        });
        a.schedule(at(0), host(1));
        assert_eq!(a.poll(at(0)), vec![host(1)]);
        assert_eq!(a.poll(at(250)), vec![host(1)]);
        a.schedule(at(300), host(1));
        assert_eq!(a.poll(at(300)), vec![host(1)]);
        assert_eq!(a.poll(at(549)), vec![]);
        assert_eq!(a.poll(at(550)), vec![host(1)]);
        assert_eq!(a.poll(at(1050)), vec![host(1)]);
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn a_first_send_waiting_for_the_rate_keeps_its_place() {
        let mut a = Announcer::new(AnnounceConfig { sends: 1, rate: 1 });
        for n in 0..3 {
            a.schedule(at(0), host(n));
        }
        assert_eq!(a.poll(at(0)), vec![host(0)]);
        // Host 1 loses state again while it waits: not sent to the back.
        a.schedule(at(500), host(1));
        assert_eq!(a.poll(at(1_000)), vec![host(1)]);
        assert_eq!(a.poll(at(2_000)), vec![host(2)]);
    }

    #[test]
    fn announcements_beyond_the_rate_wait_and_none_is_dropped() {
        let mut a = Announcer::new(AnnounceConfig { sends: 1, rate: 10 });
        for n in 0..35 {
            a.schedule(at(0), host(n));
        }
        // A second's worth at once, then one every 100 ms.
        let first = a.poll(at(0));
        assert_eq!(first.len(), 10);
        assert_eq!(a.poll(at(50)), vec![]);
        let mut sent = first.len();
        let mut t = at(0);
        let mut steps = 0;
        while let Some(next) = a.poll_timeout() {
            assert!(next > t, "the schedule moves forward");
            t = next;
            sent += a.poll(t).len();
            steps += 1;
        }
        assert_eq!(sent, 35);
        assert_eq!(steps, 25);
        assert_eq!(t, at(2_500));
    }
}
