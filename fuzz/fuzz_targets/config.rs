//! The configuration file (`portkeepd::config`): arbitrary text through
//! `ConfigFile::parse` and `ConfigFile::validate`, as `portkeepd` reads
//! its file. Nothing may panic, and every error names where it is: a
//! dotted key for a value of the wrong meaning, a key or a line for
//! TOML the parser refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portkeep_server::{Server, Timestamp};
use portkeepd::{ConfigError, ConfigFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let err = match ConfigFile::parse(text, "fuzz.toml").and_then(ConfigFile::validate) {
        Ok(settings) => {
            // What validates is usable: a server core runs on it.
            assert!(!settings.listen.is_empty(), "no listen address");
            assert!(settings.workers > 0, "no workers");
            let mut s = Server::new(settings.server, Timestamp(1_000_000));
            let mut out = Vec::new();
            let from = std::net::SocketAddr::from(([10, 0, 0, 1], 5000));
            // An ANNOUNCE from a host on the client side.
            let req = [
                2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1,
            ];
            s.handle(Timestamp(1_000_000), from, &req, &mut out);
            s.handle_timeout(Timestamp(2_000_000));
            return;
        }
        Err(e) => e,
    };
    match &err {
        ConfigError::Invalid { key, message } => {
            assert!(!key.is_empty(), "an error with no key: {message}");
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-[]".contains(c)),
                "not a key path: {key:?} ({message})"
            );
            assert!(!message.is_empty(), "an error with no message for `{key}`");
        }
        ConfigError::Parse { path, message } => {
            assert_eq!(path, "fuzz.toml");
            assert!(
                message.contains("key `")
                    || message.contains("line ")
                    || message.contains("missing field"),
                "a parse error that names neither a key nor a line: {message}"
            );
        }
        ConfigError::Read { .. } => panic!("parsing text read a file: {err}"),
    }
});
