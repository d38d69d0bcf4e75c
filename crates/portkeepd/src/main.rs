//! `portkeepd`: the Portkeep PCP server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use portkeepd::config::{parse_listen, ConfigFile};
use portkeepd::Daemon;

/// Portkeep PCP server (RFC 6887). With no arguments it serves on loopback
/// with an in-memory dataplane, so you can try it at once:
/// `portkeep map tcp 8080` in another terminal.
#[derive(Debug, Parser)]
#[command(name = "portkeepd", version)]
struct Args {
    /// TOML configuration file (see docs/config.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve PCP on, replacing the config's `listen`
    /// (repeatable; a bare IP means port 5351).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    listen: Vec<std::net::SocketAddr>,
    /// Check the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    #[arg(
        long,
        value_name = "LEVEL",
        default_value = "info",
        env = "PORTKEEPD_LOG"
    )]
    log_level: String,
}

fn main() -> ExitCode {
    // Usage errors exit 64 (EX_USAGE), as the `portkeep` CLI's do;
    // configuration errors 78 (EX_CONFIG).
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("portkeepd: bad --log-level `{}`: {e}", args.log_level);
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let file = match &args.config {
        Some(p) => ConfigFile::load(p),
        None => Ok(ConfigFile::default()),
    };
    let mut settings = match file.and_then(ConfigFile::validate) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portkeepd: {e}");
            return ExitCode::from(78);
        }
    };
    if !args.listen.is_empty() {
        settings.listen = args.listen.clone();
    }
    let s = &settings.server;
    let summary = format!(
        "listen {}; external {} ({} address{}), ports {}-{}; lifetimes {}-{} s; {} mappings per subscriber; dataplane {}",
        settings.listen.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        s.external_addresses.first().map(ToString::to_string).unwrap_or_default(),
        s.external_addresses.len(),
        if s.external_addresses.len() == 1 { "" } else { "es" },
        s.port_min,
        s.port_max,
        s.min_lifetime,
        s.max_lifetime,
        s.max_mappings_per_subscriber,
        settings.dataplane,
    );
    if args.check_config {
        println!("configuration OK: {summary}");
        return ExitCode::SUCCESS;
    }
    let daemon = match Daemon::start(settings) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(1);
        }
    };
    tracing::info!("portkeepd serving PCP: {summary}");
    wait_for_signal();
    tracing::info!("shutting down");
    daemon.shutdown();
    ExitCode::SUCCESS
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot wait for signals: {e}");
            return;
        }
    };
    rt.block_on(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}
