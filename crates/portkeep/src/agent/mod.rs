//! `portkeep agent`: the host's one PCP client (DESIGN.md "Client"; the
//! failure-scenarios draft section 2.2 suggests a per-host service that
//! mediates between applications and PCP). `agent run` is the daemon;
//! `add`, `remove`, `list`, `status` and `subscribe` talk to it over its
//! Unix socket ([`api`] documents the protocol).

pub(crate) mod api;
mod daemon;
mod dhcp;
mod metrics;
mod policy;
pub(crate) mod store;
mod watch;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::cli::Common;

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The agent's state directory: key, store, lock and API socket. Each
    /// agent on a host needs its own.
    #[arg(
        long,
        value_name = "DIR",
        env = "PORTKEEP_AGENT_DIR",
        default_value = "/var/lib/portkeep-agent",
        global = true
    )]
    pub(crate) state_dir: PathBuf,
    #[command(subcommand)]
    pub(crate) command: AgentCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Run the agent (towards the server given by the global `--server`).
    Run(RunArgs),
    /// Ask the agent to keep a mapping for an application.
    Add(AddArgs),
    /// Ask the agent to delete an application's mapping.
    Remove(KeyArgs),
    /// The agent's mappings.
    List,
    /// The agent's server, epoch and counters.
    Status,
    /// Print the agent's events, one JSON object per line, until interrupted.
    Subscribe,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// User settings (TOML): `server`, `[defaults]`, `[apps.NAME]`
    /// (`checkpoint`, `lifetime`). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Administrator policy (TOML): `[all]` and `[apps.NAME]` `checkpoint`;
    /// wins over the user and the application (RFC 7767 section 4).
    #[arg(long, value_name = "FILE")]
    pub(crate) policy: Option<PathBuf>,
    /// Source address of requests (default: the route's towards the server).
    #[arg(long, value_name = "IP")]
    pub(crate) bind: Option<IpAddr>,
    /// Where to listen for unsolicited ANNOUNCEs (repeatable; default
    /// 0.0.0.0:5350, which also joins 224.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub(crate) announce_listen: Vec<SocketAddr>,
    /// Do not listen for ANNOUNCEs (e.g. a second agent on the host).
    #[arg(long, conflicts_with = "announce_listen")]
    pub(crate) no_announce_listen: bool,
    /// After a lost store: how long applications have to ask again for
    /// the mappings found on the server before they are deleted.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub(crate) adopt_grace: f64,
    /// How long an application's mappings outlive its session with the
    /// agent (its API connection, or its last heartbeat) before they are
    /// deleted (failure-scenarios draft section 2.2); an application that
    /// comes back on the same port within it resumes them. Applications
    /// declared in the config and `persistent` adds are exempt. 0: never
    /// (every mapping stays until removed).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub(crate) app_grace: f64,
    /// Re-creations after a server lost state spread over this many ms.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub(crate) recreate_jitter_ms: u64,
    /// Use the IPv4 default gateway as the server (at the `--server`
    /// port), re-checked every 5 s; a change re-creates every mapping
    /// there (failure-scenarios draft section 2.1). `server` in the
    /// config file wins.
    #[arg(long)]
    pub(crate) server_from_gateway: bool,
    /// Use the PCP server the host's DHCP client learned (RFC 7291 options
    /// 158 and 86, read from dhclient and dhcpcd lease files; see
    /// docs/agent.md), at the `--server` port; without one, the default
    /// gateway as with `--server-from-gateway`. Re-checked with the
    /// gateway. `server` in the config file wins.
    #[arg(long)]
    pub(crate) server_from_dhcp: bool,
    /// Where `--server-from-dhcp` looks for lease files (repeatable;
    /// default: /var/lib/dhcp, /var/lib/dhclient, /var/lib/NetworkManager,
    /// /var/lib/dhcpcd, /var/db/dhcpcd).
    #[arg(long, value_name = "DIR", requires = "server_from_dhcp")]
    pub(crate) dhcp_lease_dir: Vec<PathBuf>,
    /// New requests per second at most (0: unlimited).
    #[arg(long, value_name = "N", default_value_t = 4000)]
    pub(crate) rate: u32,
    /// Lifetime asked for when neither the application nor the config says.
    #[arg(long, value_name = "SECONDS", default_value_t = portkeep_client::DEFAULT_LIFETIME)]
    pub(crate) lifetime: u32,
    /// Serve Prometheus metrics (`GET /metrics`) on ADDR: mappings kept,
    /// re-creations by cause, epoch failures (docs/agent.md).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The application's name.
    #[arg(long, value_name = "NAME")]
    pub(crate) app: String,
    /// tcp, udp, sctp, dccp or a number.
    #[arg(long, value_name = "PROTO")]
    pub(crate) protocol: String,
    /// Internal port.
    #[arg(long, value_name = "PORT")]
    pub(crate) port: u16,
}

#[derive(Debug, Args)]
pub(crate) struct AddArgs {
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// The application's wish for check-pointing (RFC 7767); the user's
    /// config and the administrator's policy may override it.
    #[arg(long, conflicts_with = "no_checkpoint")]
    pub(crate) checkpoint: bool,
    /// The application does not want check-pointing.
    #[arg(long)]
    pub(crate) no_checkpoint: bool,
    /// Keep the mapping until it is removed, whatever becomes of the
    /// caller (without it, a one-shot caller must send `heartbeat`s).
    #[arg(long)]
    pub(crate) persistent: bool,
    /// Make the mapping for another host, with THIRD_PARTY (RFC 6887
    /// section 13.1; the server must allow this host to).
    #[arg(long, value_name = "IP")]
    pub(crate) host: Option<IpAddr>,
    /// With --checkpoint: the user's settings cannot turn it off, only the
    /// administrator's policy can (RFC 7767 section 4, example 3: an
    /// emergency call).
    #[arg(long, requires = "checkpoint")]
    pub(crate) mandatory: bool,
    /// Requested lifetime in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) lifetime: Option<u32>,
}

/// Runs an `agent` verb.
pub(crate) fn run(common: &Common, args: &AgentArgs) -> ExitCode {
    let dir = args.state_dir.clone();
    let request = match &args.command {
        AgentCommand::Run(r) => {
            let announce_listen = if r.no_announce_listen {
                Vec::new()
            } else if r.announce_listen.is_empty() {
                vec![SocketAddr::from(([0, 0, 0, 0], 5350))]
            } else {
                r.announce_listen.clone()
            };
            let Ok(adopt_grace) = Duration::try_from_secs_f64(r.adopt_grace) else {
                eprintln!("error: --adopt-grace must be a non-negative number of seconds");
                return ExitCode::from(crate::exit::USAGE);
            };
            let Ok(app_grace) = Duration::try_from_secs_f64(r.app_grace) else {
                eprintln!("error: --app-grace must be a non-negative number of seconds");
                return ExitCode::from(crate::exit::USAGE);
            };
            return daemon::run(daemon::RunOptions {
                state_dir: dir,
                server: common.server,
                config: r.config.clone(),
                policy: r.policy.clone(),
                bind: r.bind,
                announce_listen,
                adopt_grace,
                app_grace: (!app_grace.is_zero()).then_some(app_grace),
                recreate_jitter: Duration::from_millis(r.recreate_jitter_ms),
                rate: r.rate,
                lifetime: r.lifetime,
                code_points: common.code_points(),
                server_from_gateway: r.server_from_gateway,
                server_from_dhcp: r.server_from_dhcp,
                dhcp_lease_dirs: if r.dhcp_lease_dir.is_empty() {
                    dhcp::DEFAULT_LEASE_DIRS.iter().map(PathBuf::from).collect()
                } else {
                    r.dhcp_lease_dir.clone()
                },
                metrics_listen: r.metrics_listen,
            });
        }
        AgentCommand::Subscribe => {
            return match api::subscribe(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(crate::exit::FAILURE)
                }
            };
        }
        AgentCommand::Add(a) => {
            let checkpoint = match (a.checkpoint, a.no_checkpoint) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            json!({"op": "add", "app": a.key.app, "protocol": a.key.protocol, "port": a.key.port,
                   "checkpoint": checkpoint, "mandatory": a.mandatory, "lifetime": a.lifetime,
                   "persistent": a.persistent, "host": a.host})
        }
        AgentCommand::Remove(k) => {
            json!({"op": "remove", "app": k.app, "protocol": k.protocol, "port": k.port})
        }
        AgentCommand::List => json!({"op": "list"}),
        AgentCommand::Status => json!({"op": "status"}),
    };
    match api::call(&dir, &request) {
        Ok(answer) => {
            let ok = answer["ok"] == json!(true);
            if common.json || !ok {
                println!("{answer}");
            } else {
                print_text(&answer);
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::exit::FAILURE)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(crate::exit::FAILURE)
        }
    }
}

fn print_text(answer: &serde_json::Value) {
    if let Some(list) = answer["mappings"].as_array() {
        for m in list {
            println!(
                "{:<12} {} {:<5} -> {:<22} {:<10} checkpoint={} ({}) honoured={}",
                m["app"].as_str().unwrap_or("?"),
                m["protocol"].as_str().unwrap_or("?"),
                m["port"],
                m["external"].as_str().unwrap_or("-"),
                m["state"].as_str().unwrap_or("?"),
                m["checkpoint"],
                m["checkpoint_source"].as_str().unwrap_or("?"),
                m["checkpoint_honoured"],
            );
        }
    } else if let Some(obj) = answer.as_object() {
        for (k, v) in obj {
            if k != "ok" {
                println!("{k}: {v}");
            }
        }
    }
}
