//! Settings of the server core (already validated; the daemon turns its
//! TOML file into this).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portkeep_proto::CodePoints;

use crate::announce::AnnounceConfig;
use crate::change::MappingKey;
use crate::policy::{CheckpointPolicy, RateLimit};
use crate::prefix::Prefix;
use crate::SubscriberKeying;

/// Everything the core needs to know about its policy.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// External addresses mappings are allocated from.
    pub external_addresses: Vec<IpAddr>,
    /// Lowest external port handed out.
    pub port_min: u16,
    /// Highest external port handed out.
    pub port_max: u16,
    /// Shortest lifetime granted, seconds (RFC 6887 section 15: 120 s recommended).
    pub min_lifetime: u32,
    /// Longest lifetime granted, seconds.
    pub max_lifetime: u32,
    /// Lifetime of "long" errors (RFC 6887 section 7.4: 30 minutes recommended).
    pub long_error_lifetime: u32,
    /// Lifetime of "short" errors (RFC 6887 section 7.4: 30 seconds recommended).
    pub short_error_lifetime: u32,
    /// How internal addresses group into subscribers.
    pub subscriber_keying: SubscriberKeying,
    /// Mappings (MAP and PEER) one subscriber may hold (USER_EX_QUOTA beyond).
    pub max_mappings_per_subscriber: u32,
    /// Mappings the whole server may hold (NO_RESOURCES beyond).
    pub max_mappings: u32,
    /// FILTER rules one mapping may hold (EXCESSIVE_REMOTE_PEERS beyond).
    pub max_filters_per_mapping: usize,
    /// Clients allowed to use THIRD_PARTY (RFC 6887 section 13.1).
    pub third_party_clients: Vec<Prefix>,
    /// Code points of the failure-scenarios draft.
    pub code_points: CodePoints,
    /// Check-pointing classes, quotas and rates (RFC 7767 sections 3.2, 4, 5).
    pub checkpoint: CheckpointPolicy,
    /// How unsolicited ANNOUNCEs are repeated and paced (RFC 6887
    /// section 14.1.3).
    pub announce: AnnounceConfig,
    /// The client addresses PCP is served to (empty: every one): others
    /// get no answer at all (RFC 6887 section 8.2 leaves who may use the
    /// server to its policy; an operator keeps the external side and
    /// other customers out).
    pub clients: Vec<Prefix>,
    /// The interfaces (by index) PCP is served on (empty: every one):
    /// a datagram that arrived on another gets no answer at all (RFC 6887
    /// section 8.2: never answer the external side, where an internal
    /// source address can be forged).
    pub interfaces: Vec<u32>,
    /// Datagrams one subscriber may send, whatever they ask; beyond it
    /// they are dropped unanswered (its clients retransmit, RFC 6887
    /// section 8.1.1). `None`: unlimited.
    pub request_rate: Option<RateLimit>,
    /// Error responses the whole server sends; beyond it a request that
    /// would get one is dropped. An error answers even a 2-octet datagram
    /// with 24 octets (RFC 6887 section 8.2), a reflector for forged
    /// sources. `None`: unlimited.
    pub error_rate: Option<RateLimit>,
    /// Whether NAT-PMP (RFC 6886, version 0) is answered on the PCP port
    /// (RFC 6886 section 5 asks for the switch). Off: a version-0
    /// request gets PCP's UNSUPP_VERSION, which a NAT-PMP client reads as
    /// "unsupported version" (RFC 6887 appendix A).
    pub natpmp: bool,
    /// Whether PCP is answered. Off (a NAT-PMP-only gateway): a PCP
    /// request gets NAT-PMP's 8-octet "unsupported version" (RFC 6887
    /// section 9 step 4, appendix A), so a PCP client falls back.
    pub pcp: bool,
    /// How long a freed external endpoint is held back from other clients
    /// (RFC 6887 section 15; [`crate::PortHold`]). Zero: not at all.
    pub port_recycle_delay: Duration,
    /// Seed for port randomisation; fixed in tests, random in the daemon.
    pub seed: u64,
    /// Internal prefixes the server is a firewall for, not a NAT
    /// (RFC 6887 section 1: "the external address is the internal
    /// address"): a MAP or PEER of a host inside one gets its own address
    /// and port as its external endpoint, and no pool address.
    pub firewall_prefixes: Vec<Prefix>,
    /// Port forwards the operator configures: mappings no client made,
    /// that never expire and that no client may change or delete
    /// (`server::forwards`).
    pub static_forwards: Vec<StaticForward>,
}

/// A port forward the operator configures: inbound `protocol` traffic to
/// `external` goes to `internal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticForward {
    /// TCP, UDP or another protocol with ports.
    pub protocol: portkeep_proto::Protocol,
    /// The host and port behind the NAT.
    pub internal: SocketAddr,
    /// The public endpoint: an address of the pool, any port (inside the
    /// PCP port range or not).
    pub external: SocketAddr,
    /// What the forward is for, shown as its DESCRIPTION.
    pub description: Option<String>,
}

impl StaticForward {
    /// The mapping's key.
    pub fn key(&self) -> MappingKey {
        MappingKey {
            internal_ip: crate::prefix::canonical(self.internal.ip()),
            protocol: self.protocol,
            internal_port: self.internal.port(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            external_addresses: vec![IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1))],
            port_min: 1024,
            port_max: 65535,
            min_lifetime: 120,
            max_lifetime: 24 * 3600,
            long_error_lifetime: 30 * 60,
            short_error_lifetime: 30,
            subscriber_keying: SubscriberKeying::default(),
            max_mappings_per_subscriber: 1024,
            max_mappings: 4_000_000,
            max_filters_per_mapping: 8,
            third_party_clients: Vec::new(),
            code_points: CodePoints::default(),
            checkpoint: CheckpointPolicy::default(),
            announce: AnnounceConfig::default(),
            clients: Vec::new(),
            interfaces: Vec::new(),
            // Off: one busy client address (a CPE for a whole LAN, a
            // load generator) would otherwise be cut; operators set theirs.
            request_rate: None,
            error_rate: Some(RateLimit {
                count: 10_000,
                per: Duration::from_secs(1),
                burst: 10_000,
            }),
            natpmp: true,
            pcp: true,
            // RFC 6887 section 15: "typically, the maximum TCP segment
            // lifetime of 2 minutes".
            port_recycle_delay: Duration::from_secs(120),
            seed: 0x5eed,
            static_forwards: Vec::new(),
            firewall_prefixes: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Whether `ip` is inside one of the [firewall
    /// prefixes](ServerConfig::firewall_prefixes).
    pub fn is_firewalled(&self, ip: IpAddr) -> bool {
        self.firewall_prefixes.iter().any(|p| p.contains(ip))
    }

    /// The longest lifetime as a duration.
    pub fn max_lifetime_duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.max_lifetime))
    }
}
