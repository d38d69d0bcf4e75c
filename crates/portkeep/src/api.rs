//! The agent's local API (`portkeep agent run`): JSON lines over a Unix
//! socket, as any local process may write them.
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

use portkeep_proto::Protocol;
use serde::{Deserialize, Serialize};

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApiRequest {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub app: String,
    pub protocol: String,
    pub port: u16,
    pub checkpoint: Option<bool>,
    /// The check-point may not be turned off by the user's settings
    /// (RFC 7767 section 4, example 3).
    #[serde(default)]
    pub mandatory: bool,
    pub lifetime: Option<u32>,
    /// Kept until removed, whatever becomes of the caller's session.
    #[serde(default)]
    pub persistent: bool,
    /// For another host, with THIRD_PARTY (RFC 6887 section 13.1): the
    /// agent manages that host's mapping (the server must allow it).
    #[serde(default)]
    pub host: Option<std::net::IpAddr>,
}

/// The longest request line the agent reads; a longer one ends the
/// connection (a client sending an endless line is cut off rather than
/// buffered without bound).
pub const MAX_LINE: usize = 64 * 1024;

impl ApiRequest {
    /// Reads one request line: `Ok(None)` for a blank line (ignored),
    /// `Err` with what is wrong for anything that is not a request.
    pub fn parse_line(line: &str) -> Result<Option<ApiRequest>, String> {
        if line.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(line)
            .map(Some)
            .map_err(|e| format!("bad request: {e}"))
    }
}

impl AddRequest {
    /// The protocol it names, if the request can be a mapping at all: an
    /// application name of 1 to 64 octets, none a control character, a protocol with
    /// ports (not `all`, RFC 6887 section 11.1) and a non-zero port.
    pub fn check(&self) -> Result<Protocol, String> {
        let protocol = crate::parse::protocol(&self.protocol)?;
        if self.app.is_empty() || self.app.len() > 64 || self.app.chars().any(char::is_control) {
            return Err("app must be 1 to 64 printable characters".to_owned());
        }
        if protocol == Protocol::ALL || self.port == 0 {
            return Err("a mapping needs a protocol and a non-zero port".to_owned());
        }
        Ok(protocol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_reads_as_its_op() {
        let r = ApiRequest::parse_line(
            r#"{"op":"add","app":"web","protocol":"tcp","port":8080,"checkpoint":true}"#,
        )
        .unwrap()
        .unwrap();
        let ApiRequest::Add(add) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (add.app.as_str(), add.port, add.checkpoint),
            ("web", 8080, Some(true))
        );
        assert_eq!(add.check(), Ok(Protocol::TCP));
        assert_eq!(ApiRequest::parse_line(" \t\n"), Ok(None));
        assert_eq!(
            ApiRequest::parse_line(r#"{"op":"list"}"#),
            Ok(Some(ApiRequest::List))
        );
    }

    #[test]
    fn what_is_not_a_request_says_what_is_wrong() {
        let e = ApiRequest::parse_line(r#"{"op":"add","app":"web","port":80}"#).unwrap_err();
        assert!(e.contains("missing field `protocol`"), "{e}");
        let e = ApiRequest::parse_line(r#"{"op":"fly"}"#).unwrap_err();
        assert!(e.contains("unknown variant `fly`"), "{e}");
        let e = ApiRequest::parse_line("not json").unwrap_err();
        assert!(e.starts_with("bad request"), "{e}");
    }

    #[test]
    fn rfc6887_s11_1_an_add_needs_a_protocol_with_ports_and_a_port() {
        let add = |app: &str, protocol: &str, port: u16| AddRequest {
            app: app.into(),
            protocol: protocol.into(),
            port,
            checkpoint: None,
            mandatory: false,
            lifetime: None,
            persistent: false,
            host: None,
        };
        assert!(add("web", "all", 80)
            .check()
            .unwrap_err()
            .contains("non-zero port"));
        assert!(add("web", "tcp", 0)
            .check()
            .unwrap_err()
            .contains("non-zero port"));
        assert!(add("", "tcp", 80)
            .check()
            .unwrap_err()
            .contains("app must be"));
        assert!(add("a\nb", "tcp", 80)
            .check()
            .unwrap_err()
            .contains("app must be"));
        assert!(add(&"x".repeat(65), "tcp", 80).check().is_err());
        assert!(add("web", "quic", 80)
            .check()
            .unwrap_err()
            .contains("expected tcp"));
        assert_eq!(add("web", "17", 80).check(), Ok(Protocol::UDP));
    }
}
