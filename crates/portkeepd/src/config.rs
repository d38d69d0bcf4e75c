//! The configuration file (TOML) and its validation into [`Settings`].
//!
//! Two stages, as in hickory's and ripgrep's binaries: serde reads the file
//! into [`ConfigFile`] rejecting unknown keys, then [`ConfigFile::validate`]
//! checks meaning and builds the core's [`ServerConfig`]. Every error names
//! the key and what was expected. `docs/config.md` documents each key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "portkeep-data";
/// Name of the control socket inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

use portkeep_proto::{CodePoints, Opcode, OptionCode, Protocol, ResultCode};
use portkeep_server::{Prefix, ServerConfig, StaticForward, SubscriberKeying};

use crate::checkpoint_config::{
    checkpoint_policy, named_subscribers, CheckpointSection, NamedEntry,
};
use crate::config_error::invalid;
pub use crate::config_error::ConfigError;
use serde::Deserialize;

/// The file as written. Every table rejects unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Directory for the store, the lock and the control socket.
    pub data_dir: Option<String>,
    /// Control socket path (default: `control.sock` in the data directory).
    pub control_socket: Option<String>,
    /// Addresses to serve PCP on.
    pub listen: Option<Vec<String>>,
    /// External addresses or prefixes mappings are allocated from.
    pub external_addresses: Option<Vec<String>>,
    /// External port range, "LOW-HIGH".
    pub port_range: Option<String>,
    /// Number of UDP worker threads (0 = one per core).
    pub workers: Option<usize>,
    /// Lifetime limits.
    #[serde(default)]
    pub lifetime: LifetimeSection,
    /// Error lifetimes.
    #[serde(default)]
    pub errors: ErrorSection,
    /// Subscriber keying and quota.
    #[serde(default)]
    pub subscribers: SubscriberSection,
    /// Server-wide limits.
    #[serde(default)]
    pub limits: LimitSection,
    /// THIRD_PARTY authorisation.
    #[serde(default)]
    pub third_party: ThirdPartySection,
    /// Unsolicited ANNOUNCE destinations.
    #[serde(default)]
    pub announce: AnnounceSection,
    /// Code points of the failure-scenarios draft.
    #[serde(default)]
    pub extensions: ExtensionSection,
    /// Dataplane selection.
    #[serde(default)]
    pub dataplane: DataplaneSection,
    /// Check-pointing policy (RFC 7767).
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Stable storage.
    #[serde(default)]
    pub store: StoreSection,
    /// Active/backup pair (RFC 7767).
    #[serde(default)]
    pub ha: crate::ha_config::HaSection,
    /// NAT-PMP (RFC 6886) on the PCP port.
    #[serde(default)]
    pub natpmp: NatPmpSection,
    /// `[[forward]]`: static port forwards.
    #[serde(default)]
    pub forward: Vec<ForwardEntry>,
    /// `[metrics]`: the Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[log]`: what the daemon logs.
    #[serde(default)]
    pub log: LogSection,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A tracing filter (`info`, `warn,portkeepd::node=debug`, ...); the
    /// command line's `--log-level` or `PORTKEEPD_LOG` wins over it.
    pub level: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `IP:PORT` to serve `GET /metrics` on; none: no endpoint.
    pub listen: Option<String>,
}

/// `[[forward]]`: one static port forward, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardEntry {
    /// `tcp`, `udp`, `sctp`, `dccp` or a protocol number.
    pub protocol: String,
    /// `IP:PORT` of the host behind the NAT.
    pub internal: String,
    /// `IP:PORT` on the public side; the address one of
    /// `external_addresses`.
    pub external: String,
    /// Shown as the mapping's DESCRIPTION.
    pub description: Option<String>,
}

impl ForwardEntry {
    fn validate(&self, i: usize, pool: &[IpAddr]) -> Result<StaticForward, ConfigError> {
        let key = |k: &str| format!("forward[{i}].{k}");
        let protocol = match self.protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::TCP,
            "udp" => Protocol::UDP,
            "sctp" => Protocol::SCTP,
            "dccp" => Protocol::DCCP,
            other => match other.parse::<u8>() {
                Ok(n) if n > 0 => Protocol(n),
                _ => {
                    return Err(invalid(
                        key("protocol"),
                        format!(
                            "`{other}`: expected tcp, udp, sctp, dccp or a protocol number 1-255"
                        ),
                    ))
                }
            },
        };
        let endpoint = |k: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            let a = v
                .parse::<SocketAddr>()
                .map_err(|_| invalid(key(k), format!("`{v}`: expected IP:PORT or [IPv6]:PORT")))?;
            if a.port() == 0 {
                return Err(invalid(key(k), "the port must not be 0"));
            }
            Ok(SocketAddr::new(
                portkeep_server::prefix::canonical(a.ip()),
                a.port(),
            ))
        };
        let internal = endpoint("internal", &self.internal)?;
        let external = endpoint("external", &self.external)?;
        if !pool.contains(&external.ip()) {
            return Err(invalid(
                key("external"),
                format!("{} is not one of external_addresses", external.ip()),
            ));
        }
        if let Some(d) = &self.description {
            if d.len() > 128 {
                return Err(invalid(key("description"), "at most 128 octets"));
            }
        }
        Ok(StaticForward {
            protocol,
            internal,
            external,
            description: self.description.clone(),
        })
    }
}

/// `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// "durable" (default), "relaxed" or "memory".
    pub mode: Option<String>,
    /// Page cache of the store, in MiB.
    pub cache_mb: Option<usize>,
    /// Microseconds the committer waits, after a quiet spell, for more
    /// requests to join the same commit.
    pub commit_delay_us: Option<u64>,
    /// Size of each write-ahead log segment, MiB.
    pub log_segment_mb: Option<u64>,
    /// Log already folded into the tables kept for resume, MiB.
    pub log_retention_mb: Option<u64>,
}

/// Validated `[store]` settings.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The store file; `None` in memory mode.
    pub path: Option<PathBuf>,
    /// Commit durability.
    pub durability: crate::store::Durability,
    /// What to do with a damaged store.
    pub recovery: crate::store::Recovery,
    /// Page cache size.
    pub cache_bytes: usize,
    /// Group-commit gathering delay.
    pub commit_delay: std::time::Duration,
    /// The write-ahead log.
    pub log: crate::store::LogOptions,
}

/// `[lifetime]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifetimeSection {
    /// Shortest granted lifetime, seconds.
    pub min: Option<u32>,
    /// Longest granted lifetime, seconds.
    pub max: Option<u32>,
}

/// `[errors]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorSection {
    /// Lifetime of long-lifetime errors, seconds.
    pub long_lifetime: Option<u32>,
    /// Lifetime of short-lifetime errors, seconds.
    pub short_lifetime: Option<u32>,
}

/// `[subscribers]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberSection {
    /// IPv4 prefix length that identifies a subscriber.
    pub ipv4_prefix_len: Option<u8>,
    /// IPv6 prefix length that identifies a subscriber.
    pub ipv6_prefix_len: Option<u8>,
    /// Mappings per subscriber.
    pub max_mappings: Option<u32>,
    /// Explicit subscribers: prefix -> id.
    pub named: Option<Vec<NamedEntry>>,
}

/// Whether `name` can be a Linux interface name (IFNAMSIZ is 16 with the
/// terminating NUL) that nft and netlink take as it is.
fn interface_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '/' && c != '\\')
}

/// `[limits] interfaces` as the kernel numbers them now. An interface
/// that does not exist is an error: serving every interface instead would
/// open the external side (RFC 6887 section 8.2), and serving none would
/// look like a dead server.
fn interface_indexes(names: &[String]) -> Result<Vec<u32>, ConfigError> {
    const KEY: &str = "limits.interfaces";
    names
        .iter()
        .map(|name| {
            if !interface_name_ok(name) {
                return Err(invalid(KEY, format!("`{name}` is not an interface name")));
            }
            nix::net::if_::if_nametoindex(name.as_str())
                .map_err(|e| invalid(KEY, format!("no interface `{name}` here: {e}")))
        })
        .collect()
}

/// The longest `[limits] port_recycle_delay`: RFC 6887 section 15's
/// longest interval is a TCP idle timeout (124 minutes, RFC 5382); a day
/// is far past any, and keeps a typo from locking a pool for years.
const MAX_RECYCLE_DELAY_S: u64 = 86_400;

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSection {
    /// Mappings in the whole server.
    pub max_mappings: Option<u32>,
    /// FILTER rules per mapping.
    pub max_filters: Option<usize>,
    /// Replies handled and waiting for the committer, beyond which new
    /// datagrams are shed.
    pub max_queued_replies: Option<usize>,
    /// Datagrams per subscriber (`N/s`, `N/min`, `N/h`, or "off").
    pub subscriber_rate: Option<String>,
    /// Back to back within `subscriber_rate`.
    pub subscriber_burst: Option<u32>,
    /// Error responses, server-wide (`N/s`, ..., or "off").
    pub error_rate: Option<String>,
    /// Client prefixes served (default: every client).
    pub clients: Option<Vec<String>>,
    /// Seconds a freed external port is held back from other clients
    /// (RFC 6887 section 15); 0: not at all.
    pub port_recycle_delay: Option<u64>,
    /// Interfaces PCP is served on (default: every one).
    pub interfaces: Option<Vec<String>>,
}

/// `[third_party]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThirdPartySection {
    /// Client prefixes allowed to use THIRD_PARTY.
    pub allow: Option<Vec<String>>,
}

/// `[announce]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceSection {
    /// Interfaces to multicast unsolicited ANNOUNCEs on.
    pub multicast_interfaces: Option<Vec<String>>,
    /// Client addresses to unicast them to.
    pub unicast: Option<Vec<String>>,
    /// Sends per announcement (RFC 6887 section 14.1.3: at most ten).
    pub sends: Option<u8>,
    /// Most ANNOUNCEs per second, server-wide.
    pub rate: Option<u32>,
}

/// `[natpmp]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatPmpSection {
    /// Answer NAT-PMP (version 0) requests (default true; RFC 6886
    /// section 5's switch).
    pub enabled: Option<bool>,
    /// Speak NAT-PMP only: PCP requests get NAT-PMP's "unsupported
    /// version" (default false).
    pub only: Option<bool>,
}

/// `[extensions]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionSection {
    /// GET opcode.
    pub get_opcode: Option<u8>,
    /// NEXT option code.
    pub next_option: Option<u8>,
    /// NONEXIST_MAP result code.
    pub nonexist_map_result: Option<u8>,
}

/// `[dataplane]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    /// "memory" (default) or "nftables".
    pub kind: Option<String>,
    /// nftables: the table Portkeep owns (family inet).
    pub table: Option<String>,
    /// nftables: "keep" (default) or "flush" the table on a clean stop.
    pub on_stop: Option<String>,
    /// nftables: interfaces inbound mappings apply on.
    pub external_interfaces: Option<Vec<String>>,
    /// nftables: interfaces whose outbound traffic the SNAT pins apply to.
    pub internal_interfaces: Option<Vec<String>>,
    /// nftables: path of the `nft` binary.
    pub nft_path: Option<String>,
    /// nftables: formerly the `conntrack` binary; accepted and unused.
    pub conntrack_path: Option<String>,
    /// nftables: delete the flows of removed mappings (default true).
    pub conntrack_cleanup: Option<bool>,
    /// nftables: how long the committer waits for one batch.
    pub timeout_ms: Option<u64>,
    /// "nat" (default) or "firewall".
    pub mode: Option<String>,
    /// firewall mode: the internal IPv6 prefixes Portkeep firewalls.
    pub firewall_prefixes: Option<Vec<String>>,
    /// firewall mode, nftables: the mark bits set on accepted packets.
    pub accept_mark: Option<u32>,
}

/// Which dataplane to program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataplaneKind {
    /// Remember rules in memory only.
    Memory,
    /// Program the Linux NAT through nftables.
    Nftables(crate::nft::NftSettings),
}

impl std::fmt::Display for DataplaneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataplaneKind::Memory => f.write_str("memory"),
            DataplaneKind::Nftables(n) => write!(f, "nftables (table inet {})", n.table),
        }
    }
}

impl DataplaneSection {
    /// `mode` and `firewall_prefixes`: the prefixes Portkeep is a firewall
    /// for (empty in NAT mode).
    fn firewall_prefixes(&self) -> Result<Vec<Prefix>, ConfigError> {
        const KEY: &str = "dataplane.firewall_prefixes";
        match self.mode.as_deref() {
            None | Some("nat") => {
                if self.firewall_prefixes.is_some() || self.accept_mark.is_some() {
                    return Err(invalid(
                        "dataplane.mode",
                        "firewall_prefixes and accept_mark need mode = \"firewall\"",
                    ));
                }
                return Ok(Vec::new());
            }
            Some("firewall") => {}
            Some(other) => {
                return Err(invalid(
                    "dataplane.mode",
                    format!("unknown mode `{other}` (expected \"nat\" or \"firewall\")"),
                ))
            }
        }
        let items = self.firewall_prefixes.as_deref().unwrap_or_default();
        if items.is_empty() {
            return Err(invalid(
                KEY,
                "mode = \"firewall\" needs at least one IPv6 prefix",
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        for s in items {
            let p: Prefix = s
                .parse()
                .map_err(|e: portkeep_server::prefix::PrefixError| invalid(KEY, e.to_string()))?;
            // An IPv4-mapped prefix stands for IPv4 addresses too.
            let v4 = portkeep_server::prefix::canonical(p.addr()).is_ipv4() && p.len() >= 96;
            if p.addr().is_ipv4() || v4 {
                return Err(invalid(
                    KEY,
                    format!("`{s}` is not an IPv6 prefix (firewall mode is for IPv6 only)"),
                ));
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Checks the section; every error names its key.
    fn validate(self) -> Result<DataplaneKind, ConfigError> {
        let firewall_prefixes = self.firewall_prefixes()?;
        if self.accept_mark == Some(0) {
            return Err(invalid("dataplane.accept_mark", "must not be 0"));
        }
        let nft_keys = self.table.is_some()
            || self.accept_mark.is_some()
            || self.on_stop.is_some()
            || self.external_interfaces.is_some()
            || self.internal_interfaces.is_some()
            || self.nft_path.is_some()
            || self.conntrack_path.is_some()
            || self.conntrack_cleanup.is_some()
            || self.timeout_ms.is_some();
        match self.kind.as_deref() {
            None | Some("memory") => {
                if nft_keys {
                    return Err(invalid(
                        "dataplane.kind",
                        "the nftables keys need kind = \"nftables\"",
                    ));
                }
                return Ok(DataplaneKind::Memory);
            }
            Some("nftables") => {}
            Some(other) => {
                return Err(invalid(
                    "dataplane.kind",
                    format!("unknown dataplane `{other}` (expected \"memory\" or \"nftables\")"),
                ))
            }
        }
        let mut n = crate::nft::NftSettings::default();
        if let Some(t) = self.table {
            // nft identifiers; anything else would need quoting.
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.starts_with(|c: char| c.is_ascii_alphabetic())
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(invalid(
                    "dataplane.table",
                    format!("`{t}` is not a table name (letters, digits, `_`, `-`; at most 64, starting with a letter)"),
                ));
            }
            n.table = t;
        }
        n.on_stop = match self.on_stop.as_deref() {
            None | Some("keep") => crate::nft::OnStop::Keep,
            Some("flush") => crate::nft::OnStop::Flush,
            Some(other) => {
                return Err(invalid(
                    "dataplane.on_stop",
                    format!("unknown value `{other}` (expected \"keep\" or \"flush\")"),
                ))
            }
        };
        let ifaces = |key: &str, v: Option<Vec<String>>| -> Result<Vec<String>, ConfigError> {
            let v = v.unwrap_or_default();
            for name in &v {
                if !interface_name_ok(name) {
                    return Err(invalid(key, format!("`{name}` is not an interface name")));
                }
            }
            Ok(v)
        };
        n.external_interfaces = ifaces("dataplane.external_interfaces", self.external_interfaces)?;
        n.internal_interfaces = ifaces("dataplane.internal_interfaces", self.internal_interfaces)?;
        if let Some(p) = self.nft_path {
            if p.is_empty() {
                return Err(invalid("dataplane.nft_path", "must not be empty"));
            }
            n.nft = PathBuf::from(p);
        }
        if let Some(p) = self.conntrack_path {
            if p.is_empty() {
                return Err(invalid("dataplane.conntrack_path", "must not be empty"));
            }
            // Flows are deleted over ctnetlink now; the key stays valid so
            // that existing configurations still load.
        }
        if self.conntrack_cleanup == Some(false) {
            n.conntrack_cleanup = false;
        }
        if let Some(ms) = self.timeout_ms {
            if !(10..=60_000).contains(&ms) {
                return Err(invalid(
                    "dataplane.timeout_ms",
                    format!("{ms} is out of range (10 to 60000)"),
                ));
            }
            n.timeout = std::time::Duration::from_millis(ms);
        }
        if !firewall_prefixes.is_empty() {
            n.firewall = Some(crate::nft::FirewallSettings {
                prefixes: firewall_prefixes,
                accept_mark: self.accept_mark.unwrap_or(crate::nft::DEFAULT_ACCEPT_MARK),
            });
        }
        Ok(DataplaneKind::Nftables(n))
    }
}

/// Validated settings for the daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory for the store, the lock and the control socket.
    pub data_dir: PathBuf,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Where to serve PCP.
    pub listen: Vec<SocketAddr>,
    /// UDP worker threads.
    pub workers: usize,
    /// The core's configuration.
    pub server: ServerConfig,
    /// Interfaces for multicast ANNOUNCE (`None`: those of the specific
    /// `listen` addresses, see `runtime::listen_interfaces`).
    pub announce_interfaces: Option<Vec<String>>,
    /// Unicast ANNOUNCE destinations.
    pub announce_unicast: Vec<SocketAddr>,
    /// Dataplane.
    pub dataplane: DataplaneKind,
    /// Stable storage.
    pub store: StoreSettings,
    /// Role and replication link.
    pub ha: crate::ha_config::HaSettings,
    /// Bound of the reply queue (the committer's): past it, workers
    /// shed datagrams before the core handles them.
    pub max_queued_replies: usize,
    /// Where to serve Prometheus metrics (`[metrics] listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// The log filter (`[log] level`), checked; `None`: not set.
    pub log_level: Option<String>,
}

/// Default of `[limits] max_queued_replies`: about a quarter of a second
/// of replies at the daemon's measured peak, so a stalled disk or
/// dataplane costs bounded memory (a few MB) while ordinary bursts pass.
pub const DEFAULT_MAX_QUEUED_REPLIES: usize = 65_536;

/// Name of the store file inside the data directory.
pub const STORE_FILE: &str = "store.redb";

impl Settings {
    /// Points the data directory (and what lives in it) somewhere else.
    pub fn set_data_dir(&mut self, dir: PathBuf) {
        self.control_socket = dir.join(CONTROL_SOCKET);
        if self.store.path.is_some() {
            self.store.path = Some(dir.join(STORE_FILE));
        }
        self.data_dir = dir;
    }
}

/// The embedded default: loopback on both families, in-memory dataplane,
/// external address 192.0.2.1 (TEST-NET-1, RFC 5737).
pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:5351", "[::1]:5351"];

impl ConfigFile {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner().to_string();
            let message = if key.is_empty() || key == "." {
                inner.trim_end().to_owned()
            } else {
                format!("key `{key}`: {}", inner.trim_end())
            };
            ConfigError::Parse {
                path: origin.to_owned(),
                message,
            }
        })
    }

    /// Checks meaning and builds [`Settings`].
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let d = ServerConfig::default();
        let listen = match self.listen {
            Some(v) if v.is_empty() => return Err(invalid("listen", "needs at least one address")),
            Some(v) => v
                .iter()
                .map(|s| parse_listen(s).map_err(|m| invalid("listen", m)))
                .collect::<Result<Vec<_>, _>>()?,
            None => DEFAULT_LISTEN
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        };
        let external_addresses = match self.external_addresses {
            None => d.external_addresses.clone(),
            Some(v) => expand_pool(&v)?,
        };
        let (port_min, port_max) = match self.port_range {
            None => (d.port_min, d.port_max),
            Some(s) => parse_range(&s).map_err(|m| invalid("port_range", m))?,
        };
        let min_lifetime = self.lifetime.min.unwrap_or(d.min_lifetime);
        let max_lifetime = self.lifetime.max.unwrap_or(d.max_lifetime);
        if min_lifetime == 0 {
            return Err(invalid("lifetime.min", "must be at least 1 second"));
        }
        if max_lifetime < min_lifetime {
            return Err(invalid(
                "lifetime.max",
                format!("{max_lifetime} is below lifetime.min ({min_lifetime})"),
            ));
        }
        let ipv4_prefix_len = self
            .subscribers
            .ipv4_prefix_len
            .unwrap_or(d.subscriber_keying.ipv4_prefix_len);
        if !(1..=32).contains(&ipv4_prefix_len) {
            return Err(invalid("subscribers.ipv4_prefix_len", "expected 1 to 32"));
        }
        let ipv6_prefix_len = self
            .subscribers
            .ipv6_prefix_len
            .unwrap_or(d.subscriber_keying.ipv6_prefix_len);
        if !(1..=128).contains(&ipv6_prefix_len) {
            return Err(invalid("subscribers.ipv6_prefix_len", "expected 1 to 128"));
        }
        let named = named_subscribers(self.subscribers.named.as_deref().unwrap_or_default())?;
        let checkpoint =
            checkpoint_policy(self.checkpoint, ipv4_prefix_len, ipv6_prefix_len, &named)?;
        let max_mappings = self.limits.max_mappings.unwrap_or(d.max_mappings);
        if max_mappings == 0 {
            return Err(invalid("limits.max_mappings", "must be at least 1"));
        }
        let third_party_clients = self
            .third_party
            .allow
            .unwrap_or_default()
            .iter()
            .map(|s| s.parse::<Prefix>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("third_party.allow", e.to_string()))?;
        let cp = CodePoints {
            get_opcode: Opcode(self.extensions.get_opcode.unwrap_or(Opcode::GET.0)),
            next_option: OptionCode(self.extensions.next_option.unwrap_or(OptionCode::NEXT.0)),
            nonexist_map: ResultCode(
                self.extensions
                    .nonexist_map_result
                    .unwrap_or(ResultCode::NONEXIST_MAP.0),
            ),
        };
        // The draft's code points were never assigned by IANA; only the
        // private-use ranges of RFC 6887 section 19 are safe to squat.
        if !(96..=126).contains(&cp.get_opcode.0) {
            return Err(invalid(
                "extensions.get_opcode",
                format!(
                    "{} is outside the private-use opcodes 96-126",
                    cp.get_opcode.0
                ),
            ));
        }
        if !(96..=126).contains(&cp.next_option.0) {
            return Err(invalid(
                "extensions.next_option",
                format!(
                    "{} is outside the private-use mandatory options 96-126",
                    cp.next_option.0
                ),
            ));
        }
        if !(192..=254).contains(&cp.nonexist_map.0) {
            return Err(invalid(
                "extensions.nonexist_map_result",
                format!(
                    "{} is outside the private-use result codes 192-254",
                    cp.nonexist_map.0
                ),
            ));
        }
        let long_error_lifetime = self.errors.long_lifetime.unwrap_or(d.long_error_lifetime);
        let short_error_lifetime = self.errors.short_lifetime.unwrap_or(d.short_error_lifetime);
        // RFC 6887 section 7.4: the error lifetime tells the client how long
        // to wait; 0 would invite an immediate retry storm.
        if long_error_lifetime == 0 {
            return Err(invalid("errors.long_lifetime", "must be at least 1 second"));
        }
        if short_error_lifetime == 0 {
            return Err(invalid(
                "errors.short_lifetime",
                "must be at least 1 second",
            ));
        }
        let max_per_subscriber = self
            .subscribers
            .max_mappings
            .unwrap_or(d.max_mappings_per_subscriber);
        if max_per_subscriber == 0 {
            return Err(invalid(
                "subscribers.max_mappings",
                "must be at least 1 (0 would refuse every mapping)",
            ));
        }
        let announce_unicast = self
            .announce
            .unicast
            .unwrap_or_default()
            .iter()
            .map(|s| parse_client(s).map_err(|m| invalid("announce.unicast", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let rate_of = |key: &str,
                       text: &Option<String>,
                       fallback: Option<portkeep_server::RateLimit>,
                       burst: Option<u32>| {
            let Some(t) = text else {
                return Ok(fallback.map(|r| portkeep_server::RateLimit {
                    burst: burst.unwrap_or(r.burst),
                    ..r
                }));
            };
            if t == "off" {
                return Ok(None);
            }
            let (count, per) =
                crate::checkpoint_config::parse_rate(t).map_err(|m| invalid(key, m))?;
            Ok(Some(portkeep_server::RateLimit {
                count,
                per,
                burst: burst.unwrap_or(count).max(1),
            }))
        };
        let request_rate = rate_of(
            "limits.subscriber_rate",
            &self.limits.subscriber_rate,
            d.request_rate,
            self.limits.subscriber_burst,
        )?;
        if self.limits.subscriber_burst == Some(0) {
            return Err(invalid("limits.subscriber_burst", "must be at least 1"));
        }
        let error_rate = rate_of(
            "limits.error_rate",
            &self.limits.error_rate,
            d.error_rate,
            None,
        )?;
        let port_recycle_delay = match self.limits.port_recycle_delay {
            None => d.port_recycle_delay,
            Some(s) if s <= MAX_RECYCLE_DELAY_S => std::time::Duration::from_secs(s),
            Some(_) => {
                return Err(invalid(
                    "limits.port_recycle_delay",
                    format!("at most {MAX_RECYCLE_DELAY_S} seconds (a day)"),
                ))
            }
        };
        let clients = self
            .limits
            .clients
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                p.parse::<Prefix>()
                    .map_err(|e| invalid("limits.clients", format!("`{p}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let interfaces = interface_indexes(self.limits.interfaces.as_deref().unwrap_or_default())?;
        let ad = portkeep_server::AnnounceConfig::default();
        let announce = portkeep_server::AnnounceConfig {
            sends: match self.announce.sends {
                None => ad.sends,
                Some(n @ 1..=10) => n,
                Some(n) => {
                    return Err(invalid(
                        "announce.sends",
                        format!("{n}: expected 1 to 10 (RFC 6887 section 14.1.3)"),
                    ))
                }
            },
            rate: match self.announce.rate {
                None => ad.rate,
                Some(0) => {
                    return Err(invalid(
                        "announce.rate",
                        "must be at least 1 (ANNOUNCEs are delayed, never dropped)",
                    ))
                }
                Some(n) => n,
            },
        };
        let firewall_prefixes = self.dataplane.firewall_prefixes()?;
        if let Some(a) = external_addresses
            .iter()
            .find(|a| firewall_prefixes.iter().any(|p| p.contains(**a)))
        {
            // Its mappings would translate to an address that is also
            // some firewalled host's own.
            return Err(invalid(
                "dataplane.firewall_prefixes",
                format!("external address {a} lies in a firewalled prefix"),
            ));
        }
        if !firewall_prefixes.is_empty() && external_addresses.len() > usize::from(u16::MAX) {
            return Err(invalid(
                "dataplane.firewall_prefixes",
                "firewall mode allows at most 65535 external addresses",
            ));
        }
        let dataplane = self.dataplane.validate()?;
        let workers = match self.workers {
            None | Some(0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) if n > 64 => return Err(invalid("workers", "expected 0 to 64")),
            Some(n) => n,
        };
        let data_dir = PathBuf::from(self.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let control_socket = self
            .control_socket
            .map_or_else(|| data_dir.join(CONTROL_SOCKET), PathBuf::from);
        use crate::store::{Durability, Recovery};
        let (store_path, durability) = match self.store.mode.as_deref() {
            None | Some("durable") => (Some(data_dir.join(STORE_FILE)), Durability::Durable),
            Some("relaxed") => (Some(data_dir.join(STORE_FILE)), Durability::Relaxed),
            Some("memory") => (None, Durability::Durable),
            Some(other) => {
                return Err(invalid(
                    "store.mode",
                    format!(
                        "unknown mode `{other}` (expected \"durable\", \"relaxed\" or \"memory\")"
                    ),
                ))
            }
        };
        let cache_mb = self.store.cache_mb.unwrap_or(64);
        if !(1..=65536).contains(&cache_mb) {
            return Err(invalid("store.cache_mb", "expected 1 to 65536"));
        }
        let commit_delay_us = self.store.commit_delay_us.unwrap_or(500);
        if commit_delay_us > 100_000 {
            return Err(invalid("store.commit_delay_us", "expected 0 to 100000"));
        }
        let segment_mb = self.store.log_segment_mb.unwrap_or(16);
        if !(1..=1024).contains(&segment_mb) {
            return Err(invalid("store.log_segment_mb", "expected 1 to 1024"));
        }
        let retention_mb = self.store.log_retention_mb.unwrap_or(64);
        if retention_mb > 65536 {
            return Err(invalid("store.log_retention_mb", "expected 0 to 65536"));
        }
        let store = StoreSettings {
            path: store_path,
            durability,
            recovery: Recovery::Fail,
            cache_bytes: cache_mb << 20,
            commit_delay: std::time::Duration::from_micros(commit_delay_us),
            log: crate::store::LogOptions {
                segment_bytes: segment_mb << 20,
                retention_bytes: retention_mb << 20,
            },
        };
        let ha = self.ha.validate()?;
        let max_queued_replies = self
            .limits
            .max_queued_replies
            .unwrap_or(DEFAULT_MAX_QUEUED_REPLIES);
        if !(64..=16_777_216).contains(&max_queued_replies) {
            return Err(invalid(
                "limits.max_queued_replies",
                "expected 64 to 16777216",
            ));
        }
        if self.natpmp.only == Some(true) && self.natpmp.enabled == Some(false) {
            return Err(invalid(
                "natpmp.only",
                "speaking NAT-PMP only needs NAT-PMP enabled",
            ));
        }
        let mut static_forwards: Vec<StaticForward> = Vec::new();
        let mut per_sub: std::collections::HashMap<portkeep_server::SubscriberId, u32> =
            Default::default();
        let keying = SubscriberKeying {
            ipv4_prefix_len,
            ipv6_prefix_len,
            named: named.clone(),
        };
        for (i, f) in self.forward.iter().enumerate() {
            let f = f.validate(i, &external_addresses)?;
            if let Some(j) = static_forwards.iter().position(|g| {
                g.key() == f.key() || g.protocol == f.protocol && g.external == f.external
            }) {
                return Err(invalid(
                    format!("forward[{i}]"),
                    format!("its internal or external endpoint is forward[{j}]'s too"),
                ));
            }
            let n = per_sub
                .entry(keying.subscriber_of(f.internal.ip()))
                .or_default();
            *n += 1;
            if *n > max_per_subscriber {
                return Err(invalid(
                    format!("forward[{i}]"),
                    format!(
                        "more forwards to one subscriber than its quota (subscribers.max_mappings = {max_per_subscriber})"
                    ),
                ));
            }
            static_forwards.push(f);
        }
        if static_forwards.len() > max_mappings as usize {
            return Err(invalid("forward", "more forwards than limits.max_mappings"));
        }
        let metrics_listen = match &self.metrics.listen {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics.listen",
                    format!("`{a}`: expected IP:PORT or [IPv6]:PORT"),
                )
            })?),
        };
        if let Some(level) = &self.log.level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| invalid("log.level", format!("`{level}`: {e}")))?;
        }
        Ok(Settings {
            log_level: self.log.level.clone(),
            metrics_listen,
            max_queued_replies,
            data_dir,
            control_socket,
            listen,
            workers,
            server: ServerConfig {
                external_addresses,
                port_min,
                port_max,
                min_lifetime,
                max_lifetime,
                long_error_lifetime: self.errors.long_lifetime.unwrap_or(d.long_error_lifetime),
                short_error_lifetime: self.errors.short_lifetime.unwrap_or(d.short_error_lifetime),
                subscriber_keying: SubscriberKeying {
                    ipv4_prefix_len,
                    ipv6_prefix_len,
                    named,
                },
                max_mappings_per_subscriber: max_per_subscriber,
                max_mappings,
                max_filters_per_mapping: self
                    .limits
                    .max_filters
                    .unwrap_or(d.max_filters_per_mapping),
                third_party_clients,
                code_points: cp,
                checkpoint,
                announce,
                request_rate,
                error_rate,
                clients,
                natpmp: self.natpmp.enabled.unwrap_or(d.natpmp),
                pcp: !self.natpmp.only.unwrap_or(false),
                port_recycle_delay,
                interfaces,
                seed: rand::random(),
                static_forwards,
                firewall_prefixes,
            },
            announce_interfaces: self.announce.multicast_interfaces,
            announce_unicast,
            dataplane,
            store,
            ha,
        })
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, or a bare IP meaning port 5351.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, portkeep_proto::SERVER_PORT))
        .map_err(|_| {
            format!("`{s}` is not an address (expected e.g. 127.0.0.1:5351 or [::1]:5351)")
        })
}

fn parse_client(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, portkeep_proto::CLIENT_PORT))
        .map_err(|_| {
            format!("`{s}` is not an address (expected e.g. 198.51.100.7 or 198.51.100.7:5350)")
        })
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{s}` is not a port range (expected LOW-HIGH, e.g. 1024-65535)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = a.trim().parse().map_err(|_| bad())?;
    let hi: u16 = b.trim().parse().map_err(|_| bad())?;
    if lo == 0 || hi < lo {
        return Err(format!("`{s}`: expected 1 <= LOW <= HIGH <= 65535"));
    }
    Ok((lo, hi))
}

/// Expands addresses and prefixes (at most 65536 addresses in all).
fn expand_pool(items: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    const KEY: &str = "external_addresses";
    let mut out = Vec::new();
    for s in items {
        let p: Prefix = s
            .parse()
            .map_err(|e: portkeep_server::prefix::PrefixError| invalid(KEY, e.to_string()))?;
        let host_bits = if p.addr().is_ipv4() { 32 } else { 128 } - u32::from(p.len());
        if host_bits > 16 {
            return Err(invalid(
                KEY,
                format!("{p} is too large (at most 65536 addresses)"),
            ));
        }
        let base: u128 = match p.addr() {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        for i in 0..(1u128 << host_bits) {
            let n = base + i;
            out.push(match p.addr() {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(n as u32)),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(n)),
            });
        }
        if out.len() > 65536 {
            return Err(invalid(KEY, "more than 65536 addresses in all"));
        }
    }
    if out.is_empty() {
        return Err(invalid(KEY, "needs at least one address"));
    }
    // `::ffff:192.0.2.1` is 192.0.2.1: compare in canonical form.
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = out
        .iter()
        .find(|a| !seen.insert(portkeep_server::prefix::canonical(**a)))
    {
        return Err(invalid(KEY, format!("{dup} is listed twice")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match ConfigFile::parse(text, "test.toml").and_then(ConfigFile::validate) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rfc6887_s8_2_interfaces_are_resolved_and_an_unknown_one_is_an_error() {
        let base = "external_addresses = [\"192.0.2.1\"]\n[limits]\n";
        let s = ConfigFile::parse(&format!("{base}interfaces = [\"lo\"]"), "x")
            .unwrap()
            .validate()
            .unwrap();
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(s.server.interfaces, vec![lo]);
        let e = err(&format!("{base}interfaces = [\"pk-no-such0\"]"));
        assert!(
            e.contains("limits.interfaces") && e.contains("pk-no-such0"),
            "{e}"
        );
        let e = err(&format!("{base}interfaces = [\"a/b\"]"));
        assert!(e.contains("limits.interfaces"), "{e}");
    }

    #[test]
    fn rfc6887_s15_port_recycle_delay_is_read_and_bounded() {
        let base = "external_addresses = [\"192.0.2.1\"]\n[limits]\n";
        let delay = |body: &str| {
            ConfigFile::parse(&format!("{base}{body}"), "x")
                .unwrap()
                .validate()
                .unwrap()
                .server
                .port_recycle_delay
        };
        assert_eq!(delay(""), std::time::Duration::from_secs(120), "default");
        assert_eq!(delay("port_recycle_delay = 0"), std::time::Duration::ZERO);
        assert_eq!(
            delay("port_recycle_delay = 7440"),
            std::time::Duration::from_secs(7440)
        );
        let e = err(&format!("{base}port_recycle_delay = 86401"));
        assert!(e.contains("limits.port_recycle_delay"), "{e}");
        let e = err(&format!("{base}port_recycle_delay = -1"));
        assert!(e.contains("port_recycle_delay"), "{e}");
    }

    #[test]
    fn static_forwards_are_read_and_every_error_names_its_forward() {
        let base = "external_addresses = [\"192.0.2.1\"]\n";
        let ok = format!(
            "{base}[[forward]]\nprotocol = \"tcp\"\ninternal = \"192.168.1.20:22\"\nexternal = \"192.0.2.1:2222\"\ndescription = \"ssh\"\n\
             [[forward]]\nprotocol = \"17\"\ninternal = \"[2001:db8::5]:53\"\nexternal = \"192.0.2.1:53\"\n"
        );
        let s = ConfigFile::parse(&ok, "x").unwrap().validate().unwrap();
        let f = &s.server.static_forwards;
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].protocol, Protocol::TCP);
        assert_eq!(f[0].external, "192.0.2.1:2222".parse().unwrap());
        assert_eq!(f[0].description.as_deref(), Some("ssh"));
        assert_eq!(f[1].protocol, Protocol::UDP);
        let one = |body: &str| err(&format!("{base}[[forward]]\n{body}"));
        let e = one("protocol = \"gre\"\ninternal = \"10.0.0.1:1\"\nexternal = \"192.0.2.1:1\"\n");
        assert!(e.contains("forward[0].protocol"), "{e}");
        let e = one("protocol = \"tcp\"\ninternal = \"10.0.0.1\"\nexternal = \"192.0.2.1:1\"\n");
        assert!(e.contains("forward[0].internal"), "{e}");
        let e =
            one("protocol = \"tcp\"\ninternal = \"10.0.0.1:1\"\nexternal = \"198.51.100.1:1\"\n");
        assert!(
            e.contains("forward[0].external") && e.contains("not one of external_addresses"),
            "{e}"
        );
        let e = one("protocol = \"tcp\"\ninternal = \"10.0.0.1:0\"\nexternal = \"192.0.2.1:1\"\n");
        assert!(e.contains("forward[0].internal"), "{e}");
        let e = one(
            "protocol = \"tcp\"\ninternal = \"10.0.0.1:1\"\nexternal = \"192.0.2.1:1\"\nport = 3\n",
        );
        assert!(e.contains("unknown field `port`"), "{e}");
        let twice = format!(
            "{base}[[forward]]\nprotocol = \"tcp\"\ninternal = \"10.0.0.1:1\"\nexternal = \"192.0.2.1:1\"\n\
             [[forward]]\nprotocol = \"tcp\"\ninternal = \"10.0.0.2:1\"\nexternal = \"192.0.2.1:1\"\n"
        );
        let e = err(&twice);
        assert!(
            e.contains("forward[1]") && e.contains("forward[0]'s too"),
            "{e}"
        );
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let s = ConfigFile::parse("", "x").unwrap().validate().unwrap();
        assert_eq!(s.listen.len(), 2);
        assert_eq!(
            s.server.external_addresses,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!((s.server.min_lifetime, s.server.max_lifetime), (120, 86400));
        assert_eq!(s.dataplane, DataplaneKind::Memory);
    }

    #[test]
    fn full_example_parses() {
        let text = include_str!("../../../examples/portkeepd.toml");
        let s = ConfigFile::parse(text, "example")
            .unwrap()
            .validate()
            .unwrap();
        assert!(s.server.external_addresses.len() > 1);
    }

    /// The etcd example names only keys that exist (its files are not
    /// here, so it is parsed, not validated).
    #[test]
    fn etcd_example_parses() {
        let text = include_str!("../../../examples/etcd/nat-a.toml");
        ConfigFile::parse(text, "example").unwrap();
    }

    #[test]
    fn ha_coordinator_errors_name_the_key() {
        let pair = "[ha]\nrole = \"backup\"\nlisten = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\nplaintext = true\n[ha.coordinator]\n";
        assert!(err(pair).contains("ha.coordinator.etcd"));
        let with = |extra: &str| format!("{pair}etcd = [\"http://127.0.0.1:2379\"]\n{extra}");
        assert!(err(&format!("{pair}etcd = [\"127.0.0.1:2379\"]")).contains("not an http"));
        assert!(err(&with("ttl_s = 1")).contains("ha.coordinator.ttl_s"));
        assert!(err(&with("margin_ms = 5000")).contains("ha.coordinator.margin_ms"));
        assert!(err(&with("prefix = \"x\"")).contains("ha.coordinator.prefix"));
        assert!(err(&with("name = \"a/b\"")).contains("ha.coordinator.name"));
        assert!(err(&with("tls_cert = \"c.pem\"")).contains("ha.coordinator.tls_ca"));
        assert!(err(&with("ttl = 3")).contains("unknown field `ttl`"));
        let standalone = "[ha.coordinator]\netcd = [\"http://127.0.0.1:2379\"]\n";
        assert!(err(standalone).contains("ha.coordinator"));
        let built = ConfigFile::parse(&with("name = \"a\""), "x")
            .unwrap()
            .validate();
        if cfg!(feature = "etcd") {
            let s = built.unwrap();
            let c = s.ha.coordinator.unwrap();
            assert_eq!((c.name.as_str(), c.prefix.as_str()), ("a", "/portkeep"));
            assert_eq!(c.timing.ttl, std::time::Duration::from_secs(3));
        } else {
            let e = built.unwrap_err().to_string();
            assert!(e.contains("cargo feature `etcd`"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("listne = []").contains("unknown field `listne`"));
        assert!(err("[lifetime]\nmin = \"x\"").contains("key `lifetime.min`"));
        assert!(err("[lifetime]\nmin = \"x\"").contains("expected u32"));
        assert!(err("[lifetime]\nmin = 300\nmax = 200").contains("`lifetime.max`"));
        assert!(err("port_range = \"9-2\"").contains("`port_range`"));
        assert!(err("port_range = \"abc\"").contains("`port_range`"));
        assert!(err("external_addresses = [\"10.0.0.0/8\"]").contains("too large"));
        assert!(err("external_addresses = [\"banana\"]").contains("`external_addresses`"));
        assert!(err("external_addresses = [\"192.0.2.1\", \"192.0.2.1\"]").contains("twice"));
        assert!(err("listen = [\"nowhere\"]").contains("`listen`"));
        assert!(err("[subscribers]\nipv6_prefix_len = 0").contains("ipv6_prefix_len"));
        assert!(err("[third_party]\nallow = [\"1.2.3.4/40\"]").contains("third_party.allow"));
        assert!(err("[dataplane]\nkind = \"pf\"").contains("dataplane.kind"));
        assert!(err("[dataplane]\ntable = \"x\"").contains("dataplane.kind"));
        let nft = "[dataplane]\nkind = \"nftables\"\n";
        assert!(err(&format!("{nft}table = \"a b\"")).contains("dataplane.table"));
        assert!(err(&format!("{nft}on_stop = \"maybe\"")).contains("dataplane.on_stop"));
        assert!(err(&format!("{nft}external_interfaces = [\"a\\\"b\"]"))
            .contains("dataplane.external_interfaces"));
        assert!(err(&format!(
            "{nft}internal_interfaces = [\"0123456789abcdef\"]"
        ))
        .contains("dataplane.internal_interfaces"));
        assert!(err(&format!("{nft}nft_path = \"\"")).contains("dataplane.nft_path"));
        assert!(err(&format!("{nft}timeout_ms = 5")).contains("dataplane.timeout_ms"));
        assert!(err(&format!("{nft}timeout_ms = 60001")).contains("dataplane.timeout_ms"));
        assert!(err("[dataplane]\ntimeout_ms = 100").contains("dataplane.kind"));
        assert!(err("[extensions]\nget_opcode = 1").contains("extensions.get_opcode"));
        assert!(err("[extensions]\nnext_option = 200").contains("extensions.next_option"));
        assert!(err("[extensions]\nnext_option = 5").contains("extensions.next_option"));
        assert!(err("[extensions]\nget_opcode = 127").contains("extensions.get_opcode"));
        assert!(err("[extensions]\nnonexist_map_result = 255").contains("nonexist_map_result"));
        assert!(err("[errors]\nlong_lifetime = 0").contains("errors.long_lifetime"));
        assert!(err("[subscribers]\nmax_mappings = 0").contains("subscribers.max_mappings"));
        assert!(
            err("external_addresses = [\"192.0.2.1\", \"::ffff:192.0.2.1\"]").contains("twice")
        );
        assert!(err("[surprise]\nx = 1").contains("surprise"));
    }

    #[test]
    fn prefixes_expand_into_the_pool() {
        let s = ConfigFile::parse(
            "external_addresses = [\"192.0.2.0/30\", \"2001:db8::1\"]",
            "x",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(s.server.external_addresses.len(), 5);
    }

    #[test]
    fn nftables_section() {
        let s = ConfigFile::parse(
            "[dataplane]\nkind = \"nftables\"\ntable = \"pk_test\"\non_stop = \"flush\"\n\
             external_interfaces = [\"wan0\"]\ninternal_interfaces = [\"lan0\", \"lan1\"]\n\
             conntrack_cleanup = false\ntimeout_ms = 500",
            "x",
        )
        .unwrap()
        .validate()
        .unwrap();
        let DataplaneKind::Nftables(n) = s.dataplane else {
            panic!("not nftables: {:?}", s.dataplane);
        };
        assert_eq!(n.table, "pk_test");
        assert_eq!(n.on_stop, crate::nft::OnStop::Flush);
        assert_eq!(n.external_interfaces, vec!["wan0"]);
        assert_eq!(n.internal_interfaces, vec!["lan0", "lan1"]);
        assert!(!n.conntrack_cleanup);
        assert_eq!(n.timeout, std::time::Duration::from_millis(500));
        assert_eq!(n.nft, PathBuf::from("nft"));
        assert_eq!(n.firewall, None);
        assert!(s.server.firewall_prefixes.is_empty());
    }

    #[test]
    fn firewall_mode() {
        let s = ConfigFile::parse(
            "[dataplane]\nkind = \"nftables\"\nmode = \"firewall\"\n\
             firewall_prefixes = [\"2001:db8:1::/48\", \"2001:db8:2::/48\"]\n\
             accept_mark = 0x100",
            "x",
        )
        .unwrap()
        .validate()
        .unwrap();
        let DataplaneKind::Nftables(n) = s.dataplane else {
            panic!("not nftables: {:?}", s.dataplane);
        };
        let fw = n.firewall.unwrap();
        assert_eq!(fw.accept_mark, 0x100);
        assert_eq!(fw.prefixes.len(), 2);
        assert_eq!(s.server.firewall_prefixes, fw.prefixes);
        // The server decides in any dataplane; the mark has its default.
        let s = ConfigFile::parse(
            "[dataplane]\nmode = \"firewall\"\nfirewall_prefixes = [\"2001:db8:1::/48\"]",
            "x",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(s.dataplane, DataplaneKind::Memory);
        assert_eq!(s.server.firewall_prefixes.len(), 1);
        let s = ConfigFile::parse(
            "[dataplane]\nkind = \"nftables\"\nmode = \"firewall\"\n\
             firewall_prefixes = [\"2001:db8:1::/48\"]",
            "x",
        )
        .unwrap()
        .validate()
        .unwrap();
        let DataplaneKind::Nftables(n) = s.dataplane else {
            panic!("not nftables");
        };
        assert_eq!(
            n.firewall.map(|f| f.accept_mark),
            Some(crate::nft::DEFAULT_ACCEPT_MARK)
        );
    }

    #[test]
    fn firewall_mode_errors_name_their_key() {
        let fw = "[dataplane]\nkind = \"nftables\"\nmode = \"firewall\"\n";
        assert!(err("[dataplane]\nmode = \"bridge\"").contains("dataplane.mode"));
        assert!(
            err("[dataplane]\nfirewall_prefixes = [\"2001:db8::/32\"]").contains("dataplane.mode")
        );
        assert!(err("[dataplane]\nmode = \"nat\"\naccept_mark = 1").contains("dataplane.mode"));
        assert!(err(fw).contains("dataplane.firewall_prefixes"));
        assert!(err(&format!("{fw}firewall_prefixes = []")).contains("dataplane.firewall_prefixes"));
        let e = err(&format!("{fw}firewall_prefixes = [\"192.0.2.0/24\"]"));
        assert!(
            e.contains("dataplane.firewall_prefixes") && e.contains("IPv6"),
            "{e}"
        );
        assert!(err(&format!(
            "{fw}firewall_prefixes = [\"::ffff:192.0.2.0/120\"]"
        ))
        .contains("dataplane.firewall_prefixes"));
        assert!(err(&format!("{fw}firewall_prefixes = [\"nonsense\"]"))
            .contains("dataplane.firewall_prefixes"));
        assert!(
            err(&format!("{fw}firewall_prefixes = [\"2001:db8::/200\"]"))
                .contains("dataplane.firewall_prefixes")
        );
        let e = err(&format!(
            "external_addresses = [\"2001:db8:1::1\"]\n{fw}firewall_prefixes = [\"2001:db8:1::/48\"]"
        ));
        assert!(
            e.contains("dataplane.firewall_prefixes") && e.contains("2001:db8:1::1"),
            "{e}"
        );
        assert!(err(&format!(
            "{fw}firewall_prefixes = [\"2001:db8::/32\"]\naccept_mark = 0"
        ))
        .contains("dataplane.accept_mark"));
        assert!(err(&format!(
            "{fw}firewall_prefixes = [\"2001:db8::/32\"]\naccept_mark = -1"
        ))
        .contains("accept_mark"));
        assert!(err(
            "[dataplane]\nmode = \"firewall\"\nfirewall_prefixes = [\"2001:db8::/32\"]\naccept_mark = 1"
        )
        .contains("dataplane.kind"));
    }
}
