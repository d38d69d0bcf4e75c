//! The agent's state directory: its key, its store of desired and granted
//! mappings, its lock, its socket.
//!
//! - `agent.key`: 32 random octets (hex), written once at first start. The
//!   nonce of each mapping is derived from it and the mapping's (application,
//!   protocol, port), so an agent that lost its store can still renew or
//!   delete what the server holds for it (GET/NEXT returns no nonces), and
//!   two agents with different keys never produce each other's nonces
//!   (failure-scenarios draft section 2.3: co-located clients keep
//!   separate tables and do not delete each other's mappings).
//! - `store.json`: desired mappings with their nonces and the latest
//!   grant, plus the last epoch seen. Rewritten whole (write to a
//!   temporary file, fsync, rename), so a crash leaves the old or the new
//!   version, never a torn one. At 10,000 mappings it is about 2.5 MB and
//!   rewritten at most every 250 ms while grants change; a database would
//!   only pay off at far larger tables.
//! - `agent.lock`: held (flock) by the running agent, so two agents never
//!   share a directory.
//! - `agent.sock`: the local API.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use portkeep_proto::{Nonce, Protocol, NONCE_LEN};
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

pub(crate) const KEY_FILE: &str = "agent.key";
pub(crate) const STORE_FILE: &str = "store.json";
pub(crate) const LOCK_FILE: &str = "agent.lock";
pub(crate) const SOCKET_FILE: &str = "agent.sock";

/// The API socket of the agent using `dir`.
pub(crate) fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_FILE)
}

/// The agent's secret: nonces derive from it.
#[derive(Clone)]
pub(crate) struct AgentKey([u8; 32]);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

impl AgentKey {
    /// Reads the key, creating it on first use.
    pub(crate) fn load_or_create(dir: &Path) -> std::io::Result<AgentKey> {
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => AgentKey::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = AgentKey::ephemeral();
                write_atomically(&path, hex::encode(key.0).as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(e),
        }
    }

    /// The key in file `path` (the CLI's, `portkeep --key-file`), created
    /// on first use: the directories with mode 0700 and the file with
    /// mode 0600, since whoever reads it can renew and delete this user's
    /// mappings.
    pub(crate) fn load_or_create_file(path: &Path) -> std::io::Result<AgentKey> {
        match std::fs::read_to_string(path) {
            Ok(text) => AgentKey::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)?;
                }
                let key = AgentKey::ephemeral();
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.write_all(hex::encode(key.0).as_bytes())?;
                    f.sync_all()?;
                }
                // Linked, not renamed: of two first runs at once, the
                // first link wins and both read what it wrote.
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                AgentKey::load_or_create_file(path)
            }
            Err(e) => Err(e),
        }
    }

    /// A random key used once (no key file): its nonces repeat nothing.
    pub(crate) fn ephemeral() -> AgentKey {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        AgentKey(key)
    }

    /// A key file's text: 64 hex digits (surrounding space ignored).
    fn parse(text: &str, path: &Path) -> std::io::Result<AgentKey> {
        let bytes = hex::decode(text.trim()).ok();
        let key: Option<[u8; 32]> = bytes.and_then(|b| b.try_into().ok());
        key.map(AgentKey).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not 64 hex digits", path.display()),
            )
        })
    }

    /// The nonce of one application's mapping: a ChaCha20 keystream under
    /// the agent key, on a stream chosen by (app, protocol, port). It is
    /// unpredictable to others (RFC 6887 section 11.1 asks for that) and
    /// reproducible by this agent.
    pub(crate) fn nonce(&self, app: &str, protocol: Protocol, port: u16) -> Nonce {
        self.nonce_for(app, protocol, port, None)
    }

    /// [`AgentKey::nonce`] of a mapping made for another `host` with
    /// THIRD_PARTY (the host's address is part of the stream, so one
    /// application's mappings for several hosts never share a nonce).
    pub(crate) fn nonce_for(
        &self,
        app: &str,
        protocol: Protocol,
        port: u16,
        host: Option<std::net::IpAddr>,
    ) -> Nonce {
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(self.0);
        let mut stream = fnv1a(app, protocol, port);
        if let Some(h) = host {
            let octets = match h {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v6) => v6.octets(),
            };
            for b in octets {
                stream ^= u64::from(b);
                stream = stream.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        rng.set_stream(stream);
        let mut n = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut n);
        n
    }

    /// A short public id of this agent, for the DESCRIPTION tag that marks
    /// its mappings on the server.
    pub(crate) fn id(&self) -> String {
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(self.0);
        rng.set_stream(u64::MAX);
        let mut b = [0u8; 4];
        rng.fill_bytes(&mut b);
        hex::encode(b)
    }
}

fn fnv1a(app: &str, protocol: Protocol, port: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = app
        .as_bytes()
        .iter()
        .copied()
        .chain([0, protocol.0])
        .chain(port.to_be_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The grant as stored: wall-clock time, since `Instant`s do not survive
/// a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StoredGrant {
    pub(crate) external: Option<SocketAddr>,
    pub(crate) lifetime: u32,
    pub(crate) granted_unix_ms: u64,
    pub(crate) checkpoint_honoured: bool,
}

/// One desired mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StoredMapping {
    pub(crate) id: u64,
    pub(crate) app: String,
    pub(crate) protocol: u8,
    pub(crate) port: u16,
    pub(crate) lifetime: u32,
    /// What the application asked for (its default).
    pub(crate) app_checkpoint: Option<bool>,
    /// The application marked the check-point as one the user's settings
    /// cannot turn off (RFC 7767 section 4, example 3).
    #[serde(default)]
    pub(crate) app_mandatory: bool,
    /// The host it is made for with THIRD_PARTY (`None`: this host).
    #[serde(default)]
    pub(crate) host: Option<std::net::IpAddr>,
    /// The user id of the process that added it (`None` in stores written
    /// before it was kept: then only root may remove it).
    #[serde(default)]
    pub(crate) owner_uid: Option<u32>,
    /// Kept until removed, whatever becomes of the application's session.
    #[serde(default)]
    pub(crate) persistent: bool,
    /// Nonce, hex (also derivable from the key; kept so the store alone
    /// says what the server holds).
    pub(crate) nonce: String,
    pub(crate) grant: Option<StoredGrant>,
    /// Times the application re-added this mapping (crash detection).
    #[serde(default)]
    pub(crate) adds_unix_ms: Vec<u64>,
}

/// The whole store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Store {
    pub(crate) version: u32,
    pub(crate) server: Option<SocketAddr>,
    pub(crate) client_ip: Option<IpAddr>,
    /// Last epoch and its receipt (wall clock), for the section 8.5 check
    /// after a restart.
    pub(crate) epoch: Option<(u32, u64)>,
    pub(crate) next_id: u64,
    pub(crate) mappings: Vec<StoredMapping>,
    /// Mappings found with GET after a lost store that no application has
    /// claimed yet; kept so a crash during the grace period does not
    /// forget to delete them.
    #[serde(default)]
    pub(crate) orphans: Vec<StoredOrphan>,
}

/// A mapping of this agent found on the server, not yet claimed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StoredOrphan {
    pub(crate) app: String,
    pub(crate) protocol: u8,
    pub(crate) port: u16,
    pub(crate) external: SocketAddr,
    pub(crate) lifetime: u32,
    pub(crate) checkpoint: bool,
}

impl Store {
    /// Reads the store: `Ok(None)` when there is none.
    pub(crate) fn load(dir: &Path) -> Result<Option<Store>, String> {
        let path = dir.join(STORE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the store atomically.
    pub(crate) fn save(&self, dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomically(&dir.join(STORE_FILE), &bytes)
    }
}

/// Write to `path.tmp`, fsync, rename over `path`, fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Takes the directory's lock; fails if another agent holds it.
pub(crate) fn lock(dir: &Path) -> Result<File, String> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.try_lock().map_err(|_| {
        format!(
            "another agent is running with state directory {}",
            dir.display()
        )
    })?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ_per_mapping_and_key_and_repeat() {
        let a = AgentKey([1; 32]);
        let b = AgentKey([2; 32]);
        let n = a.nonce("web", Protocol::TCP, 80);
        assert_eq!(n, a.nonce("web", Protocol::TCP, 80));
        assert_ne!(n, a.nonce("web", Protocol::TCP, 81));
        assert_ne!(n, a.nonce("web", Protocol::UDP, 80));
        assert_ne!(n, a.nonce("mail", Protocol::TCP, 80));
        assert_ne!(n, b.nonce("web", Protocol::TCP, 80));
        assert_ne!(a.id(), b.id());
    }
}
