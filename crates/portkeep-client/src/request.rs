//! Building MAP, PEER, ANNOUNCE and delete requests (RFC 6887 sections
//! 11.1, 12.1, 14.1, 15) with the options of section 13, RFC 7220 and
//! RFC 7767.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    Filter, MapData, Nonce, OpData, PcpOption, PeerData, Protocol, Request, RequestHeader,
    NONCE_LEN,
};
use rand::RngCore;

/// Lifetime asked for when the caller does not say: two hours, the
/// value RFC 6887 section 15 suggests for a long-lived mapping.
pub const DEFAULT_LIFETIME: u32 = 7200;

/// A fresh random mapping nonce from the operating system's CSPRNG.
///
/// RFC 6887 section 11.1: the nonce is what proves, to the server, that a
/// later renewal or delete comes from the creator, so it must be
/// unpredictable.
pub fn random_nonce() -> Nonce {
    random_nonce_from(&mut rand::rngs::OsRng)
}

/// A mapping nonce drawn from `rng` (for tests that need repeatable nonces).
pub fn random_nonce_from<R: RngCore + ?Sized>(rng: &mut R) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut n);
    n
}

/// Builds a FILTER option (RFC 6887 section 13.3) from a prefix as a
/// person writes it: an IPv4 prefix length counts IPv4 bits and becomes
/// the 128-bit length of the IPv4-mapped form (+96).
pub fn filter(remote: IpAddr, prefix_len: u8, remote_port: u16) -> Result<Filter, BuildError> {
    let prefix_len = match remote {
        IpAddr::V4(_) if prefix_len <= 32 => prefix_len + 96,
        IpAddr::V6(_) if prefix_len <= 128 => prefix_len,
        _ => {
            return Err(BuildError::FilterPrefixTooLong {
                prefix_len,
                max: if remote.is_ipv4() { 32 } else { 128 },
            })
        }
    };
    Ok(Filter {
        prefix_len,
        remote_port,
        remote_ip: to_wire(remote),
    })
}

/// A request the builder refuses to produce, because the RFC forbids it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// RFC 6887 section 11.1: with protocol 0 (all protocols) the internal
    /// port must be 0.
    #[error("internal port must be 0 when the protocol is 0 (all protocols), got {0}")]
    AllProtocolsWithPort(u16),
    /// An option that RFC 6887 section 13 allows only with MAP.
    #[error("option {0} is only valid with MAP")]
    MapOnlyOption(&'static str),
    /// ANNOUNCE carries no options (RFC 6887 section 14.1).
    #[error("ANNOUNCE takes no options")]
    AnnounceWithOptions,
    /// A FILTER prefix longer than its address.
    #[error("filter prefix length {prefix_len} is longer than the address ({max} bits)")]
    FilterPrefixTooLong {
        /// The length given.
        prefix_len: u8,
        /// The address's length.
        max: u8,
    },
    /// RFC 6887 section 12.1: PEER's protocol and internal port must not
    /// be zero.
    #[error("PEER needs a non-zero protocol and internal port")]
    PeerWithoutProtocolOrPort,
    /// RFC 6887 section 12.1: remote peer port 0 is malformed for
    /// port-carrying protocols, and the remote address must be specified.
    #[error("PEER needs a remote peer address and a non-zero port, got {0}")]
    BadRemotePeer(SocketAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Announce,
    Map,
    Peer(SocketAddr),
}

/// A request under construction. The client IP header field is filled in
/// by [`RequestBuilder::build`] (the tokio client passes its socket's
/// local address, RFC 6887 section 8.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBuilder {
    kind: Kind,
    lifetime: u32,
    nonce: Nonce,
    protocol: Protocol,
    internal_port: u16,
    suggested_ip: Option<IpAddr>,
    suggested_port: u16,
    prefer_failure: bool,
    third_party: Option<IpAddr>,
    filters: Vec<Filter>,
    description: Option<String>,
    checkpoint: bool,
}

impl RequestBuilder {
    fn new(kind: Kind, protocol: Protocol, internal_port: u16) -> Self {
        RequestBuilder {
            kind,
            lifetime: DEFAULT_LIFETIME,
            nonce: random_nonce(),
            protocol,
            internal_port,
            suggested_ip: None,
            suggested_port: 0,
            prefer_failure: false,
            third_party: None,
            filters: Vec::new(),
            description: None,
            checkpoint: false,
        }
    }

    /// A MAP request (RFC 6887 section 11.1) with a random nonce and the
    /// default lifetime.
    pub fn map(protocol: Protocol, internal_port: u16) -> Self {
        Self::new(Kind::Map, protocol, internal_port)
    }

    /// A PEER request (RFC 6887 section 12.1) for the flow to `remote`.
    pub fn peer(protocol: Protocol, internal_port: u16, remote: SocketAddr) -> Self {
        Self::new(Kind::Peer(remote), protocol, internal_port)
    }

    /// A delete: a MAP with lifetime 0 and the creator's nonce (RFC 6887
    /// section 15).
    pub fn delete(protocol: Protocol, internal_port: u16, nonce: Nonce) -> Self {
        Self::map(protocol, internal_port).lifetime(0).nonce(nonce)
    }

    /// An ANNOUNCE request (RFC 6887 section 14.1): lifetime 0, no body.
    pub fn announce() -> Self {
        Self::new(Kind::Announce, Protocol::ALL, 0).lifetime(0)
    }

    /// Requested lifetime in seconds; 0 deletes a mapping.
    #[must_use]
    pub fn lifetime(mut self, seconds: u32) -> Self {
        self.lifetime = seconds;
        self
    }

    /// Uses `nonce` instead of the random one, to renew or delete a mapping
    /// created earlier (RFC 6887 section 11.3).
    #[must_use]
    pub fn nonce(mut self, nonce: Nonce) -> Self {
        self.nonce = nonce;
        self
    }

    /// Suggests an external address and/or port (RFC 6887 section 11.1;
    /// `None` / 0 mean "no preference").
    #[must_use]
    pub fn suggest(mut self, ip: Option<IpAddr>, port: u16) -> Self {
        self.suggested_ip = ip;
        self.suggested_port = port;
        self
    }

    /// Adds PREFER_FAILURE (RFC 6887 section 13.2; MAP only).
    #[must_use]
    pub fn prefer_failure(mut self) -> Self {
        self.prefer_failure = true;
        self
    }

    /// Adds THIRD_PARTY for `internal` (RFC 6887 section 13.1).
    #[must_use]
    pub fn third_party(mut self, internal: IpAddr) -> Self {
        self.third_party = Some(internal);
        self
    }

    /// Adds a FILTER (RFC 6887 section 13.3; MAP only; may repeat).
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// Adds DESCRIPTION (RFC 7220).
    #[must_use]
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// Adds CHECKPOINT_REQUIRED (RFC 7767 section 3.1): ask the server to
    /// replicate this mapping so that it survives a failover.
    #[must_use]
    pub fn checkpoint_required(mut self) -> Self {
        self.checkpoint = true;
        self
    }

    /// Sets whether CHECKPOINT_REQUIRED is sent (RFC 7767 section 3.2: a
    /// renewal without it asks the server to clear the mapping's flag).
    #[must_use]
    pub fn checkpoint(mut self, wanted: bool) -> Self {
        self.checkpoint = wanted;
        self
    }

    /// The host named by THIRD_PARTY, if any.
    pub fn third_party_host(&self) -> Option<IpAddr> {
        self.third_party
    }

    /// The requested lifetime in seconds.
    pub fn lifetime_value(&self) -> u32 {
        self.lifetime
    }

    /// The delete of the mapping this MAP request makes: same protocol,
    /// port, nonce and THIRD_PARTY, lifetime 0 (RFC 6887 section 15).
    /// `None` for PEER and ANNOUNCE.
    pub fn delete_of(&self) -> Option<RequestBuilder> {
        match self.kind {
            Kind::Map => {
                let mut d = RequestBuilder::delete(self.protocol, self.internal_port, self.nonce);
                d.third_party = self.third_party;
                Some(d)
            }
            Kind::Peer(_) | Kind::Announce => None,
        }
    }

    /// The nonce a MAP/PEER request carries (none for ANNOUNCE).
    pub fn nonce_value(&self) -> Option<Nonce> {
        match self.kind {
            Kind::Announce => None,
            Kind::Map | Kind::Peer(_) => Some(self.nonce),
        }
    }

    /// The protocol of a MAP/PEER request.
    pub fn protocol_value(&self) -> Protocol {
        self.protocol
    }

    /// The internal port of a MAP/PEER request.
    pub fn internal_port_value(&self) -> u16 {
        self.internal_port
    }

    /// Whether this is a MAP request (not PEER or ANNOUNCE).
    pub fn is_map(&self) -> bool {
        self.kind == Kind::Map
    }

    /// Whether CHECKPOINT_REQUIRED will be sent.
    pub fn checkpoint_requested(&self) -> bool {
        self.checkpoint
    }

    /// The request, with `client_ip` in the header (written IPv4-mapped
    /// for IPv4, RFC 6887 section 5).
    pub fn build(&self, client_ip: IpAddr) -> Result<Request, BuildError> {
        let header = RequestHeader {
            lifetime: self.lifetime,
            client_ip: to_wire(client_ip),
        };
        let map = || -> Result<MapData, BuildError> {
            if self.protocol == Protocol::ALL && self.internal_port != 0 {
                return Err(BuildError::AllProtocolsWithPort(self.internal_port));
            }
            Ok(MapData {
                nonce: self.nonce,
                protocol: self.protocol,
                internal_port: self.internal_port,
                external_port: self.suggested_port,
                external_ip: suggested_wire(self.suggested_ip, client_ip),
            })
        };
        let data = match self.kind {
            Kind::Announce => {
                if self.has_options() {
                    return Err(BuildError::AnnounceWithOptions);
                }
                OpData::Announce
            }
            Kind::Map => OpData::Map(map()?),
            Kind::Peer(remote) => {
                if self.prefer_failure {
                    return Err(BuildError::MapOnlyOption("PREFER_FAILURE"));
                }
                if !self.filters.is_empty() {
                    return Err(BuildError::MapOnlyOption("FILTER"));
                }
                if self.protocol == Protocol::ALL || self.internal_port == 0 {
                    return Err(BuildError::PeerWithoutProtocolOrPort);
                }
                if remote.ip().is_unspecified() || (self.protocol.has_ports() && remote.port() == 0)
                {
                    return Err(BuildError::BadRemotePeer(remote));
                }
                OpData::Peer(PeerData {
                    map: map()?,
                    remote_port: remote.port(),
                    remote_ip: to_wire(remote.ip()),
                })
            }
        };
        Ok(Request {
            header,
            data,
            options: self.options(),
        })
    }

    fn has_options(&self) -> bool {
        self.prefer_failure
            || self.third_party.is_some()
            || !self.filters.is_empty()
            || self.description.is_some()
            || self.checkpoint
    }

    fn options(&self) -> Vec<PcpOption> {
        let mut out = Vec::new();
        if let Some(ip) = self.third_party {
            out.push(PcpOption::ThirdParty(to_wire(ip)));
        }
        if self.prefer_failure {
            out.push(PcpOption::PreferFailure);
        }
        out.extend(self.filters.iter().copied().map(PcpOption::Filter));
        if let Some(d) = &self.description {
            out.push(PcpOption::Description(d.clone()));
        }
        if self.checkpoint {
            out.push(PcpOption::CheckpointRequired);
        }
        out
    }
}

/// The suggested external address field when the caller has no
/// preference: the all-zeros address of the client's family (RFC 6887
/// section 11.1: `::ffff:0.0.0.0` asks for an IPv4 external address,
/// `::` for IPv6).
fn suggested_wire(suggested: Option<IpAddr>, client_ip: IpAddr) -> Ipv6Addr {
    match suggested {
        Some(ip) => to_wire(ip),
        None if client_ip.is_ipv4() => Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(),
        None => Ipv6Addr::UNSPECIFIED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portkeep_proto::CodePoints;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

    #[test]
    fn rfc6887_s11_1_map_request_fields() {
        let nonce = [7u8; 12];
        let req = RequestBuilder::map(Protocol::TCP, 8080)
            .nonce(nonce)
            .lifetime(600)
            .build(CLIENT)
            .unwrap();
        assert_eq!(req.header.lifetime, 600);
        assert_eq!(
            req.header.client_ip,
            "::ffff:192.0.2.10".parse::<Ipv6Addr>().unwrap()
        );
        let OpData::Map(m) = req.data else {
            panic!("not MAP")
        };
        assert_eq!(m.nonce, nonce);
        assert_eq!(m.protocol, Protocol::TCP);
        assert_eq!(m.internal_port, 8080);
        assert_eq!(m.external_port, 0);
        assert_eq!(m.external_ip, "::ffff:0.0.0.0".parse::<Ipv6Addr>().unwrap());
        assert!(req.options.is_empty());
        // The wire form is a whole MAP request.
        assert_eq!(req.to_bytes(&CodePoints::default()).unwrap().len(), 60);
    }

    #[test]
    fn rfc6887_s15_delete_is_map_with_lifetime_zero_and_the_nonce() {
        let req = RequestBuilder::delete(Protocol::UDP, 53, [9; 12])
            .build(CLIENT)
            .unwrap();
        assert_eq!(req.header.lifetime, 0);
        assert_eq!(req.data.map_part().unwrap().nonce, [9; 12]);
    }

    #[test]
    fn rfc6887_s11_1_all_protocols_needs_port_zero() {
        assert_eq!(
            RequestBuilder::map(Protocol::ALL, 80).build(CLIENT),
            Err(BuildError::AllProtocolsWithPort(80))
        );
        assert!(RequestBuilder::map(Protocol::ALL, 0).build(CLIENT).is_ok());
    }

    #[test]
    fn rfc6887_s13_options_in_order_and_map_only_ones_refused_for_peer() {
        let f = filter("198.51.100.0".parse().unwrap(), 24, 443).unwrap();
        assert_eq!(f.prefix_len, 120);
        let req = RequestBuilder::map(Protocol::TCP, 80)
            .third_party("192.0.2.99".parse().unwrap())
            .prefer_failure()
            .filter(f)
            .description("web")
            .checkpoint_required()
            .build(CLIENT)
            .unwrap();
        assert_eq!(req.options.len(), 5);
        assert_eq!(req.options[4], PcpOption::CheckpointRequired);
        let peer = RequestBuilder::peer(Protocol::TCP, 80, "198.51.100.1:443".parse().unwrap());
        assert_eq!(
            peer.clone().prefer_failure().build(CLIENT),
            Err(BuildError::MapOnlyOption("PREFER_FAILURE"))
        );
        assert_eq!(
            peer.filter(f).build(CLIENT),
            Err(BuildError::MapOnlyOption("FILTER"))
        );
    }

    #[test]
    fn rfc6887_s13_3_filter_prefix_lengths() {
        assert_eq!(
            filter("2001:db8::".parse().unwrap(), 32, 0)
                .unwrap()
                .prefix_len,
            32
        );
        assert!(filter("192.0.2.0".parse().unwrap(), 33, 0).is_err());
        assert!(filter("2001:db8::".parse().unwrap(), 129, 0).is_err());
    }

    #[test]
    fn rfc6887_s12_1_peer_needs_remote_port() {
        let bad = RequestBuilder::peer(Protocol::TCP, 80, "198.51.100.1:0".parse().unwrap());
        assert!(matches!(
            bad.build(CLIENT),
            Err(BuildError::BadRemotePeer(_))
        ));
    }

    #[test]
    fn rfc6887_s14_1_announce_has_no_body_and_lifetime_zero() {
        let b = RequestBuilder::announce();
        assert_eq!(b.nonce_value(), None);
        let req = b.build(CLIENT).unwrap();
        assert_eq!(req.data, OpData::Announce);
        assert_eq!(req.header.lifetime, 0);
        assert_eq!(
            RequestBuilder::announce()
                .checkpoint_required()
                .build(CLIENT),
            Err(BuildError::AnnounceWithOptions)
        );
    }

    #[test]
    fn rfc6887_s11_1_nonces_are_random() {
        assert_ne!(random_nonce(), random_nonce());
    }
}
