//! `portkeepd`: the Portkeep PCP server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portkeepd::config::{parse_listen, ConfigFile};
use portkeepd::Daemon;

/// Portkeep PCP server (RFC 6887). With no arguments it serves on loopback
/// with an in-memory dataplane, so you can try it at once:
/// `portkeep map tcp 8080` in another terminal.
#[derive(Debug, Parser)]
#[command(name = "portkeepd", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory for the store, the lock and the control socket, replacing
    /// the config's `data_dir` (default ./portkeep-data, created if missing).
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (see docs/config.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve PCP on, replacing the config's `listen`
    /// (repeatable; a bare IP means port 5351).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    listen: Vec<std::net::SocketAddr>,
    /// Serve Prometheus metrics (`GET /metrics`) on ADDR, replacing the
    /// config's `[metrics] listen`.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Check the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
    /// What to do when the store cannot be read: `fail` (stop with an error,
    /// the default) or `fresh` (move it aside and start with no mappings;
    /// every client's epoch resets).
    #[arg(long, value_enum, value_name = "HOW", default_value = "fail")]
    store_recovery: StoreRecovery,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    /// Wins over the config's `[log] level`, which a reload can change;
    /// without either: info.
    #[arg(long, value_name = "LEVEL", env = "PORTKEEPD_LOG")]
    log_level: Option<String>,
    /// Log lines as `text`, or `json` (one object per line: time, level,
    /// message and fields), for log shippers. Under systemd (when
    /// `JOURNAL_STREAM` is set) text lines carry no time or colour: the
    /// journal stamps them.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StoreRecovery {
    Fail,
    Fresh,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask a running portkeepd for its state through the control socket.
    Ctl(CtlArgs),
    /// Write a CA and one certificate per node for the replication link's
    /// mutual TLS (`ca.pem`, `NAME.pem`, `NAME.key`; see docs/ha.md).
    GenCerts {
        /// Directory to write into (created if missing).
        dir: PathBuf,
        /// Node names; each certificate carries its name, which the other
        /// node's `ha.peer_name` must match.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Write the manual pages and shell completions the package installs
    /// (`man/`, `completions/{bash,zsh,fish}/` under DIR).
    #[command(hide = true)]
    PackageFiles {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// Control socket (default: control.sock in the data directory).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Role, uptime, epoch, number of mappings.
    Status,
    /// Every mapping with its external endpoint, expiry and flags.
    Mappings,
    /// Requests received and replies by result code.
    Counters,
    /// Remove mappings and reset the epoch of the subscribers affected,
    /// announcing it to their hosts (failure-scenarios draft 2.6.2).
    Clear(ClearArgs),
    /// Become active: install the check-pointed state received as backup
    /// and serve (keepalived's notify hook on MASTER).
    Promote,
    /// Stop serving, drop this node's state and wait for the active's link
    /// as backup (keepalived's notify hook on BACKUP or FAULT).
    Demote,
    /// Read the configuration file again and serve it (as SIGHUP does):
    /// what takes a restart is named, a file that does not validate
    /// changes nothing.
    Reload,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct ClearArgs {
    /// One subscriber: its id as `ctl mappings` shows it, or any of its addresses.
    #[arg(long, value_name = "ID")]
    subscriber: Option<String>,
    /// Every mapping whose internal address is in the prefix.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Every mapping; the server-wide epoch restarts.
    #[arg(long)]
    all: bool,
    /// One mapping: `PROTO/IP:PORT`, its internal side (and the PEER
    /// mappings of that endpoint).
    #[arg(long, value_name = "PROTO/IP:PORT")]
    mapping: Option<String>,
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
    let log = match LogLevel::init(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("portkeepd: {e}");
            return ExitCode::from(64);
        }
    };
    match &args.command {
        Some(Command::Ctl(ctl)) => return run_ctl(&args, ctl),
        Some(Command::GenCerts { dir, names }) => {
            return match portkeepd::ha_config::generate_certs(dir, names) {
                Ok(files) => {
                    for f in files {
                        println!("wrote {}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portkeepd gen-certs: {e:#}");
                    ExitCode::from(73)
                }
            };
        }
        Some(Command::PackageFiles { dir }) => {
            return match package_files(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "portkeepd package-files: cannot write {}: {e}",
                        dir.display()
                    );
                    ExitCode::from(73)
                }
            };
        }
        None => {}
    }
    let settings = match load_settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portkeepd: {e}");
            return ExitCode::from(78);
        }
    };
    let s = &settings.server;
    let summary = format!(
        "data {} (store: {}); listen {}; external {} ({} address{}), ports {}-{}; lifetimes {}-{} s; {} mappings per subscriber; dataplane {}",
        settings.data_dir.display(),
        match (&settings.store.path, settings.store.durability) {
            (None, _) => "memory only",
            (Some(_), portkeepd::store::Durability::Durable) => "durable",
            (Some(_), portkeepd::store::Durability::Relaxed) => "relaxed",
        },
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
    log.apply(settings.log_level.as_deref());
    let daemon = match Daemon::start(settings) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e:#}");
            // EX_DATAERR for a store that cannot be read: the operator must
            // choose (restore it, or --store-recovery=fresh).
            let damaged = matches!(
                e.downcast_ref::<portkeepd::store::StoreError>(),
                Some(portkeepd::store::StoreError::Damaged { .. })
            );
            return ExitCode::from(if damaged { 65 } else { 1 });
        }
    };
    tracing::info!("portkeepd serving PCP: {summary}");
    // The store is loaded and the dataplane holds every stored mapping:
    // ready, for a Type=notify unit (sd_notify(3)).
    notify(&format!("READY=1\nSTATUS=serving PCP: {summary}"));
    let stop_watchdog = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        if let Some(every) = watchdog_interval() {
            let (daemon, stop) = (&daemon, &stop_watchdog);
            scope.spawn(move || feed_watchdog(daemon, every, stop));
        }
        wait_for_signal(&daemon, &args, &log);
        stop_watchdog.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let failed = daemon.has_failed();
    if !failed {
        tracing::info!("shutting down");
    }
    notify("STOPPING=1");
    daemon.shutdown();
    if failed {
        // EX_SOFTWARE-style: the store failed and the daemon stopped itself.
        return ExitCode::from(70);
    }
    ExitCode::SUCCESS
}

/// Sends one sd_notify(3) message to `$NOTIFY_SOCKET`, if systemd gave
/// one (a path, or `@` and an abstract name); nothing otherwise.
fn notify(msg: &str) {
    use std::os::unix::ffi::OsStrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|sock| {
        match path.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &addr)
            }
            None => sock.send_to(msg.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd ({}): {e}", path.to_string_lossy());
    }
}

/// Half the watchdog timeout systemd set (`$WATCHDOG_USEC`, for this
/// process when `$WATCHDOG_PID` names one), as sd_watchdog_enabled(3)
/// advises; `None` without a watchdog.
fn watchdog_interval() -> Option<std::time::Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

/// Feeds the watchdog only while every serving loop turns: a daemon whose
/// worker or the committer hangs stops feeding it and systemd restarts
/// it, where a timer would keep a hung daemon alive.
fn feed_watchdog(
    daemon: &Daemon,
    every: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut seen = Vec::new();
    // Every loop turns at least every 100 ms: never look more often.
    let every = every.max(std::time::Duration::from_millis(250));
    let _ = daemon.stalled_loops(&mut seen);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(every);
        let stalled = daemon.stalled_loops(&mut seen);
        if stalled.is_empty() {
            notify("WATCHDOG=1");
        } else {
            tracing::error!(
                "serving loops made no progress for {every:?}: {}; not feeding the watchdog",
                stalled.join(", ")
            );
        }
    }
}

/// The configuration file (or the embedded default) with the command
/// line's overrides, validated.
fn load_settings(args: &Args) -> Result<portkeepd::Settings, portkeepd::ConfigError> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p),
        None => Ok(ConfigFile::default()),
    };
    let mut settings = file.and_then(ConfigFile::validate)?;
    if args.metrics_listen.is_some() {
        settings.metrics_listen = args.metrics_listen;
    }
    if !args.listen.is_empty() {
        settings.listen = args.listen.clone();
    }
    if let Some(dir) = &args.data_dir {
        settings.set_data_dir(dir.clone());
    }
    settings.store.recovery = match args.store_recovery {
        StoreRecovery::Fail => portkeepd::store::Recovery::Fail,
        StoreRecovery::Fresh => portkeepd::store::Recovery::Fresh,
    };
    Ok(settings)
}

/// SIGHUP or `ctl reload`: reads the configuration again and serves it;
/// a file that does not validate changes nothing (the running
/// configuration stays, and the log says why).
fn reload(daemon: &Daemon, args: &Args, log: &LogLevel) {
    let outcome = match load_settings(args) {
        Err(e) => {
            tracing::error!("reload refused, still serving the previous configuration: {e}");
            serde_json::json!({"ok": false, "error": e.to_string()})
        }
        Ok(settings) => match daemon.reload(&settings) {
            Err(e) => {
                tracing::error!("reload refused, still serving the previous configuration: {e:#}");
                serde_json::json!({"ok": false, "error": format!("{e:#}")})
            }
            Ok(r) => {
                if !r.need_restart.is_empty() {
                    tracing::warn!(
                        "reload: {} changed but take a restart; still as started",
                        r.need_restart.join(", ")
                    );
                }
                tracing::info!(
                    ended = r.ended,
                    config_digest = %r.config_digest,
                    "reloaded the configuration{}",
                    if r.ended > 0 {
                        format!("; {} mappings ended (their external address left the pool), their subscribers told", r.ended)
                    } else {
                        String::new()
                    }
                );
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["ok"] = serde_json::json!(true);
                log.apply(settings.log_level.as_deref());
                v["log_level"] = serde_json::json!(log.current());
                v
            }
        },
    };
    daemon.note_reload(outcome);
}

/// Blocks until SIGINT or SIGTERM, or until the daemon stops itself;
/// reloads on SIGHUP and on `ctl reload`.
fn wait_for_signal(daemon: &Daemon, args: &Args, log: &LogLevel) {
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
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot wait for SIGHUP: reloads only through ctl reload");
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => reload(daemon, args, log),
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    if daemon.has_failed() {
                        break;
                    }
                    if daemon.take_reload_request() {
                        reload(daemon, args, log);
                    }
                }
            }
        }
    });
}

/// `portkeepd ctl`: one request to the control socket, printed for people
/// or as JSON.
fn run_ctl(args: &Args, ctl: &CtlArgs) -> ExitCode {
    let socket = match (&ctl.socket, &args.data_dir, &args.config) {
        (Some(s), _, _) => s.clone(),
        (None, Some(d), _) => d.join(portkeepd::config::CONTROL_SOCKET),
        (None, None, Some(c)) => match ConfigFile::load(c).and_then(ConfigFile::validate) {
            Ok(s) => s.control_socket,
            Err(e) => {
                eprintln!("portkeepd: {e}");
                return ExitCode::from(78);
            }
        },
        (None, None, None) => PathBuf::from(portkeepd::config::DEFAULT_DATA_DIR)
            .join(portkeepd::config::CONTROL_SOCKET),
    };
    let request = match &ctl.what {
        CtlCommand::Status => serde_json::json!({ "command": "status" }),
        CtlCommand::Mappings => serde_json::json!({ "command": "mappings" }),
        CtlCommand::Counters => serde_json::json!({ "command": "counters" }),
        CtlCommand::Promote => serde_json::json!({ "command": "promote" }),
        CtlCommand::Demote => serde_json::json!({ "command": "demote" }),
        CtlCommand::Reload => serde_json::json!({ "command": "reload" }),
        CtlCommand::Clear(c) => match (&c.subscriber, &c.prefix, &c.mapping, c.all) {
            (Some(s), _, _, _) => serde_json::json!({ "command": "clear", "subscriber": s }),
            (_, Some(p), _, _) => serde_json::json!({ "command": "clear", "prefix": p }),
            (_, _, Some(m), _) => serde_json::json!({ "command": "clear", "mapping": m }),
            _ => serde_json::json!({ "command": "clear", "all": true }),
        },
    };
    let reply = match portkeepd::control::request(&socket, &request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portkeepd ctl: {e:#}");
            return ExitCode::from(69);
        }
    };
    if reply["ok"] != serde_json::Value::Bool(true) {
        eprintln!(
            "portkeepd ctl: {}",
            reply["error"]
                .as_str()
                .unwrap_or("the daemon refused the request")
        );
        return ExitCode::from(1);
    }
    if ctl.json {
        println!("{reply}");
        return ExitCode::SUCCESS;
    }
    match ctl.what {
        CtlCommand::Mappings => print_mappings(&reply),
        CtlCommand::Counters => print_counters(&reply),
        CtlCommand::Clear(_) => {
            println!("removed {} mapping(s)", reply["removed"]);
            for sub in reply["subscribers"].as_array().into_iter().flatten() {
                println!(
                    "  {}: {} mapping(s), epoch reset, ANNOUNCE sent to {}",
                    sub["subscriber"].as_str().unwrap_or(""),
                    sub["mappings"],
                    sub["announced_to"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|h| h.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "nobody (no hosts known)".into())
                );
            }
        }
        _ => {
            if let Some(obj) = reply.as_object() {
                for (k, v) in obj.iter().filter(|(k, _)| *k != "ok") {
                    match v {
                        serde_json::Value::String(s) => println!("{k}: {s}"),
                        serde_json::Value::Object(inner) => {
                            for (ik, iv) in inner {
                                match iv {
                                    serde_json::Value::String(s) => println!("{k}.{ik}: {s}"),
                                    other => println!("{k}.{ik}: {other}"),
                                }
                            }
                        }
                        other => println!("{k}: {other}"),
                    }
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// Counters, with the RFC 7767 check-point decisions one per line so that
/// a refusal reason can be read (and grepped) at a glance.
fn print_counters(reply: &serde_json::Value) {
    if let Some(obj) = reply.as_object() {
        for (k, v) in obj.iter().filter(|(k, _)| *k != "ok" && *k != "checkpoint") {
            println!("{k}: {v}");
        }
    }
    let c = &reply["checkpoint"];
    println!("checkpoint granted: {}", c["granted"]);
    // In evaluation order (RFC 7767 section 3.2 checks), not alphabetical.
    for reason in portkeep_server::RefusalReason::ALL {
        let name = reason.as_str();
        println!("checkpoint refused {name}: {}", c["refused"][name]);
    }
    println!("checkpoint forced by class: {}", c["forced"]);
    println!("checkpointed mappings: {}", c["checkpointed"]);
}

fn print_mappings(reply: &serde_json::Value) {
    let list = reply["mappings"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<5} {:<5} {:<28} {:<28} {:<24} {:>9} {:<4} {:<24} {:<10} NONCE",
        "KIND", "PROTO", "INTERNAL", "EXTERNAL", "REMOTE", "EXPIRES", "CKPT", "SUBSCRIBER", "CLASS"
    );
    for m in &list {
        let proto = m["protocol_name"]
            .as_str()
            .map_or_else(|| m["protocol"].to_string(), str::to_lowercase);
        let ip = m["internal_ip"].as_str().unwrap_or("");
        let internal = if ip.contains(':') {
            format!("[{ip}]:{}", m["internal_port"])
        } else {
            format!("{ip}:{}", m["internal_port"])
        };
        println!(
            "{:<5} {:<5} {:<28} {:<28} {:<24} {:>8}s {:<4} {:<24} {:<10} {}",
            m["kind"].as_str().unwrap_or(""),
            proto,
            internal,
            m["external"].as_str().unwrap_or(""),
            m["remote"].as_str().unwrap_or("-"),
            m["expires_in_s"],
            if m["checkpoint"] == serde_json::Value::Bool(true) {
                "yes"
            } else {
                "no"
            },
            m["subscriber_name"]
                .as_str()
                .or_else(|| m["subscriber"].as_str())
                .unwrap_or("-"),
            m["class"].as_str().unwrap_or("-"),
            m["nonce"].as_str().unwrap_or(""),
        );
    }
    println!(
        "{} mapping{}",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
}

/// The manual pages (section 8: a system daemon; one page per visible
/// subcommand, as `portkeepd-ctl.8`) and the bash, zsh and fish completions,
/// all generated from the argument definitions above so they never drift
/// from `--help`.
fn package_files(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    fn pages(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), dir)?;
        }
        clap_mangen::Man::new(cmd).section("8").generate_to(dir)?;
        Ok(())
    }
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    let mut cmd = Args::command().disable_help_subcommand(true);
    cmd.build();
    pages(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let out = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&out)?;
        clap_complete::generate_to(shell, &mut cmd, "portkeepd", &out)?;
    }
    Ok(())
}

/// The log filter in force, changed by a reload when the command line did
/// not fix it.
struct LogLevel {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    /// Set by `--log-level` or `PORTKEEPD_LOG`: `[log] level` is ignored.
    fixed: bool,
    current: std::sync::Mutex<String>,
}

impl LogLevel {
    /// Installs the logger: `--log-format`, on stderr, with the command
    /// line's filter or info until the configuration is read.
    fn init(args: &Args) -> Result<LogLevel, String> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let level = args.log_level.clone().unwrap_or_else(|| "info".to_owned());
        let filter = tracing_subscriber::EnvFilter::try_new(&level)
            .map_err(|e| format!("bad --log-level (or PORTKEEPD_LOG) `{level}`: {e}"))?;
        let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
        let journal = std::env::var_os("JOURNAL_STREAM").is_some();
        let fmt = tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr);
        let fmt = match (args.log_format, journal) {
            (LogFormat::Json, _) => fmt
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .boxed(),
            (LogFormat::Text, true) => fmt.without_time().with_ansi(false).boxed(),
            (LogFormat::Text, false) => fmt
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .boxed(),
        };
        tracing_subscriber::registry().with(filter).with(fmt).init();
        Ok(LogLevel {
            handle,
            fixed: args.log_level.is_some(),
            current: std::sync::Mutex::new(level),
        })
    }

    /// Serves the configuration's `[log] level` (info when it has none),
    /// unless the command line fixed the level. The change is logged at
    /// warn under whichever of the two filters shows it: the old one when
    /// the level goes down, the new one when it goes up. The
    /// configuration checked the filter already.
    fn apply(&self, configured: Option<&str>) {
        if self.fixed {
            return;
        }
        let want = configured.unwrap_or("info");
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *current == want {
            return;
        }
        let Ok(filter) = tracing_subscriber::EnvFilter::try_new(want) else {
            return;
        };
        let told = tracing::enabled!(tracing::Level::WARN);
        if told {
            tracing::warn!(from = %current, level = want, "log level changed");
        }
        if self.handle.reload(filter).is_err() {
            return;
        }
        if !told {
            tracing::warn!(from = %current, level = want, "log level changed");
        }
        want.clone_into(&mut current);
    }

    fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
