//! The binary form of a mapping, shared by the store and the replication
//! link so that a stored record and a replicated one are the same bytes.
//!
//! Versioned and read with bounds checks: any malformed input decodes to
//! `None`, never a panic.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::{from_wire, to_wire};
use portkeep_proto::Protocol;

use crate::{
    FilterRule, MappingKey, MappingKind, MappingRecord, Prefix, SubscriberId, SubscriberKeying,
    Timestamp,
};

/// Version byte that starts every encoded mapping without a
/// [manager](MappingRecord::manager).
pub const RECORD_VERSION: u8 = 1;

/// Version byte of a mapping with a manager: version 1 followed by the
/// manager's address. A mapping without one is still written as version
/// 1, so readers of version 1 read every record they could before.
pub const RECORD_VERSION_MANAGER: u8 = 2;

/// The key of a mapping: its identity (RFC 6887 sections 11.1 and 12.1).
pub fn key_of(m: &MappingRecord) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    match m.kind {
        MappingKind::Map => k.push(0),
        MappingKind::Peer { .. } => k.push(1),
    }
    k.extend_from_slice(&to_wire(m.key.internal_ip).octets());
    k.push(m.key.protocol.0);
    k.extend_from_slice(&m.key.internal_port.to_be_bytes());
    if let MappingKind::Peer { remote } = m.kind {
        k.extend_from_slice(&to_wire(remote.ip()).octets());
        k.extend_from_slice(&remote.port().to_be_bytes());
    }
    k
}

pub fn encode_mapping(m: &MappingRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(96);
    v.push(if m.manager.is_some() {
        RECORD_VERSION_MANAGER
    } else {
        RECORD_VERSION
    });
    v.extend_from_slice(&key_of(m));
    v.extend_from_slice(&to_wire(m.external.ip()).octets());
    v.extend_from_slice(&m.external.port().to_be_bytes());
    v.extend_from_slice(&m.nonce);
    v.extend_from_slice(&m.expires.as_millis().to_be_bytes());
    v.extend_from_slice(&m.lifetime.to_be_bytes());
    // Bit 2 (followed) was added in a compatible way: records written
    // before it read as not followed.
    v.push(u8::from(m.checkpoint) | (u8::from(m.third_party) << 1) | (u8::from(m.followed) << 2));
    // Bounded by the server's filter limit, far below 255.
    v.push(u8::try_from(m.filters.len()).unwrap_or(u8::MAX));
    for f in m.filters.iter().take(255) {
        v.extend_from_slice(&to_wire(f.prefix.addr()).octets());
        v.push(f.prefix.len());
        v.extend_from_slice(&f.port.to_be_bytes());
    }
    let d = m.description.as_deref().unwrap_or("").as_bytes();
    // A DESCRIPTION fits in a 1100-octet message.
    let d = &d[..d.len().min(usize::from(u16::MAX))];
    v.extend_from_slice(&(d.len() as u16).to_be_bytes());
    v.extend_from_slice(d);
    if let Some(ip) = m.manager {
        v.extend_from_slice(&to_wire(ip).octets());
    }
    v
}

/// Bounds-checked reading; `None` means malformed.
#[derive(Debug)]
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn ip(&mut self) -> Option<IpAddr> {
        let b: [u8; 16] = self.take(16)?.try_into().ok()?;
        Some(from_wire(Ipv6Addr::from(b)))
    }
}

pub fn decode_mapping(v: &[u8], keying: &SubscriberKeying) -> Option<MappingRecord> {
    let mut r = Reader(v);
    let version = r.u8()?;
    if version != RECORD_VERSION && version != RECORD_VERSION_MANAGER {
        return None;
    }
    let kind = r.u8()?;
    let internal_ip = r.ip()?;
    let protocol = Protocol(r.u8()?);
    let internal_port = r.u16()?;
    let kind = match kind {
        0 => MappingKind::Map,
        1 => {
            let ip = r.ip()?;
            MappingKind::Peer {
                remote: SocketAddr::new(ip, r.u16()?),
            }
        }
        _ => return None,
    };
    let ext_ip = r.ip()?;
    let external = SocketAddr::new(ext_ip, r.u16()?);
    let nonce: [u8; 12] = r.take(12)?.try_into().ok()?;
    let expires = Timestamp(r.u64()?);
    let lifetime = r.u32()?;
    let flags = r.u8()?;
    let nfilters = r.u8()?;
    let mut filters = Vec::with_capacity(usize::from(nfilters));
    for _ in 0..nfilters {
        let ip = r.ip()?;
        let len = r.u8()?;
        let port = r.u16()?;
        filters.push(FilterRule {
            prefix: Prefix::new(ip, len).ok()?,
            port,
        });
    }
    let dlen = usize::from(r.u16()?);
    let d = r.take(dlen)?;
    let manager = if version == RECORD_VERSION_MANAGER {
        Some(r.ip()?)
    } else {
        None
    };
    if !r.0.is_empty() {
        return None;
    }
    let description = if d.is_empty() {
        None
    } else {
        Some(std::str::from_utf8(d).ok()?.to_owned())
    };
    Some(MappingRecord {
        kind,
        key: MappingKey {
            internal_ip,
            protocol,
            internal_port,
        },
        external,
        nonce,
        expires,
        lifetime,
        checkpoint: flags & 1 != 0,
        filters,
        description,
        subscriber: keying.subscriber_of(internal_ip),
        third_party: flags & 2 != 0,
        followed: flags & 4 != 0,
        manager,
    })
}

pub fn encode_subscriber(s: &SubscriberId) -> Vec<u8> {
    let mut v = to_wire(s.addr()).octets().to_vec();
    v.push(s.prefix_len());
    v
}

pub fn decode_subscriber(b: &[u8]) -> Option<SubscriberId> {
    let mut r = Reader(b);
    let ip = r.ip()?;
    let len = r.u8()?;
    r.0.is_empty().then(|| SubscriberId::from_parts(ip, len))
}

/// A THIRD_PARTY requester's state as stored and replicated: port (2
/// octets), flags (bit 0 volatile, bit 1 anchored, bit 2 the volatile
/// state's end follows), anchor (8 octets, milliseconds; 0 when not
/// anchored), and, when it holds volatile state, when that ends (8
/// octets, milliseconds).
pub fn encode_requester(s: &crate::RequesterState) -> Vec<u8> {
    let mut v = encode_requester_v1(s).to_vec();
    if let Some(t) = s.volatile_until {
        v[2] |= 4;
        v.extend_from_slice(&t.as_millis().to_be_bytes());
    }
    v
}

/// [`encode_requester`] as readers older than the volatile state's end
/// read it: 11 octets, no end (they take volatile state as lasting).
pub fn encode_requester_v1(s: &crate::RequesterState) -> [u8; 11] {
    let mut v = [0u8; 11];
    v[..2].copy_from_slice(&s.port.to_be_bytes());
    v[2] = u8::from(s.volatile_until.is_some()) | (u8::from(s.anchor.is_some()) << 1);
    v[3..].copy_from_slice(&s.anchor.map_or(0, |a| a.as_millis()).to_be_bytes());
    v
}

/// Reads what [`encode_requester`] or [`encode_requester_v1`] wrote;
/// `None` if malformed. Volatile state of unknown end is taken to last
/// ([`crate::RequesterState::volatile_until`]): a takeover then resets the
/// requester's epoch, as it did before ends were recorded.
pub fn decode_requester(b: &[u8]) -> Option<crate::RequesterState> {
    let mut r = Reader(b);
    let port = r.u16()?;
    let flags = r.u8()?;
    let anchor = r.u64()?;
    let volatile = flags & 1 != 0;
    let volatile_until = match (volatile, flags & 4 != 0) {
        (true, true) => Some(Timestamp(r.u64()?)),
        (true, false) => Some(Timestamp(u64::MAX)),
        (false, false) => None,
        (false, true) => return None,
    };
    if !r.0.is_empty() || flags > 7 {
        return None;
    }
    Some(crate::RequesterState {
        port,
        anchor: (flags & 2 != 0).then_some(Timestamp(anchor)),
        volatile_until,
    })
}

/// The key of a [`crate::PortHold`]: the endpoint held, protocol (1
/// octet), address (16) and port (2), so a later hold on it replaces the
/// earlier one.
pub fn hold_key(h: &crate::PortHold) -> [u8; 19] {
    let mut k = [0u8; 19];
    k[0] = h.owner.protocol.0;
    k[1..17].copy_from_slice(&to_wire(h.external.ip()).octets());
    k[17..].copy_from_slice(&h.external.port().to_be_bytes());
    k
}

/// A [`crate::PortHold`] after its [`hold_key`]: until when (8 octets,
/// milliseconds), the owner's internal address (16) and port (2), its
/// nonce (12).
pub fn encode_hold(h: &crate::PortHold) -> [u8; 38] {
    let mut v = [0u8; 38];
    v[..8].copy_from_slice(&h.until.as_millis().to_be_bytes());
    v[8..24].copy_from_slice(&to_wire(h.owner.internal_ip).octets());
    v[24..26].copy_from_slice(&h.owner.internal_port.to_be_bytes());
    v[26..].copy_from_slice(&h.nonce);
    v
}

/// Reads a hold from its key and value; `None` if either is malformed.
pub fn decode_hold(key: &[u8], value: &[u8]) -> Option<crate::PortHold> {
    let mut k = Reader(key);
    let protocol = Protocol(k.u8()?);
    let ext_ip = k.ip()?;
    let ext_port = k.u16()?;
    let mut v = Reader(value);
    let until = Timestamp(v.u64()?);
    let internal_ip = v.ip()?;
    let internal_port = v.u16()?;
    let nonce: [u8; 12] = v.take(12)?.try_into().ok()?;
    if !k.0.is_empty() || !v.0.is_empty() {
        return None;
    }
    Some(crate::PortHold {
        owner: MappingKey {
            internal_ip,
            protocol,
            internal_port,
        },
        nonce,
        external: SocketAddr::new(ext_ip, ext_port),
        until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequesterState;

    #[test]
    fn rfc6887_s15_hold_records_round_trip_and_malformed_ones_are_refused() {
        let h = crate::PortHold {
            owner: MappingKey {
                internal_ip: "10.0.0.1".parse().unwrap(),
                protocol: Protocol::TCP,
                internal_port: 80,
            },
            nonce: [3; 12],
            external: "192.0.2.1:20000".parse().unwrap(),
            until: Timestamp(1_234_567),
        };
        let (k, v) = (hold_key(&h), encode_hold(&h));
        assert_eq!(decode_hold(&k, &v), Some(h));
        assert_eq!(decode_hold(&k[..18], &v), None);
        assert_eq!(decode_hold(&k, &v[..37]), None);
        let mut long = v.to_vec();
        long.push(0);
        assert_eq!(decode_hold(&k, &long), None);
    }

    #[test]
    fn requester_records_round_trip_and_old_ones_read_as_lasting() {
        let states = [
            RequesterState {
                port: 41_000,
                anchor: Some(Timestamp(9)),
                volatile_until: Some(Timestamp(70_000)),
            },
            RequesterState {
                port: 1,
                anchor: None,
                volatile_until: None,
            },
        ];
        for st in states {
            let v = encode_requester(&st);
            assert_eq!(decode_requester(&v), Some(st));
            for cut in 1..v.len() {
                assert_eq!(decode_requester(&v[..cut]), None, "cut at {cut}");
            }
        }
        // Written before the end was recorded: volatile, of unknown end.
        let old = encode_requester_v1(&states[0]);
        assert_eq!(
            decode_requester(&old).map(|s| s.volatile_until),
            Some(Some(Timestamp(u64::MAX)))
        );
        assert_eq!(
            decode_requester(&encode_requester_v1(&states[1])),
            Some(states[1])
        );
        // An end without the volatile flag is malformed.
        let mut bad = encode_requester(&states[0]);
        bad[2] &= !1;
        assert_eq!(decode_requester(&bad), None);
    }
}
