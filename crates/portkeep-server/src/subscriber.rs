//! Subscribers: the network attachment points that quotas and epochs are
//! kept for (RFC 7767 section 3.2: the server must identify the attachment
//! point unambiguously).

use std::fmt;
use std::net::IpAddr;

use crate::prefix::{canonical, mask, Prefix};

/// A subscriber, identified by the prefix its internal addresses fall in.
///
/// IPv4 and IPv6 keys are distinct variants, so a v4 subscriber can never
/// be confused with the IPv6 prefix that holds `::ffff:0:0/96`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId {
    addr: IpAddr,
    len: u8,
}

impl SubscriberId {
    /// A subscriber from its stored parts (the prefix it stands for), as
    /// written by [`SubscriberId::addr`] and [`SubscriberId::prefix_len`].
    pub fn from_parts(addr: IpAddr, len: u8) -> SubscriberId {
        let addr = canonical(addr);
        let len = if addr.is_ipv4() {
            len.min(32)
        } else {
            len.min(128)
        };
        SubscriberId {
            addr: mask(addr, len),
            len,
        }
    }

    /// The subscriber's prefix address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The subscriber's prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl fmt::Display for SubscriberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for SubscriberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A subscriber the operator named: every internal address in `prefix`
/// (unless a longer named prefix holds it) is this one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSubscriber {
    /// The addresses of the subscriber (host bits clear).
    pub prefix: Prefix,
    /// The operator's name for it ("cust-42"), for display.
    pub name: String,
}

/// How an internal address is turned into a subscriber.
///
/// Defaults: one IPv4 address per subscriber (a host, or a CPE behind which
/// a NAT hides the rest), and an IPv6 /56 (the customer prefix most
/// carriers delegate). An explicit table of named prefixes comes first
/// (longest match wins); addresses outside it fall back to the prefix
/// lengths. Every internal address maps to exactly one key, so the mapping
/// is unambiguous (RFC 7767 section 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberKeying {
    /// Prefix length applied to IPv4 internal addresses (1..=32).
    pub ipv4_prefix_len: u8,
    /// Prefix length applied to IPv6 internal addresses (1..=128).
    pub ipv6_prefix_len: u8,
    /// Named subscribers; no two entries may have the same prefix.
    pub named: Vec<NamedSubscriber>,
}

impl Default for SubscriberKeying {
    fn default() -> Self {
        SubscriberKeying {
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 56,
            named: Vec::new(),
        }
    }
}

impl SubscriberKeying {
    /// The subscriber an internal address belongs to: the longest named
    /// prefix holding it, else the address masked to the family's length.
    pub fn subscriber_of(&self, ip: IpAddr) -> SubscriberId {
        let ip = canonical(ip);
        if !self.named.is_empty() {
            if let Some(n) = self
                .named
                .iter()
                .filter(|n| n.prefix.contains(ip))
                .max_by_key(|n| n.prefix.len())
            {
                return SubscriberId {
                    addr: n.prefix.addr(),
                    len: n.prefix.len(),
                };
            }
        }
        let len = match ip {
            IpAddr::V4(_) => self.ipv4_prefix_len.min(32),
            IpAddr::V6(_) => self.ipv6_prefix_len.min(128),
        };
        SubscriberId {
            addr: mask(ip, len),
            len,
        }
    }

    /// The subscriber the table names `name`, if any.
    pub fn subscriber_named(&self, name: &str) -> Option<SubscriberId> {
        self.named
            .iter()
            .find(|n| n.name == name)
            .map(|n| SubscriberId {
                addr: n.prefix.addr(),
                len: n.prefix.len(),
            })
    }

    /// The operator's name for a subscriber of the table, if it is one.
    pub fn name_of(&self, sub: SubscriberId) -> Option<&str> {
        self.named
            .iter()
            .find(|n| n.prefix.addr() == sub.addr && n.prefix.len() == sub.len)
            .map(|n| n.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7767_s3_2_attachment_point_is_unambiguous() {
        let k = SubscriberKeying::default();
        let a = k.subscriber_of("2001:db8:0:1a0::1".parse().unwrap());
        let b = k.subscriber_of("2001:db8:0:1ff:abcd::9".parse().unwrap());
        let c = k.subscriber_of("2001:db8:0:200::1".parse().unwrap());
        assert_eq!(a, b, "same /56");
        assert_ne!(a, c);
        let v4 = k.subscriber_of("198.51.100.7".parse().unwrap());
        let mapped = k.subscriber_of("::ffff:198.51.100.7".parse().unwrap());
        assert_eq!(v4, mapped);
        assert_eq!(v4.to_string(), "198.51.100.7/32");
        let k24 = SubscriberKeying {
            ipv4_prefix_len: 24,
            ..k.clone()
        };
        assert_eq!(
            k24.subscriber_of("198.51.100.7".parse().unwrap()),
            k24.subscriber_of("198.51.100.200".parse().unwrap())
        );
    }

    #[test]
    fn rfc7767_s3_2_named_table_longest_match_then_prefix_length() {
        let n = |p: &str, name: &str| NamedSubscriber {
            prefix: p.parse().unwrap(),
            name: name.to_owned(),
        };
        let k = SubscriberKeying {
            named: vec![
                n("198.51.100.0/24", "cust-42"),
                n("198.51.100.128/25", "cust-43"),
                n("2001:db8:aa00::/40", "big"),
            ],
            ..SubscriberKeying::default()
        };
        let of = |s: &str| k.subscriber_of(s.parse().unwrap());
        assert_eq!(of("198.51.100.1"), of("198.51.100.127"));
        assert_eq!(of("198.51.100.1").to_string(), "198.51.100.0/24");
        assert_eq!(k.name_of(of("198.51.100.1")), Some("cust-42"));
        assert_eq!(k.name_of(of("198.51.100.200")), Some("cust-43"));
        // By name, even where a longer named prefix holds the network address.
        let k2 = SubscriberKeying {
            named: vec![n("10.0.0.0/8", "outer"), n("10.0.0.0/16", "inner")],
            ..SubscriberKeying::default()
        };
        assert_eq!(
            k2.subscriber_named("outer").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            k2.subscriber_of("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.0/16"
        );
        assert_eq!(k2.subscriber_named("nobody"), None);
        assert_ne!(of("198.51.100.1"), of("198.51.100.200"));
        assert_eq!(of("::ffff:198.51.100.1"), of("198.51.100.1"));
        assert_eq!(of("2001:db8:aa12::1"), of("2001:db8:aaff::1"));
        // Outside the table: the prefix-length rule.
        assert_eq!(of("203.0.113.9").to_string(), "203.0.113.9/32");
        assert_eq!(k.name_of(of("203.0.113.9")), None);
    }
}
