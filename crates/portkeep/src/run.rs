//! Turning parsed arguments into one PCP exchange.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::CommandFactory;
use portkeep_client::{
    BuildError, ClientConfig, ClientError, Reply, RequestBuilder, RequestOptions,
};
use portkeep_proto::CodePoints;

use crate::cli::{Cli, Command, Common, MappingArgs};
use crate::{exit, output};

/// What to send, decided before any socket is opened.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) builder: RequestBuilder,
    pub(crate) remote: Option<SocketAddr>,
}

pub(crate) fn run(cli: Cli) -> ExitCode {
    if let Command::Agent(a) = &cli.command {
        return crate::agent::run(&cli.common, a);
    }
    if let Command::PackageFiles { dir } = &cli.command {
        return match crate::cli::package_files(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write {}: {e}", dir.display());
                ExitCode::from(exit::FAILURE)
            }
        };
    }
    if matches!(cli.command, Command::List(_) | Command::Get(_)) {
        return crate::retrieve::run(&cli);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    if cli.common.natpmp {
        return match crate::natpmp::request_for(&cli.command) {
            Ok(req) => crate::natpmp::run(&cli, &runtime, req),
            Err(why) => exit::clap_error(&Cli::command().error(ErrorKind::ArgumentConflict, why)),
        };
    }
    let mut command = cli.command;
    let derived = match derive_nonce(&cli.common, &mut command) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let mut cli = Cli {
        common: cli.common,
        command,
    };
    let plan = match plan(&cli.command, cli.common.server) {
        Ok(p) => p,
        Err(e) => return exit::clap_error(&e),
    };
    let result = runtime.block_on(execute(&cli.common, &plan));
    if let Err(ClientError::UnsupportedVersion { version: 0, .. }) = &result {
        // RFC 6887 section 9 step 4 and RFC 6886 section 1.1: a
        // NAT-PMP-only gateway; ask again in NAT-PMP if the request can
        // be said in it (and try PCP first again next time). NAT-PMP has
        // no nonce: the derived one goes.
        if derived {
            clear_nonce(&mut cli.command);
        }
        if let Ok(req) = crate::natpmp::request_for(&cli.command) {
            eprintln!(
                "note: {} answers NAT-PMP only: asking in NAT-PMP",
                cli.common.server
            );
            return crate::natpmp::run(&cli, &runtime, req);
        }
    }
    ExitCode::from(output::report(&cli.common, &plan, &result))
}

/// Fills in the nonce of a MAP, PEER or delete given without `--nonce`:
/// derived from the user's key (`--key-file`) and what names the mapping
/// to this client (the server, the protocol, the internal address and
/// port, and a PEER's remote peer), so that the same command run again
/// renews the mapping (RFC 6887 section 11.3: a renewal needs the
/// creator's nonce) and `delete` finds it. The nonce stays unpredictable
/// to others (section 11.1) as long as the key is secret.
/// Returns whether it did.
fn derive_nonce(common: &Common, command: &mut Command) -> Result<bool, String> {
    let (mapping, remote) = match command {
        Command::Map(a) if a.mapping.nonce.is_none() => (&mut a.mapping, None),
        Command::Peer(a) if a.mapping.nonce.is_none() => (&mut a.mapping, Some(a.remote)),
        Command::Delete(a) if a.nonce.is_none() => {
            let n = nonce_for(common, a.proto, a.internal_port, a.third_party, None)?;
            a.nonce = Some(n);
            return Ok(true);
        }
        _ => return Ok(false),
    };
    let n = nonce_for(
        common,
        mapping.proto,
        mapping.internal_port,
        mapping.third_party,
        remote,
    )?;
    mapping.nonce = Some(n);
    Ok(true)
}

fn clear_nonce(command: &mut Command) {
    match command {
        Command::Map(a) => a.mapping.nonce = None,
        Command::Peer(a) => a.mapping.nonce = None,
        Command::Delete(a) => a.nonce = None,
        _ => {}
    }
}

fn nonce_for(
    common: &Common,
    proto: portkeep_proto::Protocol,
    port: u16,
    third_party: Option<IpAddr>,
    remote: Option<SocketAddr>,
) -> Result<portkeep_proto::Nonce, String> {
    use crate::agent::store::AgentKey;
    let key = match key_path(common)? {
        None => AgentKey::ephemeral(),
        Some(path) => AgentKey::load_or_create_file(&path)
            .map_err(|e| format!("key file {}: {e} (--key-file)", path.display()))?,
    };
    let internal = match third_party {
        Some(ip) => ip,
        None => source_ip(common)?,
    };
    let name = match remote {
        None => format!("cli {}", common.server),
        Some(r) => format!("cli {} peer {r}", common.server),
    };
    Ok(key.nonce_for(&name, proto, port, Some(internal)))
}

/// The key file: `--key-file`, else `PORTKEEP_KEY_FILE`, else the XDG
/// config directory's
/// `portkeep/cli.key`; `None` when given empty (no key).
fn key_path(common: &Common) -> Result<Option<std::path::PathBuf>, String> {
    let given = common
        .key_file
        .clone()
        .or_else(|| std::env::var_os("PORTKEEP_KEY_FILE").map(std::path::PathBuf::from));
    if let Some(p) = given {
        return Ok((!p.as_os_str().is_empty()).then_some(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| std::path::Path::new(&h).join(".config"))
        })
        .ok_or("no --key-file, and neither XDG_CONFIG_HOME nor HOME is set")?;
    Ok(Some(base.join("portkeep").join("cli.key")))
}

/// The address requests to the server leave from (`--source`, or the
/// one the system routes from): the internal address of the mapping.
fn source_ip(common: &Common) -> Result<IpAddr, String> {
    if let Some(ip) = common.source {
        return Ok(ip);
    }
    let any: IpAddr = match common.server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = std::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| s.connect(common.server).map(|()| s))
        .map_err(|e| format!("no route to {}: {e}", common.server))?;
    sock.local_addr()
        .map(|a| a.ip())
        .map_err(|e| format!("no local address towards {}: {e}", common.server))
}

async fn execute(common: &Common, plan: &Plan) -> Result<Reply, ClientError> {
    let client = common.client(ClientConfig::default()).await?;
    let opts = RequestOptions {
        // Zero is the RFC's "no bound" and passes through as such.
        max_duration: Some(common.timeout),
        ..RequestOptions::default()
    };
    client.send(&plan.builder, opts).await
}

fn with_mapping(b: RequestBuilder, m: &MappingArgs) -> RequestBuilder {
    let mut b = b.lifetime(m.lifetime);
    if let Some(n) = m.nonce {
        b = b.nonce(n);
    }
    if let Some((ip, port)) = m.suggest {
        b = b.suggest(ip, port);
    }
    if let Some(ip) = m.third_party {
        b = b.third_party(ip);
    }
    if let Some(d) = &m.description {
        b = b.description(d.clone());
    }
    if m.checkpoint {
        b = b.checkpoint_required();
    }
    b
}

fn plan(command: &Command, server: SocketAddr) -> Result<Plan, clap::Error> {
    let (builder, remote) = match command {
        Command::Map(a) => {
            let mut b = with_mapping(
                RequestBuilder::map(a.mapping.proto, a.mapping.internal_port),
                &a.mapping,
            );
            if a.prefer_failure {
                b = b.prefer_failure();
            }
            for f in &a.filters {
                b = b.filter(*f);
            }
            (b, None)
        }
        Command::Peer(a) => (
            with_mapping(
                RequestBuilder::peer(a.mapping.proto, a.mapping.internal_port, a.remote),
                &a.mapping,
            ),
            Some(a.remote),
        ),
        Command::Delete(a) => {
            let Some(nonce) = a.nonce else {
                return Err(Cli::command().error(
                    ErrorKind::MissingRequiredArgument,
                    "a PCP delete needs '--nonce <HEX>', the creator's nonce (RFC 6887 section \
                     11.3); NAT-PMP ('--natpmp') has none",
                ));
            };
            let mut b = RequestBuilder::delete(a.proto, a.internal_port, nonce);
            if let Some(ip) = a.third_party {
                b = b.third_party(ip);
            }
            (b, None)
        }
        Command::Announce => (RequestBuilder::announce(), None),
        Command::List(_) | Command::Get(_) | Command::Agent(_) | Command::PackageFiles { .. } => {
            return Err(Cli::command().error(ErrorKind::InvalidSubcommand, "not a MAP-like verb"))
        }
    };
    validate(&builder, server)?;
    Ok(Plan { builder, remote })
}

/// Catches what the RFC forbids before talking to anyone, naming the
/// argument at fault. The real client address is not known yet; one of
/// the server's family stands in, which does not change the size.
fn validate(builder: &RequestBuilder, server: SocketAddr) -> Result<(), clap::Error> {
    let stand_in: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let usage = |msg: String| Cli::command().error(ErrorKind::ValueValidation, msg);
    let req = builder.build(stand_in).map_err(|e| {
        usage(match e {
            BuildError::AllProtocolsWithPort(p) => format!(
                "invalid value '{p}' for '<INTERNAL_PORT>': must be 0 when <PROTO> is all \
                 (RFC 6887 section 11.1)"
            ),
            BuildError::PeerWithoutProtocolOrPort => "invalid value for '<PROTO>' or \
                '<INTERNAL_PORT>': PEER needs a protocol other than all and a non-zero \
                internal port (RFC 6887 section 12.1)"
                .to_owned(),
            BuildError::BadRemotePeer(r) => format!(
                "invalid value '{r}' for '<REMOTE_IP:PORT>': needs a specified address and a \
                 non-zero port (RFC 6887 section 12.1)"
            ),
            other => other.to_string(),
        })
    })?;
    req.to_bytes(&CodePoints::default()).map_err(|e| {
        usage(format!(
            "{e}: shorten '--description' or give fewer '--filter' (RFC 6887 section 7)"
        ))
    })?;
    Ok(())
}
