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
}

/// The key of an inbound (DNAT) rule: protocol, external address and port.
type InboundKey = (Protocol, SocketAddr);
/// The key of an outbound (SNAT pin) rule: protocol, internal and remote endpoints.
type OutboundKey = (Protocol, SocketAddr, SocketAddr);

/// A dataplane that forwards nothing and remembers what it would install.
///
/// The default for trying Portkeep out and for benchmarks of the protocol
/// path; tests use it to check that the change log describes the table.
#[derive(Debug, Default)]
pub struct MemoryDataplane {
    inbound: HashMap<InboundKey, SocketAddr>,
    outbound: HashMap<OutboundKey, SocketAddr>,
}

impl MemoryDataplane {
    /// An empty dataplane.
    pub fn new() -> Self {
        Self::default()
    }

    /// The internal endpoint an inbound packet to `external` would reach.
    pub fn inbound(&self, protocol: Protocol, external: SocketAddr) -> Option<SocketAddr> {
        self.inbound.get(&(protocol, external)).copied()
    }

    /// Number of inbound (MAP) rules installed.
    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
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
                            self.inbound.insert((m.key.protocol, m.external), internal);
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
                            self.inbound.remove(&(m.key.protocol, m.external));
                        }
                        MappingKind::Peer { remote } => {
                            self.outbound.remove(&(m.key.protocol, internal, remote));
                        }
                    }
                }
                Change::EpochReset { .. } => {}
            }
        }
        Ok(())
    }
}
