//! The agent's local API: JSON lines over a Unix socket.
//!
//! Each request is one JSON object on one line, with an `op` field; each
//! answer is one line with `"ok": true` or `"ok": false, "error": ...`.
//! `subscribe` answers `{"ok": true}` and then writes one event per line
//! until the client closes the connection. Easily scripted:
//!
//! ```text
//! $ echo '{"op":"add","app":"web","protocol":"tcp","port":8080,"checkpoint":true}' \
//!     | socat - UNIX-CONNECT:/run/portkeep-agent/agent.sock
//! {"ok":true,"id":1,"nonce":"...","checkpoint":true,"checkpoint_source":"application"}
//! ```
//!
//! | op | fields | answer |
//! |---|---|---|
//! | `add` | `app`, `protocol` (name or number), `port`, optional `checkpoint`, `mandatory`, `lifetime`, `persistent`, `host` (THIRD_PARTY) | `id`, `checkpoint`, `checkpoint_source` |
//! | `remove` | `app`, `protocol`, `port`, optional `host` (only the user who added it, or root) | `id` |
//! | `heartbeat` | `app` | `mappings`: how many the heartbeat keeps |
//! | `list` | | `mappings`: one object per mapping |
//! | `status` | | server, client address, epoch, counters |
//! | `subscribe` | | then events: `granted`, `failed`, `lost`, `recreating`, `removed`, `unknown_options`, `adopted`, `orphan_deleted` |

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// A request line.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ApiRequest {
    Add(AddRequest),
    Remove {
        app: String,
        protocol: String,
        port: u16,
        /// The host it was added for, if another.
        #[serde(default)]
        host: Option<std::net::IpAddr>,
    },
    /// A one-shot caller says its application still runs.
    Heartbeat {
        app: String,
    },
    List,
    Status,
    Subscribe,
}

/// `add`: an application asks for a mapping.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AddRequest {
    pub(crate) app: String,
    pub(crate) protocol: String,
    pub(crate) port: u16,
    pub(crate) checkpoint: Option<bool>,
    /// The check-point may not be turned off by the user's settings
    /// (RFC 7767 section 4, example 3).
    #[serde(default)]
    pub(crate) mandatory: bool,
    pub(crate) lifetime: Option<u32>,
    /// Kept until removed, whatever becomes of the caller's session.
    #[serde(default)]
    pub(crate) persistent: bool,
    /// For another host, with THIRD_PARTY (RFC 6887 section 13.1): the
    /// agent manages that host's mapping (the server must allow it).
    #[serde(default)]
    pub(crate) host: Option<std::net::IpAddr>,
}

/// Sends one request to the agent using `dir` and returns its answer.
pub(crate) fn call(dir: &Path, request: &Value) -> Result<Value, String> {
    let path = super::store::socket_path(dir);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the agent at {} ({e}); is `portkeep agent run --state-dir {}` running?",
            path.display(),
            dir.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("cannot send to the agent: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .map_err(|e| format!("no answer from the agent: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from the agent ({e}): {answer}"))
}

/// Prints events from the agent until it closes the connection.
pub(crate) fn subscribe(dir: &Path) -> Result<(), String> {
    let path = super::store::socket_path(dir);
    let mut stream = UnixStream::connect(&path)
        .map_err(|e| format!("cannot reach the agent at {}: {e}", path.display()))?;
    stream
        .write_all(b"{\"op\":\"subscribe\"}\n")
        .map_err(|e| e.to_string())?;
    let reader = BufReader::new(stream);
    let mut out = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}
