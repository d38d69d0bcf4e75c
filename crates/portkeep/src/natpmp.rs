//! `portkeep --natpmp`, and the fall-back to NAT-PMP (RFC 6886) when a
//! server answers PCP as a NAT-PMP-only gateway (RFC 6887 section 9 step
//! 4, appendix A): `map` of TCP or UDP, `delete`, and `announce` (the
//! external address request), which is all NAT-PMP can say.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use portkeep_client::ClientError;
use portkeep_proto::natpmp::{NatPmpProtocol, NatPmpReply, NatPmpRequest};
use portkeep_proto::Protocol;

use crate::cli::{Cli, Command, Common};
use crate::exit;

/// The NAT-PMP request `command` amounts to, or what keeps it from being
/// one.
pub(crate) fn request_for(command: &Command) -> Result<NatPmpRequest, String> {
    let proto = |p: Protocol| match p {
        Protocol::TCP => Ok(NatPmpProtocol::Tcp),
        Protocol::UDP => Ok(NatPmpProtocol::Udp),
        other => Err(format!(
            "NAT-PMP maps TCP and UDP only, not protocol {}",
            other.0
        )),
    };
    match command {
        Command::Map(a) => {
            let m = &a.mapping;
            let unsupported = [
                (m.third_party.is_some(), "--third-party"),
                (m.description.is_some(), "--description"),
                (m.checkpoint, "--checkpoint"),
                (m.nonce.is_some(), "--nonce"),
                (a.prefer_failure, "--prefer-failure"),
                (!a.filters.is_empty(), "--filter"),
                (
                    m.suggest.is_some_and(|(ip, _)| ip.is_some()),
                    "--suggest with an address",
                ),
            ];
            if let Some((_, flag)) = unsupported.iter().find(|(set, _)| *set) {
                return Err(format!("NAT-PMP has no equivalent of {flag}"));
            }
            Ok(NatPmpRequest::Map {
                protocol: proto(m.proto)?,
                internal_port: m.internal_port,
                suggested_external_port: m.suggest.map_or(0, |(_, p)| p),
                lifetime: m.lifetime,
            })
        }
        Command::Delete(a) => {
            if a.third_party.is_some() {
                return Err("NAT-PMP has no equivalent of --third-party".into());
            }
            Ok(NatPmpRequest::Map {
                protocol: proto(a.proto)?,
                internal_port: a.internal_port,
                suggested_external_port: 0,
                lifetime: 0,
            })
        }
        Command::Announce => Ok(NatPmpRequest::ExternalAddress),
        _ => Err("NAT-PMP has map, delete and the external address only".into()),
    }
}

/// What the exchange gave: the gateway's external address (asked first,
/// as a map's response carries only the port) and the response.
type Outcome = Result<(Option<Ipv4Addr>, NatPmpReply), ClientError>;

async fn exchange(common: &Common, req: NatPmpRequest) -> Outcome {
    let client = common
        .client(portkeep_client::ClientConfig::default())
        .await?;
    let first = client
        .natpmp(NatPmpRequest::ExternalAddress, common.timeout)
        .await?;
    let address = match first {
        NatPmpReply::ExternalAddress { address, .. } => Some(address),
        _ => None,
    };
    if req == NatPmpRequest::ExternalAddress {
        return Ok((address, first));
    }
    Ok((address, client.natpmp(req, common.timeout).await?))
}

/// Runs `req` and reports it.
pub(crate) fn run(cli: &Cli, runtime: &tokio::runtime::Runtime, req: NatPmpRequest) -> ExitCode {
    let result = runtime.block_on(exchange(&cli.common, req));
    ExitCode::from(report(&cli.common, req, &result))
}

fn report(common: &Common, req: NatPmpRequest, result: &Outcome) -> u8 {
    let (address, reply) = match result {
        Ok(r) => r,
        Err(e) => {
            let status = match e {
                ClientError::Timeout { .. } => exit::TIMEOUT,
                ClientError::NatPmp { .. } => exit::PCP_ERROR,
                _ => exit::FAILURE,
            };
            if common.json {
                let result = match e {
                    ClientError::NatPmp { result, .. } => Some(*result),
                    _ => None,
                };
                println!(
                    "{}",
                    serde_json::json!({"protocol": "nat-pmp", "result": result, "error": e.to_string()})
                );
            }
            eprintln!("error: {e}");
            return status;
        }
    };
    let external = |port: u16| address.map(|a| SocketAddr::from((a, port)).to_string());
    match (*reply, req) {
        (
            NatPmpReply::Map {
                protocol,
                internal_port,
                external_port,
                lifetime,
                epoch,
                ..
            },
            _,
        ) => {
            let proto = match protocol {
                NatPmpProtocol::Tcp => "tcp",
                NatPmpProtocol::Udp => "udp",
            };
            if common.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "protocol": "nat-pmp",
                        "result": 0,
                        "proto": proto,
                        "internal_port": internal_port,
                        "external": if lifetime == 0 { None } else { external(external_port) },
                        "lifetime": lifetime,
                        "epoch": epoch,
                    })
                );
            } else if lifetime == 0 {
                println!("NAT-PMP: {proto} {internal_port} deleted (epoch {epoch} s)");
            } else {
                println!(
                    "NAT-PMP: {proto} {internal_port} -> {}, lifetime {lifetime} s (epoch {epoch} s)",
                    external(external_port).unwrap_or_else(|| format!("port {external_port}"))
                );
            }
        }
        (NatPmpReply::ExternalAddress { address, epoch, .. }, _) => {
            if common.json {
                println!(
                    "{}",
                    serde_json::json!({"protocol": "nat-pmp", "result": 0, "external_address": address.to_string(), "epoch": epoch})
                );
            } else {
                println!("NAT-PMP: external address {address} (epoch {epoch} s)");
            }
        }
        (NatPmpReply::Other { .. }, _) => {}
    }
    exit::SUCCESS
}
