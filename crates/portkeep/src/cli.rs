//! The command line, as clap derive types.
//!
//! The verbs are PCP exchanges: one-shot MAP, PEER, delete and ANNOUNCE,
//! and `list`/`get` (GET/NEXT retrieval, failure-scenarios draft section
//! 4), and the `agent` verb family (the host's mapping keeper of
//! DESIGN.md).

// The doc comments below are clap's help text, where `[IPv6]:PORT` is
// literal syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use portkeep_proto::{Filter, Nonce, Opcode, OptionCode, Protocol, ResultCode};

use crate::parse;

/// Port Control Protocol (RFC 6887) client: ask a PCP server for port
/// mappings.
#[derive(Debug, Parser)]
#[command(name = "portkeep", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    #[command(flatten)]
    pub(crate) common: Common,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create or renew an inbound mapping (RFC 6887 MAP).
    Map(MapArgs),
    /// Create or renew the mapping of an outbound flow (RFC 6887 PEER).
    Peer(PeerArgs),
    /// Delete a mapping: MAP with lifetime 0 and the creator's nonce.
    Delete(DeleteArgs),
    /// Ask the server for its epoch (RFC 6887 ANNOUNCE).
    Announce,
    /// List this host's mappings on the server (GET/NEXT walk,
    /// failure-scenarios draft section 4).
    List(ListArgs),
    /// Show one of this host's mappings (a "pure" GET, draft section 4.5);
    /// exits 2 with NONEXIST_MAP when there is none.
    Get(GetArgs),
    /// The host's mapping keeper: `agent run` is the daemon, the other
    /// verbs talk to it (JSON lines on a Unix socket).
    Agent(crate::agent::AgentArgs),
    /// Write the manual pages and shell completions the package installs
    /// (`man/`, `completions/{bash,zsh,fish}/` under DIR).
    #[command(hide = true)]
    PackageFiles {
        /// Directory to write into (created if missing).
        dir: std::path::PathBuf,
    },
}

/// The manual pages (section 1; one page per visible subcommand, as
/// `portkeep-map.1`) and the bash, zsh and fish completions, generated from
/// the argument definitions above so they never drift from `--help`.
pub(crate) fn package_files(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    fn pages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), dir)?;
        }
        clap_mangen::Man::new(cmd).section("1").generate_to(dir)?;
        Ok(())
    }
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    pages(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let out = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&out)?;
        clap_complete::generate_to(shell, &mut cmd, "portkeep", &out)?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only this protocol (needed for any port below).
    #[arg(long, value_name = "PROTO", value_parser = parse::protocol)]
    pub(crate) protocol: Option<Protocol>,
    /// Only this internal address, and port: IP, IP:PORT or [IPv6]:PORT.
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse::endpoint)]
    pub(crate) internal: Option<(IpAddr, u16)>,
    /// Only this external address, and port: IP, IP:PORT or [IPv6]:PORT.
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse::endpoint)]
    pub(crate) external: Option<(IpAddr, u16)>,
    /// List this host's mappings instead (THIRD_PARTY option; the server
    /// must allow this client).
    #[arg(long, value_name = "IP")]
    pub(crate) third_party: Option<IpAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Protocol of the mapping.
    #[arg(value_name = "PROTO", value_parser = parse::protocol)]
    pub(crate) proto: Protocol,
    /// Internal port of the mapping.
    #[arg(value_name = "INTERNAL_PORT")]
    pub(crate) internal_port: u16,
    /// The mapping of this internal host (THIRD_PARTY option).
    #[arg(long, value_name = "IP")]
    pub(crate) third_party: Option<IpAddr>,
}

/// Flags every verb takes, before or after it.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// PCP server: IP, IP:PORT or [IPv6]:PORT; port 5351 when omitted.
    #[arg(long, global = true, value_name = "ADDR", default_value = "127.0.0.1:5351", value_parser = parse::server)]
    pub(crate) server: SocketAddr,
    /// Give up after this many seconds of retransmitting (RFC 6887
    /// section 8.1.1 MRD; 0 retries forever).
    #[arg(
        long,
        global = true,
        value_name = "SECONDS",
        default_value = "10",
        allow_negative_numbers = true,
        value_parser = parse::timeout
    )]
    pub(crate) timeout: Duration,
    /// Send from this local address (a host with several: its mappings
    /// belong to the address they were made from, failure-scenarios
    /// draft section 2.4); the system picks one when omitted.
    #[arg(long, global = true, value_name = "IP")]
    pub(crate) source: Option<std::net::IpAddr>,
    /// Print JSON instead of text (`list`: one array).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// The key this user's mapping nonces derive from (64 hex digits,
    /// created on first use, mode 0600), so that running `map` again
    /// renews the mapping and `delete` needs no `--nonce`. Default:
    /// `$XDG_CONFIG_HOME/portkeep/cli.key`, else
    /// `~/.config/portkeep/cli.key`; the environment variable
    /// PORTKEEP_KEY_FILE when the option is absent. Empty: no key, a
    /// fresh random nonce every run.
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) key_file: Option<std::path::PathBuf>,
    /// Speak NAT-PMP (RFC 6886) instead of PCP: `map` and `delete` of
    /// tcp or udp, `announce` for the external address. Without it, a
    /// server that answers PCP as a NAT-PMP-only gateway is asked again
    /// in NAT-PMP (RFC 6887 section 9).
    #[arg(long, global = true)]
    pub(crate) natpmp: bool,
    /// GET opcode; must match the server's `extensions.get_opcode`
    /// (private use, docs/extensions.md).
    #[arg(long, global = true, value_name = "N", default_value_t = Opcode::GET.0)]
    pub(crate) get_opcode: u8,
    /// NEXT option code; must match the server's `extensions.next_option`.
    #[arg(long, global = true, value_name = "N", default_value_t = OptionCode::NEXT.0)]
    pub(crate) next_option: u8,
    /// NONEXIST_MAP result code; must match the server's
    /// `extensions.nonexist_map_result`.
    #[arg(long, global = true, value_name = "N", default_value_t = ResultCode::NONEXIST_MAP.0)]
    pub(crate) nonexist_map: u8,
}

impl Common {
    /// A client of the server, from `--source` if given.
    pub(crate) async fn client(
        &self,
        config: portkeep_client::ClientConfig,
    ) -> Result<portkeep_client::Client, portkeep_client::ClientError> {
        match self.source {
            Some(ip) => {
                let local = SocketAddr::new(ip, 0);
                portkeep_client::Client::connect_from(self.server, local, config).await
            }
            None => portkeep_client::Client::connect_with(self.server, config).await,
        }
    }

    /// The code points of the draft's extensions, from the flags.
    pub(crate) fn code_points(&self) -> portkeep_proto::CodePoints {
        portkeep_proto::CodePoints {
            get_opcode: Opcode(self.get_opcode),
            next_option: OptionCode(self.next_option),
            nonexist_map: ResultCode(self.nonexist_map),
        }
    }
}

/// What MAP and PEER share.
#[derive(Debug, Args)]
pub(crate) struct MappingArgs {
    /// Protocol: tcp, udp, sctp, dccp, icmp, icmpv6, all, or a number.
    #[arg(value_name = "PROTO", value_parser = parse::protocol)]
    pub(crate) proto: Protocol,
    /// Internal port (0 with `all`).
    #[arg(value_name = "INTERNAL_PORT")]
    pub(crate) internal_port: u16,
    /// Requested lifetime in seconds; the server may grant less.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true, default_value_t = portkeep_client::DEFAULT_LIFETIME)]
    pub(crate) lifetime: u32,
    /// Suggested external address: IP:PORT, IP or :PORT.
    #[arg(long, value_name = "IP:PORT", value_parser = parse::suggest)]
    pub(crate) suggest: Option<(Option<IpAddr>, u16)>,
    /// Ask on behalf of this internal host (THIRD_PARTY option).
    #[arg(long, value_name = "IP")]
    pub(crate) third_party: Option<IpAddr>,
    /// Free-text label (DESCRIPTION option, RFC 7220).
    #[arg(long, value_name = "TEXT")]
    pub(crate) description: Option<String>,
    /// Ask the server to checkpoint the mapping so that it survives a
    /// failover (CHECKPOINT_REQUIRED, RFC 7767).
    #[arg(long)]
    pub(crate) checkpoint: bool,
    /// Mapping nonce, 24 hex digits. When omitted it is derived from the
    /// key file (`--key-file`), the server, the protocol, the internal
    /// address and port (and the remote peer of a PEER): the same command
    /// renews the same mapping.
    #[arg(long, value_name = "HEX", value_parser = parse::nonce)]
    pub(crate) nonce: Option<Nonce>,
}

#[derive(Debug, Args)]
pub(crate) struct MapArgs {
    #[command(flatten)]
    pub(crate) mapping: MappingArgs,
    /// Fail rather than accept another external address or port than
    /// suggested (PREFER_FAILURE option).
    #[arg(long)]
    pub(crate) prefer_failure: bool,
    /// Only let these remote peers in: PREFIX/LEN[:PORT], repeatable
    /// (FILTER option; IPv4 lengths count IPv4 bits).
    #[arg(long = "filter", value_name = "PREFIX/LEN[:PORT]", value_parser = parse::filter)]
    pub(crate) filters: Vec<Filter>,
}

#[derive(Debug, Args)]
pub(crate) struct PeerArgs {
    #[command(flatten)]
    pub(crate) mapping: MappingArgs,
    /// The remote peer of the flow: IP:PORT or [IPv6]:PORT.
    #[arg(value_name = "REMOTE_IP:PORT", value_parser = parse::remote)]
    pub(crate) remote: SocketAddr,
}

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Protocol of the mapping.
    #[arg(value_name = "PROTO", value_parser = parse::protocol)]
    pub(crate) proto: Protocol,
    /// Internal port of the mapping.
    #[arg(value_name = "INTERNAL_PORT")]
    pub(crate) internal_port: u16,
    /// The nonce the mapping was created with (24 hex digits); PCP needs
    /// it (RFC 6887 section 11.3). When omitted, the one `map` derives
    /// from the key file; NAT-PMP has none.
    #[arg(long, value_name = "HEX", value_parser = parse::nonce)]
    pub(crate) nonce: Option<Nonce>,
    /// Delete on behalf of this internal host (THIRD_PARTY option).
    #[arg(long, value_name = "IP")]
    pub(crate) third_party: Option<IpAddr>,
}
