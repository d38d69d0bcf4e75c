//! Subscribers: the network attachment points that quotas and epochs are
//! kept for (RFC 7767 section 3.2: the server must identify the attachment
//! point unambiguously).

use std::fmt;
use std::net::IpAddr;

use crate::prefix::{canonical, mask};

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

/// How an internal address is turned into a subscriber.
///
/// Defaults: one IPv4 address per subscriber (a host, or a CPE behind which
/// a NAT hides the rest), and an IPv6 /56 (the customer prefix most
/// carriers delegate). Every internal address maps to exactly one key, so
/// the mapping is unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberKeying {
    /// Prefix length applied to IPv4 internal addresses (1..=32).
    pub ipv4_prefix_len: u8,
    /// Prefix length applied to IPv6 internal addresses (1..=128).
    pub ipv6_prefix_len: u8,
}

impl Default for SubscriberKeying {
    fn default() -> Self {
        SubscriberKeying {
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 56,
        }
    }
}

impl SubscriberKeying {
    /// The subscriber an internal address belongs to.
    pub fn subscriber_of(&self, ip: IpAddr) -> SubscriberId {
        let ip = canonical(ip);
        let len = match ip {
            IpAddr::V4(_) => self.ipv4_prefix_len.min(32),
            IpAddr::V6(_) => self.ipv6_prefix_len.min(128),
        };
        SubscriberId {
            addr: mask(ip, len),
            len,
        }
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
            ..k
        };
        assert_eq!(
            k24.subscriber_of("198.51.100.7".parse().unwrap()),
            k24.subscriber_of("198.51.100.200".parse().unwrap())
        );
    }
}
