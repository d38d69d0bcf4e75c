//! Where mappings take effect: the packet-forwarding side of the NAT.

use hashbrown::HashMap;
use std::net::SocketAddr;

use portkeep_proto::Protocol;

use crate::change::{Change, ChangeRecord, MappingKind};

/// Why the dataplane could not apply a batch of changes.
#[derive(Debug, thiserror::Error)]
#[error("dataplane {dataplane}: {message}")]
pub struct DataplaneError {
    /// Which dataplane.
    pub dataplane: &'static str,
    /// What failed, including the failing statement where there is one.
    pub message: String,
    /// Sequence numbers of the changes that did not take effect (the rest
    /// of the batch did).
    pub failed: Vec<u64>,
    /// Of `failed`, the changes to a mapping the forwarding plane still
    /// holds as it was before them (a refused renewal: what the client was
    /// granted earlier keeps working).
    pub kept: Vec<u64>,
    /// Of `failed`, the changes to a mapping the forwarding plane held
    /// before them and holds no more, or may not (a dataplane in doubt
    /// says so of every change it failed): its client lost it.
    pub lost: Vec<u64>,
}

/// What a change the dataplane refused left of its mapping
/// ([`crate::Server::refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Installed as it was before the change.
    Kept,
    /// Installed before the change, gone now (or maybe gone).
    Lost,
    /// Never installed: the change created it.
    NotInstalled,
}

impl DataplaneError {
    /// What change `seq`, one of [`DataplaneError::failed`], left.
    pub fn refused(&self, seq: u64) -> Refused {
        if self.kept.contains(&seq) {
            Refused::Kept
        } else if self.lost.contains(&seq) {
            Refused::Lost
        } else {
            Refused::NotInstalled
        }
    }
}

/// Applies the change log to a forwarding plane.
///
/// Batches follow the log order; an implementation applies each batch as
/// one transaction where it can (one `nft -f` run, one netlink batch).
pub trait Dataplane: Send {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Applies a batch of changes, in order.
    fn apply(&mut self, changes: &[ChangeRecord]) -> Result<(), DataplaneError>;
    /// What the dataplane holds is in doubt (an apply was abandoned while
    /// it ran and may or may not have taken effect): the next apply must
    /// first reconcile the forwarding plane with what is known to be
    /// installed. Nothing to do for a dataplane that cannot be in doubt.
    fn invalidate(&mut self) {}
    /// Whether the next apply would first reconcile (see
    /// [`Dataplane::invalidate`]); a caller may then reconcile outside
    /// any batch, with `apply(&[])`. Never, for a dataplane that cannot
    /// be in doubt.
    fn in_doubt(&self) -> bool {
        false
    }
}

/// The key of an inbound (DNAT) rule: protocol, external address and port.
type InboundKey = (Protocol, SocketAddr);
/// The key of an outbound (SNAT pin) rule: protocol, internal and remote endpoints.
type OutboundKey = (Protocol, SocketAddr, SocketAddr);

/// A dataplane that forwards nothing and remembers what it would install.
///
/// The default for trying Portkeep out and for benchmarks of the protocol
/// path; tests use it to check that the change log describes the table.
///
/// Inbound rules between IPv4 endpoints, by far the common case, are packed
/// into two `u64`s (16 bytes a rule rather than 72), so the mirror costs
/// little next to the mapping table it mirrors.
#[derive(Debug, Default)]
pub struct MemoryDataplane {
    inbound_v4: HashMap<u64, u64>,
    inbound: HashMap<InboundKey, SocketAddr>,
    outbound: HashMap<OutboundKey, SocketAddr>,
}

/// Packs an IPv4 endpoint (and a protocol) into one integer.
fn pack_v4(protocol: u8, addr: SocketAddr) -> Option<u64> {
    match addr {
        SocketAddr::V4(a) => Some(
            (u64::from(protocol) << 48)
                | (u64::from(a.port()) << 32)
                | u64::from(u32::from(*a.ip())),
        ),
        SocketAddr::V6(_) => None,
    }
}

fn unpack_v4(v: u64) -> SocketAddr {
    let ip = std::net::Ipv4Addr::from((v & 0xffff_ffff) as u32);
    SocketAddr::from((ip, ((v >> 32) & 0xffff) as u16))
}

impl MemoryDataplane {
    /// An empty dataplane.
    pub fn new() -> Self {
        Self::default()
    }

    /// The internal endpoint an inbound packet to `external` would reach.
    pub fn inbound(&self, protocol: Protocol, external: SocketAddr) -> Option<SocketAddr> {
        if let Some(k) = pack_v4(protocol.0, external) {
            if let Some(&v) = self.inbound_v4.get(&k) {
                return Some(unpack_v4(v));
            }
        }
        self.inbound.get(&(protocol, external)).copied()
    }

    /// Number of inbound (MAP) rules installed.
    pub fn inbound_len(&self) -> usize {
        self.inbound_v4.len() + self.inbound.len()
    }

    fn insert_inbound(&mut self, protocol: Protocol, external: SocketAddr, internal: SocketAddr) {
        match (pack_v4(protocol.0, external), pack_v4(0, internal)) {
            (Some(k), Some(v)) => {
                self.inbound_v4.insert(k, v);
            }
            _ => {
                self.inbound.insert((protocol, external), internal);
            }
        }
    }

    fn remove_inbound(&mut self, protocol: Protocol, external: SocketAddr) {
        if let Some(k) = pack_v4(protocol.0, external) {
            if self.inbound_v4.remove(&k).is_some() {
                return;
            }
        }
        self.inbound.remove(&(protocol, external));
    }

    /// The external endpoint an outbound flow from `internal` to `remote` is pinned to.
    pub fn outbound(
        &self,
        protocol: Protocol,
        internal: SocketAddr,
        remote: SocketAddr,
    ) -> Option<SocketAddr> {
        self.outbound.get(&(protocol, internal, remote)).copied()
    }

    /// Number of outbound (PEER) pins installed.
    pub fn outbound_len(&self) -> usize {
        self.outbound.len()
    }
}

impl Dataplane for MemoryDataplane {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn apply(&mut self, changes: &[ChangeRecord]) -> Result<(), DataplaneError> {
        for c in changes {
            match &c.change {
                Change::Upserted(m) => {
                    let internal = SocketAddr::new(m.key.internal_ip, m.key.internal_port);
                    match m.kind {
                        MappingKind::Map => {
                            self.insert_inbound(m.key.protocol, m.external, internal);
                        }
                        MappingKind::Peer { remote } => {
                            self.outbound
                                .insert((m.key.protocol, internal, remote), m.external);
                        }
                    }
                }
                Change::Removed { mapping: m, .. } => {
                    let internal = SocketAddr::new(m.key.internal_ip, m.key.internal_port);
                    match m.kind {
                        MappingKind::Map => {
                            self.remove_inbound(m.key.protocol, m.external);
                        }
                        MappingKind::Peer { remote } => {
                            self.outbound.remove(&(m.key.protocol, internal, remote));
                        }
                    }
                }
                Change::EpochReset { .. }
                | Change::ServerEpochReset { .. }
                | Change::AnnounceOwed { .. }
                | Change::PortHeld(_)
                | Change::Requester { .. } => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, MappingKey, MappingRecord};
    use crate::{SubscriberKeying, Timestamp};

    fn record(internal: &str, external: &str) -> MappingRecord {
        let i: SocketAddr = internal.parse().unwrap();
        MappingRecord {
            kind: MappingKind::Map,
            key: MappingKey {
                internal_ip: i.ip(),
                protocol: Protocol::UDP,
                internal_port: i.port(),
            },
            external: external.parse().unwrap(),
            nonce: [0; 12],
            expires: Timestamp(0),
            lifetime: 60,
            checkpoint: false,
            filters: vec![],
            description: None,
            subscriber: SubscriberKeying::default().subscriber_of(i.ip()),
            third_party: false,
            followed: false,
            manager: None,
        }
    }

    #[test]
    fn both_families_install_and_remove() {
        let mut dp = MemoryDataplane::new();
        let cases = [
            ("198.51.100.1:53", "192.0.2.1:30000"),
            ("[2001:db8::1]:53", "[2001:db8:ffff::1]:30000"),
            ("[2001:db8::2]:53", "192.0.2.1:30001"),
        ];
        let ups: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (a, b))| ChangeRecord {
                started: false,
                seq: i as u64 + 1,
                change: Change::Upserted(record(a, b)),
            })
            .collect();
        dp.apply(&ups).unwrap();
        assert_eq!(dp.inbound_len(), 3);
        for (a, b) in cases {
            assert_eq!(
                dp.inbound(Protocol::UDP, b.parse().unwrap()),
                Some(a.parse().unwrap())
            );
            assert_eq!(dp.inbound(Protocol::TCP, b.parse().unwrap()), None);
        }
        let downs: Vec<_> = cases
            .iter()
            .map(|(a, b)| ChangeRecord {
                started: false,
                seq: 9,
                change: Change::Removed {
                    mapping: record(a, b),
                    reason: crate::RemoveReason::Deleted,
                },
            })
            .collect();
        dp.apply(&downs).unwrap();
        assert_eq!(dp.inbound_len(), 0);
    }
}
