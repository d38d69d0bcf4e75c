//! NAT-PMP (RFC 6886) on the PCP port, into the one mapping table: a map
//! request is carried out as the PCP MAP it amounts to, so quotas, port
//! allocation, check-pointing by class, the store, replication and the
//! dataplane treat both protocols alike, and NAT-PMP's seconds since start
//! of epoch is the host's PCP epoch (RFC 6886 section 3.6: it restarts
//! exactly when the host's mapping state was lost).
//!
//! Ownership (docs/design.md, "NAT-PMP"): NAT-PMP has no nonce, so its
//! mappings carry [`NATPMP_NONCE`]. NAT-PMP may renew or delete only
//! those (a mapping PCP made gets result 2, "refused"); a PCP request from
//! the host may take one over, and then owns it with its own nonce.

use std::net::Ipv4Addr;

use portkeep_proto::natpmp::{
    NatPmpProtocol, NatPmpReject, NatPmpReply, NatPmpRequest, NatPmpResult,
};
use portkeep_proto::{MapData, Nonce, OpData, Protocol, Request, RequestHeader, Response};

use super::{Fail, IpAddr, ResultCode, Server, Timestamp};
use portkeep_proto::addr::{from_wire, to_wire};

/// The nonce NAT-PMP mappings are recorded with. A PCP client's nonce is
/// random (RFC 6887 section 11.1), so none will be this one by chance.
pub const NATPMP_NONCE: Nonce = *b"NAT-PMP\0\0\0\0\0";

/// The NAT-PMP result for what a PCP MAP answered (RFC 6886 section 3.5).
fn result_of(code: ResultCode) -> NatPmpResult {
    match code {
        ResultCode::SUCCESS => NatPmpResult::SUCCESS,
        ResultCode::NETWORK_FAILURE => NatPmpResult::NETWORK_FAILURE,
        ResultCode::NO_RESOURCES
        | ResultCode::USER_EX_QUOTA
        | ResultCode::CANNOT_PROVIDE_EXTERNAL => NatPmpResult::OUT_OF_RESOURCES,
        _ => NatPmpResult::NOT_AUTHORIZED,
    }
}

impl Server {
    /// The NAT-PMP announcement (RFC 6886 section 3.2.1: the external
    /// address response, unsolicited, to 224.0.0.1:5350) that goes with
    /// every ANNOUNCE to everyone, carrying the server-wide epoch; `None`
    /// with NAT-PMP turned off or no IPv4 external address.
    pub fn natpmp_announcement(&self, now: Timestamp) -> Option<Vec<u8>> {
        if !self.cfg.natpmp {
            return None;
        }
        let address = self.cfg.external_addresses.iter().find_map(|&ip| {
            match crate::prefix::canonical(ip) {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }
        })?;
        let mut out = Vec::with_capacity(12);
        NatPmpReply::ExternalAddress {
            result: NatPmpResult::SUCCESS,
            epoch: self.epoch(now),
            address,
        }
        .encode(&mut out);
        Some(out)
    }

    /// [`Server::restamp`] for a NAT-PMP reply: its seconds since start of
    /// epoch as of its release, a granted lifetime shortened by the wait,
    /// and nothing at all if the mapping it grants went meanwhile.
    pub(super) fn restamp_natpmp(
        &self,
        now: Timestamp,
        to: IpAddr,
        reply: &[u8],
        waited_ms: u64,
    ) -> Option<Vec<u8>> {
        let epoch = self.requester_epoch(now, to);
        let r = match NatPmpReply::parse(reply)? {
            NatPmpReply::Map {
                protocol,
                result,
                internal_port,
                external_port,
                lifetime,
                ..
            } => {
                let mut lifetime = lifetime;
                if result == NatPmpResult::SUCCESS && lifetime > 0 {
                    let key = crate::MappingKey {
                        internal_ip: crate::prefix::canonical(to),
                        protocol: Protocol(protocol.number()),
                        internal_port,
                    };
                    let held = self
                        .table
                        .map_entry(&key)
                        .and_then(|id| self.table.get(id))
                        .is_some_and(|e| e.nonce == NATPMP_NONCE);
                    if !held {
                        return None;
                    }
                    lifetime = super::lifetime_after_wait(lifetime, waited_ms);
                }
                NatPmpReply::Map {
                    protocol,
                    result,
                    epoch,
                    internal_port,
                    external_port,
                    lifetime,
                }
            }
            NatPmpReply::ExternalAddress {
                result, address, ..
            } => NatPmpReply::ExternalAddress {
                result,
                epoch,
                address,
            },
            NatPmpReply::Other { opcode, result, .. } => NatPmpReply::Other {
                opcode,
                result,
                epoch,
            },
        };
        let mut out = Vec::with_capacity(16);
        r.encode(&mut out);
        Some(out)
    }

    /// Answers a version-0 datagram from IPv4 host `src` (RFC 6886
    /// section 3): `Err(None)` drops it (a response, or too short); every
    /// answer, errors included, is a NAT-PMP message written to `out`.
    pub(super) fn natpmp(
        &mut self,
        now: Timestamp,
        src: Ipv4Addr,
        port: u16,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        let host = IpAddr::V4(src);
        let reply = match NatPmpRequest::parse(datagram) {
            Err(NatPmpReject::Drop) => return Err(None),
            Err(NatPmpReject::UnsupportedOpcode(op)) => {
                NatPmpReply::unsupported_opcode(op, self.requester_epoch(now, host))
            }
            Ok(NatPmpRequest::ExternalAddress) => {
                let address = self.natpmp_external_address(host);
                NatPmpReply::ExternalAddress {
                    result: if address.is_some() {
                        NatPmpResult::SUCCESS
                    } else {
                        NatPmpResult::NETWORK_FAILURE
                    },
                    epoch: self.requester_epoch(now, host),
                    address: address.unwrap_or(Ipv4Addr::UNSPECIFIED),
                }
            }
            Ok(NatPmpRequest::Map {
                protocol,
                internal_port,
                suggested_external_port,
                lifetime,
            }) => self.natpmp_map(
                now,
                (host, port),
                protocol,
                internal_port,
                suggested_external_port,
                lifetime,
            )?,
        };
        self.stats.natpmp += 1;
        reply.encode(out);
        Ok(())
    }

    /// A gateway that speaks NAT-PMP only ([`crate::ServerConfig::pcp`]
    /// off) answers any other request with NAT-PMP's unsupported version
    /// (RFC 6886 section 3.5: result 1; opcode 128 + the request's, as
    /// erratum 3618 has it), which a PCP client reads as "fall back to
    /// NAT-PMP" (RFC 6887 section 9 step 4). Responses and datagrams
    /// under 2 octets are dropped.
    pub(super) fn natpmp_only(
        &mut self,
        now: Timestamp,
        src: IpAddr,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        let (Some(_), Some(&op)) = (datagram.first(), datagram.get(1)) else {
            return Err(None);
        };
        if op & portkeep_proto::natpmp::RESPONSE_BIT != 0 {
            return Err(None);
        }
        NatPmpReply::Other {
            opcode: op,
            result: NatPmpResult::UNSUPPORTED_VERSION,
            epoch: self.requester_epoch(now, src),
        }
        .encode(out);
        Ok(())
    }

    /// The external address NAT-PMP reports to `host` (RFC 6886 section
    /// 4.3.2: with several, act as if one were the only one): the one its
    /// mappings use, else the first IPv4 external address.
    fn natpmp_external_address(&self, host: IpAddr) -> Option<Ipv4Addr> {
        let used = self
            .table
            .map_entries_of(host)
            .into_iter()
            .filter_map(|id| self.table.get(id))
            .find_map(|e| self.table.external_of(e.binding))
            .map(|a| a.ip());
        let v4 = |ip: IpAddr| match crate::prefix::canonical(ip) {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        };
        used.and_then(v4)
            .or_else(|| self.cfg.external_addresses.iter().find_map(|&ip| v4(ip)))
    }

    /// RFC 6886 sections 3.3 and 3.4, as the PCP MAP they amount to (RFC
    /// 6887 section 11): create or renew with the suggested port as a
    /// hint, delete with lifetime 0, delete every NAT-PMP mapping of the
    /// host for the protocol with internal port 0 too.
    fn natpmp_map(
        &mut self,
        now: Timestamp,
        (host, port): (IpAddr, u16),
        protocol: NatPmpProtocol,
        internal_port: u16,
        suggested_external_port: u16,
        lifetime: u32,
    ) -> Result<NatPmpReply, Option<Fail>> {
        let reply = |result: NatPmpResult, epoch: u32, external_port: u16, lifetime: u32| {
            NatPmpReply::Map {
                protocol,
                result,
                epoch,
                internal_port,
                external_port,
                lifetime,
            }
        };
        if internal_port == 0 && lifetime != 0 {
            // Not defined by RFC 6886; refused, as miniupnpd does.
            let epoch = self.requester_epoch(now, host);
            return Ok(reply(NatPmpResult::NOT_AUTHORIZED, epoch, 0, 0));
        }
        let m = MapData {
            nonce: NATPMP_NONCE,
            protocol: Protocol(protocol.number()),
            internal_port,
            // Section 3.4: a deletion's suggested port "MUST be 0" and is
            // ignored.
            external_port: if lifetime == 0 {
                0
            } else {
                suggested_external_port
            },
            external_ip: std::net::Ipv6Addr::UNSPECIFIED,
        };
        let req = Request {
            header: RequestHeader {
                lifetime,
                client_ip: to_wire(host),
            },
            data: OpData::Map(m),
            options: Vec::new(),
        };
        let mut pcp = Vec::new();
        let answered = self.map(now, (host, port), &req, &m, true, &mut pcp);
        let epoch = self.requester_epoch(now, host);
        match answered {
            Ok(()) => {
                let cp = self.cfg.code_points;
                let Ok(r) = Response::parse(&pcp, &cp) else {
                    return Ok(reply(NatPmpResult::NETWORK_FAILURE, epoch, 0, 0));
                };
                let external_port = match &r.data {
                    OpData::Map(d)
                        if !from_wire(d.external_ip).is_unspecified() || lifetime == 0 =>
                    {
                        d.external_port
                    }
                    _ => 0,
                };
                if lifetime == 0 {
                    // Section 3.4: a deletion answers port 0 and lifetime
                    // 0; a delete-all that left some (made by PCP) is not
                    // a success.
                    let left = internal_port == 0
                        && self.table.map_entries_of(host).into_iter().any(|id| {
                            self.table
                                .get(id)
                                .and_then(|e| self.table.bindings.get(e.binding))
                                .is_some_and(|b| b.key.protocol.0 == protocol.number())
                        });
                    let result = if left {
                        NatPmpResult::NOT_AUTHORIZED
                    } else {
                        NatPmpResult::SUCCESS
                    };
                    return Ok(reply(result, r.header.epoch, 0, 0));
                }
                Ok(reply(
                    NatPmpResult::SUCCESS,
                    r.header.epoch,
                    external_port,
                    r.header.lifetime,
                ))
            }
            Err(None) => Err(None),
            Err(Some(fail)) => Ok(reply(result_of(fail.code), epoch, 0, 0)),
        }
    }
}
