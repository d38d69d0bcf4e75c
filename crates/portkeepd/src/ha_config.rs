//! `[ha]`: the node's role in an active/backup pair and its replication
//! link (RFC 7767 section 1: check-pointing is "state replication and
//! synchronization between active and backup PCP-controlled devices").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

use crate::config_error::{invalid, ConfigError};

/// `[ha]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// "standalone" (default), "active" or "backup".
    pub role: Option<String>,
    /// Where this node accepts the link (when it is the backup).
    pub listen: Option<String>,
    /// Where the other node accepts it (when this node is active).
    pub peer: Option<String>,
    /// Certificate authority both nodes' certificates are issued by (PEM).
    pub tls_ca: Option<String>,
    /// This node's certificate chain (PEM).
    pub tls_cert: Option<String>,
    /// This node's private key (PEM).
    pub tls_key: Option<String>,
    /// The name the peer's certificate must carry.
    pub peer_name: Option<String>,
    /// No TLS on the link: only for a dedicated cable, and only when said.
    pub plaintext: Option<bool>,
    /// How long a check-pointed response waits for the backup, in ms.
    pub ack_timeout_ms: Option<u64>,
    /// Heartbeat interval, ms.
    pub heartbeat_ms: Option<u64>,
    /// Silence after which the other end is gone, ms.
    pub dead_after_ms: Option<u64>,
    /// The lease the active grants its backup, ms: a backup promoted
    /// within it of the active's last confirmation takes over hot; the
    /// active holds replies the backup has not acknowledged up to this
    /// long when the link fails or lags.
    pub stale_after_ms: Option<u64>,
    /// Items of recent changes the active keeps for a backup's resume.
    pub resume_items: Option<u64>,
    /// How long a node configured active that cannot reach its peer at
    /// start waits for it before serving what it stored, ms.
    pub peer_wait_ms: Option<u64>,
    /// `[ha.coordinator]`: an external witness decides which node serves.
    pub coordinator: Option<CoordinatorSection>,
}

/// `[ha.coordinator]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// The etcd cluster's client URLs (`http://` or `https://`).
    pub etcd: Option<Vec<String>>,
    /// This node's name in the election (default: the host name).
    pub name: Option<String>,
    /// The keys' prefix in etcd: one per pair (default `/portkeep`).
    pub prefix: Option<String>,
    /// The lease's time to live, seconds.
    pub ttl_s: Option<u64>,
    /// How much sooner than the lease can end the holder stops serving, ms.
    pub margin_ms: Option<u64>,
    /// How long an elected node that holds less than its peer recorded
    /// waits for the peer before serving what it has, ms.
    pub peer_wait_ms: Option<u64>,
    /// CA of the etcd servers' certificates (PEM), for `https://`.
    pub tls_ca: Option<String>,
    /// This node's client certificate for etcd (PEM), for mutual TLS.
    pub tls_cert: Option<String>,
    /// Its key (PEM).
    pub tls_key: Option<String>,
}

/// Validated `[ha.coordinator]`.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// This node's name.
    pub name: String,
    /// Key prefix.
    pub prefix: String,
    /// Lease timing.
    pub timing: portkeep_ha::witness::WitnessConfig,
    /// When the endpoints use TLS.
    pub tls: Option<CoordinatorTls>,
}

/// TLS to etcd, as PEM.
#[derive(Debug, Clone)]
pub struct CoordinatorTls {
    /// The etcd servers' CA.
    pub ca: Vec<u8>,
    /// This node's certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl CoordinatorSection {
    fn validate(self) -> Result<CoordinatorSettings, ConfigError> {
        let endpoints = self.etcd.unwrap_or_default();
        if endpoints.is_empty() {
            return Err(invalid(
                "ha.coordinator.etcd",
                "needed: the etcd cluster's client URLs",
            ));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(invalid(
                    "ha.coordinator.etcd",
                    format!("`{e}` is not an http:// or https:// URL"),
                ));
            }
        }
        let name = match self.name {
            Some(n) if n.is_empty() || n.contains('/') => {
                return Err(invalid(
                    "ha.coordinator.name",
                    "a non-empty name without `/`",
                ))
            }
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty() && !h.contains('/'))
                .ok_or_else(|| invalid("ha.coordinator.name", "no host name: set one"))?,
        };
        let prefix = self.prefix.unwrap_or_else(|| "/portkeep".into());
        if !prefix.starts_with('/') || prefix.ends_with('/') {
            return Err(invalid(
                "ha.coordinator.prefix",
                "starts with `/` and does not end with one",
            ));
        }
        let ttl_s = self.ttl_s.unwrap_or(3);
        if !(2..=60).contains(&ttl_s) {
            // etcd rounds a shorter lease up to its own minimum (about
            // 1.5 election timeouts), which would break the deadline.
            return Err(invalid("ha.coordinator.ttl_s", "expected 2 to 60"));
        }
        let ttl = Duration::from_secs(ttl_s);
        let margin = ms(
            "ha.coordinator.margin_ms",
            self.margin_ms,
            500,
            100,
            ttl_s * 1000 / 2,
        )?;
        let peer_wait = ms(
            "ha.coordinator.peer_wait_ms",
            self.peer_wait_ms,
            10_000,
            0,
            3_600_000,
        )?;
        let any_tls = endpoints.iter().any(|e| e.starts_with("https://"));
        let tls = match (self.tls_ca, self.tls_cert, self.tls_key) {
            (None, None, None) if !any_tls => None,
            (None, _, _) => {
                return Err(invalid(
                    "ha.coordinator.tls_ca",
                    "needed with https:// endpoints or a client certificate",
                ))
            }
            (Some(ca), cert, key) => {
                let ca = read_pem_file("ha.coordinator.tls_ca", &ca)?;
                let identity = match (cert, key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((
                        read_pem_file("ha.coordinator.tls_cert", &c)?,
                        read_pem_file("ha.coordinator.tls_key", &k)?,
                    )),
                    _ => {
                        return Err(invalid(
                            "ha.coordinator.tls_cert",
                            "tls_cert and tls_key go together",
                        ))
                    }
                };
                Some(CoordinatorTls { ca, identity })
            }
        };
        if tls.is_some() && !endpoints.iter().all(|e| e.starts_with("https://")) {
            return Err(invalid(
                "ha.coordinator.etcd",
                "with TLS configured every endpoint is https://",
            ));
        }
        if !cfg!(feature = "etcd") {
            return Err(invalid(
                "ha.coordinator",
                "this portkeepd was built without the etcd coordinator (cargo feature `etcd`)",
            ));
        }
        Ok(CoordinatorSettings {
            endpoints,
            name,
            prefix,
            timing: portkeep_ha::witness::WitnessConfig {
                ttl,
                margin,
                peer_wait,
            },
            tls,
        })
    }
}

/// The node's role (the pair's state machine defines it).
pub use portkeep_ha::Role;

/// TLS for the link, loaded.
#[derive(Clone)]
pub struct LinkTls {
    /// For accepting the active's connection (client certificate required).
    pub server: Arc<rustls::ServerConfig>,
    /// For connecting to the backup.
    pub client: Arc<rustls::ClientConfig>,
    /// The name the other node's certificate must carry: the active checks
    /// it in the handshake, the backup with [`LinkTls::check_peer`].
    pub peer_name: ServerName<'static>,
}

impl LinkTls {
    /// The backup's half of the name check, after the handshake verified
    /// the connecting node's chain against the pair's CA: its certificate
    /// must also be valid for `peer_name`, as the active requires of the
    /// backup's. Without this, any certificate the pair's CA ever issued
    /// could act as the active.
    pub fn check_peer(&self, conn: &rustls::ServerConnection) -> Result<(), String> {
        let cert = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("the peer presented no certificate")?;
        valid_for(cert, &self.peer_name)
    }
}

/// Whether `cert` names `name` (a DNS subject alternative name, matched
/// as a TLS client matches a server's).
fn valid_for(cert: &CertificateDer<'_>, name: &ServerName<'_>) -> Result<(), String> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("the peer's certificate does not parse: {e}"))?;
    ee.verify_is_valid_for_subject_name(name).map_err(|e| {
        format!(
            "the peer's certificate is not valid for `{}` (ha.peer_name): {e}",
            name.to_str()
        )
    })
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls")
            .field("peer_name", &self.peer_name)
            .finish()
    }
}

/// The replication link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Where this node accepts the link.
    pub listen: SocketAddr,
    /// Where the other node accepts it.
    pub peer: SocketAddr,
    /// `None`: plaintext, as the config explicitly asked.
    pub tls: Option<LinkTls>,
    /// Link timing.
    pub timing: portkeep_ha::ActiveConfig,
    /// See [`HaSection::stale_after_ms`].
    pub stale_after: Duration,
    /// See [`HaSection::peer_wait_ms`].
    pub peer_wait: Duration,
}

/// Validated `[ha]`.
#[derive(Debug, Clone)]
pub struct HaSettings {
    /// Role at start.
    pub role: Role,
    /// `None`: no link (standalone, or a cold standby).
    pub link: Option<LinkSettings>,
    /// `None`: promotion is the operator's (or keepalived's).
    pub coordinator: Option<CoordinatorSettings>,
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            role: Role::Standalone,
            link: None,
            coordinator: None,
        }
    }
}

fn ms(key: &str, v: Option<u64>, default: u64, lo: u64, hi: u64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(invalid(key, format!("expected {lo} to {hi}")));
    }
    Ok(Duration::from_millis(v))
}

fn addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(key, format!("`{v}` is not IP:PORT")))
}

impl HaSection {
    /// Checks meaning, and loads the TLS material so a bad file is a
    /// configuration error rather than a failure at the first connection.
    pub fn validate(self) -> Result<HaSettings, ConfigError> {
        let role = match self.role.as_deref() {
            None | Some("standalone") => Role::Standalone,
            Some("active") => Role::Active,
            Some("backup") => Role::Backup,
            Some(other) => {
                return Err(invalid(
                    "ha.role",
                    format!(
                    "unknown role `{other}` (expected \"standalone\", \"active\" or \"backup\")"
                ),
                ))
            }
        };
        let link = match (&self.listen, &self.peer) {
            (None, None) => None,
            (Some(_), None) => return Err(invalid("ha.peer", "needed with ha.listen")),
            (None, Some(_)) => return Err(invalid("ha.listen", "needed with ha.peer")),
            (Some(l), Some(p)) => {
                if role == Role::Standalone {
                    return Err(invalid(
                        "ha.role",
                        "a replication link needs role \"active\" or \"backup\"",
                    ));
                }
                let listen = addr("ha.listen", l)?;
                let peer = addr("ha.peer", p)?;
                let files = [&self.tls_ca, &self.tls_cert, &self.tls_key];
                let plaintext = self.plaintext.unwrap_or(false);
                let tls = match (files.iter().all(|f| f.is_some()), plaintext) {
                    (true, true) => {
                        return Err(invalid(
                            "ha.plaintext",
                            "TLS files are configured too: choose one",
                        ))
                    }
                    (true, false) => Some(load_tls(
                        self.tls_ca.as_deref().unwrap_or_default(),
                        self.tls_cert.as_deref().unwrap_or_default(),
                        self.tls_key.as_deref().unwrap_or_default(),
                        self.peer_name.as_deref(),
                    )?),
                    (false, true) => None,
                    (false, false) => {
                        return Err(invalid(
                            "ha.tls_ca",
                            "the replication link needs tls_ca, tls_cert and tls_key (mutual TLS), or `plaintext = true` for a dedicated cable",
                        ))
                    }
                };
                let dead_after = ms("ha.dead_after_ms", self.dead_after_ms, 1000, 50, 60_000)?;
                let timing = portkeep_ha::ActiveConfig {
                    ack_timeout: ms("ha.ack_timeout_ms", self.ack_timeout_ms, 200, 1, 60_000)?,
                    heartbeat: ms("ha.heartbeat_ms", self.heartbeat_ms, 100, 10, 10_000)?,
                    dead_after,
                    snapshot_part: 512,
                    lease: ms("ha.stale_after_ms", self.stale_after_ms, 1500, 0, 60_000)?,
                    resume_items: {
                        let n = self.resume_items.unwrap_or(262_144);
                        if n > 16_777_216 {
                            return Err(invalid("ha.resume_items", "expected 0 to 16777216"));
                        }
                        n as usize
                    },
                };
                if timing.heartbeat >= dead_after {
                    return Err(invalid("ha.heartbeat_ms", "must be below ha.dead_after_ms"));
                }
                Some(LinkSettings {
                    listen,
                    peer,
                    tls,
                    timing,
                    stale_after: timing.lease,
                    peer_wait: ms("ha.peer_wait_ms", self.peer_wait_ms, 10_000, 0, 3_600_000)?,
                })
            }
        };
        if role == Role::Active && link.is_none() {
            return Err(invalid(
                "ha.peer",
                "role \"active\" needs the replication link (ha.listen and ha.peer)",
            ));
        }
        let coordinator = match self.coordinator {
            None => None,
            Some(_) if role == Role::Standalone => return Err(invalid(
                "ha.coordinator",
                "a coordinator decides between the nodes of a pair: role \"active\" or \"backup\"",
            )),
            Some(c) => Some(c.validate()?),
        };
        Ok(HaSettings {
            role,
            link,
            coordinator,
        })
    }
}

fn read_pem_file(key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(Path::new(path)).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// Loads the pair's CA, this node's certificate and key, and builds both
/// ends' TLS configurations: each side requires the other to present a
/// certificate issued by the CA (mutual authentication).
fn load_tls(
    ca: &str,
    cert: &str,
    key: &str,
    peer_name: Option<&str>,
) -> Result<LinkTls, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_pem = read_pem_file("ha.tls_ca", ca)?;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| invalid("ha.tls_ca", format!("{ca}: {e}")))?;
        roots
            .add(c)
            .map_err(|e| invalid("ha.tls_ca", format!("{ca}: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(invalid("ha.tls_ca", format!("{ca} holds no certificate")));
    }
    let roots = Arc::new(roots);
    let cert_pem = read_pem_file("ha.tls_cert", cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("ha.tls_cert", format!("{cert}: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(
            "ha.tls_cert",
            format!("{cert} holds no certificate"),
        ));
    }
    let key_pem = read_pem_file("ha.tls_key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid("ha.tls_key", format!("{key}: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| invalid("ha.tls_ca", e.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid("ha", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), private.clone_key())
        .map_err(|e| invalid("ha.tls_key", format!("{key} does not match {cert}: {e}")))?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid("ha", e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .map_err(|e| invalid("ha.tls_key", format!("{key} does not match {cert}: {e}")))?;
    let name = peer_name.unwrap_or("portkeep-peer").to_owned();
    let peer_name = ServerName::try_from(name.clone())
        .map_err(|_| invalid("ha.peer_name", format!("`{name}` is not a DNS name")))?;
    Ok(LinkTls {
        server: Arc::new(server),
        client: Arc::new(client),
        peer_name,
    })
}

/// Writes a certificate authority and one certificate per node name into
/// `dir` (`ca.pem`, `<name>.pem`, `<name>.key`), for `portkeepd gen-certs`:
/// the pair's own CA, so nothing else can join the link.
pub fn generate_certs(dir: &Path, names: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Portkeep pair CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let mut written = Vec::new();
    let mut write = |name: String, text: String, secret: bool| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&p)?;
        f.write_all(text.as_bytes())?;
        written.push(p);
        Ok(())
    };
    write("ca.pem".into(), ca.pem(), false)?;
    for n in names {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![n.clone()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, n.as_str());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write(format!("{n}.pem"), cert.pem(), false)?;
        write(format!("{n}.key"), key.serialize_pem(), true)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each node's TLS from `generate_certs`: (own name, peer name).
    fn nodes(dir: &Path, pairs: &[(&str, &str)]) -> Vec<LinkTls> {
        let names: Vec<String> = pairs.iter().map(|(n, _)| (*n).to_owned()).collect();
        generate_certs(dir, &names).unwrap();
        let p = |f: String| dir.join(f).display().to_string();
        pairs
            .iter()
            .map(|(n, peer)| {
                load_tls(
                    &p("ca.pem".into()),
                    &p(format!("{n}.pem")),
                    &p(format!("{n}.key")),
                    Some(peer),
                )
                .unwrap()
            })
            .collect()
    }

    /// A TLS handshake in memory; the server's end after it.
    fn handshake(client: &LinkTls, server: &LinkTls) -> rustls::ServerConnection {
        let mut c =
            rustls::ClientConnection::new(client.client.clone(), client.peer_name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(server.server.clone()).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        s
    }

    #[test]
    fn backup_accepts_only_the_certificate_named_peer_name() {
        let dir = tempfile::tempdir().unwrap();
        // node-c has a certificate from the same CA but another name.
        let tls = nodes(
            dir.path(),
            &[
                ("node-a", "node-b"),
                ("node-b", "node-a"),
                ("node-c", "node-b"),
            ],
        );
        let (a, b, c) = (&tls[0], &tls[1], &tls[2]);
        assert_eq!(b.check_peer(&handshake(a, b)), Ok(()));
        let err = b.check_peer(&handshake(c, b)).unwrap_err();
        assert!(err.contains("not valid for `node-a`"), "{err}");
    }

    #[test]
    fn name_check_reads_the_subject_alternative_name() {
        let dir = tempfile::tempdir().unwrap();
        generate_certs(dir.path(), &["node-a".to_owned()]).unwrap();
        let pem = std::fs::read(dir.path().join("node-a.pem")).unwrap();
        let cert = CertificateDer::from_pem_slice(&pem).unwrap();
        let name = |n: &str| ServerName::try_from(n.to_owned()).unwrap();
        assert_eq!(valid_for(&cert, &name("node-a")), Ok(()));
        assert!(valid_for(&cert, &name("node-b")).is_err());
        assert!(valid_for(&cert, &name("node-a.example")).is_err());
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(valid_for(&garbage, &name("node-a"))
            .unwrap_err()
            .contains("does not parse"));
    }
}
