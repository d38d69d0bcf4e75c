//! Check-pointing policy (RFC 7767): whether "resources are available for
//! check-pointing" a mapping, decided per request, sans-IO.
//!
//! RFC 7767 section 3.2: "Administration SHOULD restrict the number of
//! connections that can be elected to be backed up and the rate of
//! check-pointing per network attachment point", and when "there are no
//! resources available for check-pointing, but there are resources
//! available to honor the MAP or PEER request", the request is processed
//! as if the option were absent. Section 4 (example 2) describes gold,
//! silver and bronze subscriptions; section 5 lets the network override
//! the client. This module holds the configuration and the pure pieces of
//! that decision (classes, the token bucket, the refusal reasons); the
//! per-subscriber state lives with the subscriber in the server core.
//!
//! The checks run in this order, and the first that fails is the reason
//! counted:
//!
//! 1. [`RefusalReason::Policy`]: the subscriber's class says `never`;
//! 2. [`RefusalReason::Capacity`]: the server holds its configured maximum
//!    of check-pointed mappings;
//! 3. [`RefusalReason::SubscriberQuota`]: the subscriber holds its class's
//!    maximum;
//! 4. [`RefusalReason::Rate`]: the subscriber's token bucket is empty;
//! 5. [`RefusalReason::NoBackup`]: there is no backup in sync to
//!    check-point to ([`BackupState`]).

use std::fmt;
use std::time::Duration;

use crate::prefix::Prefix;
use crate::{SubscriberId, Timestamp};

/// What a class does with CHECKPOINT_REQUIRED (RFC 7767 section 4,
/// example 2; section 5: the operator's policy wins over the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Every mapping of the class is check-pointed, requested or not
    /// ("gold"). Only the server's capacity and the backup can prevent it.
    Always,
    /// Mappings are check-pointed when the client asks, within the class's
    /// quota and rate ("silver").
    OnRequest,
    /// Never check-pointed ("bronze"): requests are refused for policy.
    Never,
}

impl CheckpointMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Always => "always",
            CheckpointMode::OnRequest => "on-request",
            CheckpointMode::Never => "never",
        }
    }
}

impl fmt::Display for CheckpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rate of check-point requests: `count` per `per` (e.g. 1/s, 10/min),
/// with up to `burst` at once (RFC 7767 section 3.2: "the rate of
/// check-pointing per network attachment point").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per `per`.
    pub count: u32,
    /// The period.
    pub per: Duration,
    /// Requests allowed back to back when the bucket is full (at least 1).
    pub burst: u32,
}

impl RateLimit {
    /// Microseconds between two tokens (at least 1).
    fn interval_us(&self) -> u64 {
        let per = u64::try_from(self.per.as_micros()).unwrap_or(u64::MAX);
        (per / u64::from(self.count.max(1))).max(1)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => return write!(f, "{}/{}s", self.count, self.per.as_secs()),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// A token bucket as a generic cell rate algorithm: one timestamp per
/// subscriber (the "theoretical arrival time"), no floating point, no
/// clock reads. A request at `now` is allowed when, after adding one
/// interval, the TAT is no more than `burst` intervals ahead of `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TokenBucket {
    /// Theoretical arrival time in microseconds on the caller's clock; 0
    /// (or anything in the past) means the bucket is full.
    tat_us: u64,
}

impl TokenBucket {
    /// Takes a token at `now` if one is available.
    pub(crate) fn take(&mut self, now: Timestamp, limit: &RateLimit) -> bool {
        let now_us = now.as_millis().saturating_mul(1000);
        let t = limit.interval_us();
        let next = self.tat_us.max(now_us).saturating_add(t);
        if next - now_us > t.saturating_mul(u64::from(limit.burst.max(1))) {
            return false;
        }
        self.tat_us = next;
        true
    }

    /// Whether the bucket has refilled completely by `now` (its state can
    /// then be forgotten without handing the subscriber extra tokens).
    pub(crate) fn is_full(&self, now: Timestamp) -> bool {
        self.tat_us <= now.as_millis().saturating_mul(1000)
    }
}

/// A named class of subscribers (RFC 7767 section 4, example 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointClass {
    /// The class's name, as configured ("gold").
    pub name: String,
    /// What the class does with requests.
    pub mode: CheckpointMode,
    /// Check-pointed mappings one subscriber of this class may hold
    /// (`None`: no per-subscriber limit). Only for [`CheckpointMode::OnRequest`].
    pub max: Option<u32>,
    /// Check-point requests one subscriber may make (`None`: unlimited).
    /// Only for [`CheckpointMode::OnRequest`].
    pub rate: Option<RateLimit>,
}

/// The operator's check-pointing policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Check-pointed mappings the whole server may hold (the backup's
    /// capacity).
    pub max_mappings: u32,
    /// The classes; indexes into this are what subscribers carry.
    pub classes: Vec<CheckpointClass>,
    /// The class of subscribers no assignment matches.
    pub default_class: usize,
    /// Subscriber prefixes and their classes. The longest prefix that
    /// contains the subscriber's whole prefix wins.
    pub assign: Vec<(Prefix, usize)>,
}

impl Default for CheckpointPolicy {
    /// One class, `default`: on request, 64 check-pointed mappings per
    /// subscriber, 10 requests/s with a burst of 20; 100,000 check-pointed
    /// mappings in all. RFC 7767 section 3.2 says administration SHOULD
    /// restrict both number and rate, so even the default does.
    fn default() -> Self {
        CheckpointPolicy {
            max_mappings: 100_000,
            classes: vec![CheckpointClass {
                name: "default".to_owned(),
                mode: CheckpointMode::OnRequest,
                max: Some(64),
                rate: Some(RateLimit {
                    count: 10,
                    per: Duration::from_secs(1),
                    burst: 20,
                }),
            }],
            default_class: 0,
            assign: Vec::new(),
        }
    }
}

impl CheckpointPolicy {
    /// The class index of a subscriber: the longest assigned prefix that
    /// contains the subscriber's whole prefix, else the default class. A
    /// class is a property of the subscriber, never of one of its
    /// addresses, so one subscriber never has two classes (and one quota
    /// is never split between classes).
    pub fn class_of(&self, sub: SubscriberId) -> usize {
        self.assign
            .iter()
            .filter(|(p, _)| p.len() <= sub.prefix_len() && p.contains(sub.addr()))
            .max_by_key(|(p, _)| p.len())
            .map_or(self.default_class, |&(_, c)| c)
            .min(self.classes.len().saturating_sub(1))
    }

    /// The class at `index`, if any.
    pub fn class(&self, index: usize) -> Option<&CheckpointClass> {
        self.classes.get(index)
    }
}

/// The state of the link to the backup, as the HA layer reports it. Only
/// a backup that is connected and in sync can receive check-pointed
/// state, so only [`BackupState::InSync`] lets a request be honoured
/// (RFC 7767 section 3.2: honoured means the state is protected; it is
/// RECOMMENDED to check-point on the backup before answering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackupState {
    /// No backup configured: nowhere to check-point to.
    #[default]
    Standalone,
    /// A backup is configured but not connected.
    Disconnected,
    /// Connected, catching up; not yet able to take over.
    Syncing,
    /// Connected and in sync.
    InSync,
}

impl BackupState {
    /// The name used in logs and the control interface.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Standalone => "standalone",
            BackupState::Disconnected => "disconnected",
            BackupState::Syncing => "syncing",
            BackupState::InSync => "in_sync",
        }
    }
}

/// Why a check-point was not granted. The names are stable: they are the
/// keys of the control interface's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The subscriber's class never check-points (RFC 7767 section 5:
    /// the network may refuse regardless of the client).
    Policy,
    /// The server holds its maximum of check-pointed mappings.
    Capacity,
    /// The subscriber holds its class's maximum (RFC 7767 section 3.2:
    /// "the quota for this PCP client").
    SubscriberQuota,
    /// The subscriber asks too often (RFC 7767 section 3.2: "the rate of
    /// check-pointing per network attachment point").
    Rate,
    /// No backup in sync to check-point to.
    NoBackup,
}

impl RefusalReason {
    /// Every reason, in evaluation order.
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::Policy,
        RefusalReason::Capacity,
        RefusalReason::SubscriberQuota,
        RefusalReason::Rate,
        RefusalReason::NoBackup,
    ];

    /// The stable counter name.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Policy => "policy",
            RefusalReason::Capacity => "capacity",
            RefusalReason::SubscriberQuota => "subscriber_quota",
            RefusalReason::Rate => "rate",
            RefusalReason::NoBackup => "no_backup",
        }
    }

    fn index(self) -> usize {
        match self {
            RefusalReason::Policy => 0,
            RefusalReason::Capacity => 1,
            RefusalReason::SubscriberQuota => 2,
            RefusalReason::Rate => 3,
            RefusalReason::NoBackup => 4,
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of check-point decisions. `granted` and `refused` count MAP
/// and PEER requests (not deletes) that carried CHECKPOINT_REQUIRED, each
/// exactly once; `forced` counts mappings an `always` class check-pointed
/// although the request did not ask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Requests honoured (option echoed).
    pub granted: u64,
    refused: [u64; 5],
    /// Mappings check-pointed by an `always` class without the option.
    pub forced: u64,
}

impl CheckpointStats {
    /// Requests refused for `reason`.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused[reason.index()]
    }

    /// Requests refused for any reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    pub(crate) fn count_refusal(&mut self, reason: RefusalReason) {
        self.refused[reason.index()] += 1;
    }
}

/// The per-subscriber facts the decision needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask {
    /// The request carried CHECKPOINT_REQUIRED.
    pub(crate) requested: bool,
    /// The mapping is already check-pointed: it holds its slot in the
    /// server's capacity and the subscriber's quota, and a periodic renewal
    /// is not a new check-point, so capacity, quota and rate are not
    /// charged again (otherwise a client's own renewals could cost it the
    /// protection it was granted).
    pub(crate) already: bool,
    /// Check-pointed mappings the server holds.
    pub(crate) server_held: u32,
    /// Check-pointed mappings the subscriber holds.
    pub(crate) subscriber_held: u32,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Neither asked for nor forced by policy: nothing to decide.
    NotWanted,
    /// Check-point the mapping.
    Grant,
    /// Do not; the request is processed as if the option were absent
    /// (RFC 7767 section 3.2).
    Refuse(RefusalReason),
}

/// RFC 7767 section 3.2: "the PCP server checks if it can honor this
/// request depending on whether resources are available for
/// check-pointing", in the order of the module documentation. Takes a
/// token from `bucket` when the rate check is reached and passes, so the
/// rate counts check-point requests, whether or not the backup can then
/// take them.
pub(crate) fn decide(
    policy: &CheckpointPolicy,
    class: &CheckpointClass,
    backup: BackupState,
    ask: Ask,
    bucket: &mut TokenBucket,
    now: Timestamp,
) -> Decision {
    // Section 5: the operator's policy decides first.
    match class.mode {
        CheckpointMode::Never if ask.requested => {
            return Decision::Refuse(RefusalReason::Policy);
        }
        CheckpointMode::Never => return Decision::NotWanted,
        CheckpointMode::OnRequest if !ask.requested => return Decision::NotWanted,
        CheckpointMode::OnRequest | CheckpointMode::Always => {}
    }
    if !ask.already {
        if ask.server_held >= policy.max_mappings {
            return Decision::Refuse(RefusalReason::Capacity);
        }
        // An `always` class is the operator's own election: its quota is
        // the server's capacity, and it is not rate limited.
        if class.mode == CheckpointMode::OnRequest {
            if class.max.is_some_and(|max| ask.subscriber_held >= max) {
                return Decision::Refuse(RefusalReason::SubscriberQuota);
            }
            if let Some(rate) = &class.rate {
                if !bucket.take(now, rate) {
                    return Decision::Refuse(RefusalReason::Rate);
                }
            }
        }
    }
    if backup != BackupState::InSync {
        return Decision::Refuse(RefusalReason::NoBackup);
    }
    Decision::Grant
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(count: u32, burst: u32) -> RateLimit {
        RateLimit {
            count,
            per: Duration::from_secs(1),
            burst,
        }
    }

    #[test]
    fn rfc7767_s3_2_token_bucket_allows_burst_then_rate() {
        let limit = per_second(1, 4);
        let mut b = TokenBucket::default();
        let t0 = Timestamp(10_000);
        for _ in 0..4 {
            assert!(b.take(t0, &limit));
        }
        assert!(!b.take(t0, &limit), "burst spent");
        assert!(!b.take(Timestamp(10_999), &limit));
        assert!(b.take(Timestamp(11_000), &limit), "one token per second");
        assert!(!b.take(Timestamp(11_000), &limit));
        assert!(!b.is_full(Timestamp(11_000)));
        assert!(b.is_full(Timestamp(15_000)));
        for _ in 0..4 {
            assert!(b.take(Timestamp(15_000), &limit), "refilled to the burst");
        }
        assert!(!b.take(Timestamp(15_000), &limit));
    }

    #[test]
    fn rfc7767_s3_2_token_bucket_per_minute() {
        let limit = RateLimit {
            count: 10,
            per: Duration::from_secs(60),
            burst: 1,
        };
        let mut b = TokenBucket::default();
        assert!(b.take(Timestamp(0), &limit));
        assert!(!b.take(Timestamp(5_999), &limit));
        assert!(b.take(Timestamp(6_000), &limit));
        assert_eq!(limit.to_string(), "10/min");
    }

    #[test]
    fn rfc7767_s4_class_is_the_longest_prefix_covering_the_subscriber() {
        let mut p = CheckpointPolicy::default();
        p.classes.push(CheckpointClass {
            name: "gold".into(),
            mode: CheckpointMode::Always,
            max: None,
            rate: None,
        });
        p.classes.push(CheckpointClass {
            name: "bronze".into(),
            mode: CheckpointMode::Never,
            max: None,
            rate: None,
        });
        p.assign = vec![
            ("198.51.100.0/24".parse().unwrap(), 1),
            ("198.51.100.128/25".parse().unwrap(), 2),
        ];
        let k = crate::SubscriberKeying::default();
        let sub = |s: &str| k.subscriber_of(s.parse().unwrap());
        assert_eq!(p.class_of(sub("198.51.100.7")), 1);
        assert_eq!(p.class_of(sub("198.51.100.200")), 2);
        assert_eq!(p.class_of(sub("203.0.113.1")), 0);
        // A /24 subscriber is not split by the /25: only prefixes that
        // contain the whole subscriber count.
        let k24 = crate::SubscriberKeying {
            ipv4_prefix_len: 24,
            ..crate::SubscriberKeying::default()
        };
        assert_eq!(
            p.class_of(k24.subscriber_of("198.51.100.200".parse().unwrap())),
            1
        );
    }
}
