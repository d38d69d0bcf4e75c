//! The agent's local API (`portkeep::api`), which any local process can
//! write to: arbitrary lines, JSON or not, through the request reader
//! and the checks an `add` passes before the agent acts on it. Nothing
//! may panic; a request that reads writes back to a line that reads the
//! same; an `add` that passes its checks names a protocol with ports, a
//! non-zero port and an application name of 1 to 64 octets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep::api::{ApiRequest, MAX_LINE};
use portkeep_proto::Protocol;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        // The agent cuts a connection at its longest line.
        if line.len() >= MAX_LINE {
            continue;
        }
        let Ok(Some(req)) = ApiRequest::parse_line(line) else {
            continue;
        };
        let again = serde_json::to_string(&req).expect("a request serialises");
        assert_eq!(
            ApiRequest::parse_line(&again),
            Ok(Some(req.clone())),
            "{again} reads differently"
        );
        if let ApiRequest::Add(add) = &req {
            if let Ok(p) = add.check() {
                assert_ne!(p, Protocol::ALL);
                assert_ne!(add.port, 0);
                assert!(!add.app.is_empty() && add.app.len() <= 64);
                assert!(!add.app.chars().any(char::is_control));
            }
        }
    }
});
