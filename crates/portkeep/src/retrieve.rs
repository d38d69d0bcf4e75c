//! `list` and `get`: retrieving this host's mappings with GET / NEXT
//! (PCP failure-scenarios draft, section 4).

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::CommandFactory;
use portkeep_client::{ClientConfig, ClientError, GetFilter, MappedEntry, RequestOptions};
use portkeep_proto::addr::from_wire;
use portkeep_proto::{OptionCode, PcpOption, Protocol};
use serde::Serialize;

use crate::cli::{Cli, Command, Common};
use crate::exit;

/// One mapping as `--json` prints it.
#[derive(Debug, Serialize)]
struct JsonMapping {
    protocol: String,
    protocol_number: u8,
    internal: String,
    external: String,
    lifetime: u32,
    checkpoint: bool,
    description: Option<String>,
    third_party: Option<String>,
    filters: Vec<String>,
}

fn proto_name(p: Protocol) -> String {
    p.name()
        .map_or_else(|| p.0.to_string(), str::to_ascii_lowercase)
}

fn filters(m: &MappedEntry) -> Vec<String> {
    m.options
        .iter()
        .filter_map(|o| match o {
            PcpOption::Filter(f) => {
                let ip = from_wire(f.remote_ip);
                let len = if ip.is_ipv4() {
                    f.prefix_len.saturating_sub(96)
                } else {
                    f.prefix_len
                };
                Some(format!("{ip}/{len}:{}", f.remote_port))
            }
            _ => None,
        })
        .collect()
}

fn to_json(m: &MappedEntry) -> JsonMapping {
    JsonMapping {
        protocol: proto_name(m.protocol),
        protocol_number: m.protocol.0,
        internal: m.internal.to_string(),
        external: m.external.to_string(),
        lifetime: m.lifetime,
        checkpoint: m.checkpoint(),
        description: m.description().map(str::to_owned),
        third_party: m.third_party().map(|ip| ip.to_string()),
        filters: filters(m),
    }
}

/// The filter the arguments describe, or a usage error: section 4.1 calls
/// a port without a protocol unsound.
fn filter(command: &Command) -> Result<GetFilter, clap::Error> {
    let mut f = GetFilter::all();
    match command {
        Command::List(a) => {
            f.protocol = a.protocol.unwrap_or(Protocol::ALL);
            if let Some((ip, port)) = a.internal {
                f.internal_ip = Some(ip);
                f.internal_port = port;
            }
            if let Some((ip, port)) = a.external {
                f.external_ip = Some(ip);
                f.external_port = port;
            }
            f.third_party = a.third_party;
        }
        Command::Get(a) => {
            f.protocol = a.proto;
            f.internal_port = a.internal_port;
            f.third_party = a.third_party;
            f.internal_ip = a.third_party;
        }
        _ => {}
    }
    if f.protocol == Protocol::ALL && (f.internal_port != 0 || f.external_port != 0) {
        return Err(Cli::command().error(
            ErrorKind::ArgumentConflict,
            "a port needs '--protocol' (failure-scenarios draft section 4.1: a port with \
             protocol 'any' is unsound)",
        ));
    }
    f.options = vec![
        OptionCode::FILTER,
        OptionCode::DESCRIPTION,
        OptionCode::THIRD_PARTY,
        OptionCode::CHECKPOINT_REQUIRED,
    ];
    Ok(f)
}

pub(crate) fn run(cli: &Cli) -> ExitCode {
    let f = match filter(&cli.command) {
        Ok(f) => f,
        Err(e) => return exit::clap_error(&e),
    };
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
    let list = matches!(cli.command, Command::List(_));
    let result = runtime.block_on(execute(&cli.common, f, list));
    ExitCode::from(report(&cli.common, list, result))
}

async fn execute(
    common: &Common,
    mut f: GetFilter,
    list: bool,
) -> Result<Option<Vec<MappedEntry>>, ClientError> {
    let config = ClientConfig {
        code_points: common.code_points(),
        ..ClientConfig::default()
    };
    let client = common.client(config).await?;
    let opts = RequestOptions {
        max_duration: Some(common.timeout),
        ..RequestOptions::default()
    };
    if list {
        return client.walk(f, opts).collect().await.map(Some);
    }
    // A pure GET names the mapping: the internal address is our own
    // unless THIRD_PARTY names another host.
    f.internal_ip = Some(f.internal_ip.unwrap_or(client.client_ip()));
    Ok(client.get_mapping(&f, opts).await?.map(|m| vec![m]))
}

/// Prints the mappings and returns the exit status. `Ok(None)` is a pure
/// GET that found nothing, an error (exit 2); an empty walk is not.
fn report(
    common: &Common,
    list: bool,
    result: Result<Option<Vec<MappedEntry>>, ClientError>,
) -> u8 {
    let mappings = match result {
        Ok(Some(m)) => m,
        Ok(None) => {
            eprintln!(
                "error: NONEXIST_MAP (result code {}): no such mapping",
                common.nonexist_map
            );
            return exit::PCP_ERROR;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return match e {
                ClientError::Pcp { .. } => exit::PCP_ERROR,
                ClientError::Timeout { .. } => exit::TIMEOUT,
                ClientError::Build(_) | ClientError::Encode(_) => exit::USAGE,
                _ => exit::FAILURE,
            };
        }
    };
    if common.json {
        let out: Vec<JsonMapping> = mappings.iter().map(to_json).collect();
        let text = if list {
            serde_json::to_string(&out)
        } else {
            match out.first() {
                Some(m) => serde_json::to_string(m),
                None => serde_json::to_string(&out),
            }
        };
        match text {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode JSON: {e}"),
        }
        return exit::SUCCESS;
    }
    println!(
        "{:<6} {:<40} {:<40} {:>9} {:<10} DESCRIPTION",
        "PROTO", "INTERNAL", "EXTERNAL", "LIFETIME", "CHECKPOINT"
    );
    for m in &mappings {
        println!(
            "{:<6} {:<40} {:<40} {:>9} {:<10} {}",
            proto_name(m.protocol),
            m.internal.to_string(),
            m.external.to_string(),
            format!("{}s", m.lifetime),
            if m.checkpoint() { "yes" } else { "no" },
            m.description().unwrap_or("")
        );
    }
    exit::SUCCESS
}
