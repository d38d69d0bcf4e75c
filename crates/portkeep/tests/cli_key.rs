//! The `portkeep` command line renews what it made (RFC 6887 section
//! 11.3: a renewal or delete needs the creator's nonce): without
//! `--nonce`, the nonce derives from a per-user key file and the mapping,
//! so running `map` again renews it and `delete` needs no nonce, against a
//! real `portkeepd` on loopback.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::LazyLock;

use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::process::Bins;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_cli(env!("CARGO_BIN_EXE_portkeep")));

const CONFIG: &str = "external_addresses = [\"192.0.2.7\"]\nport_range = \"40000-40999\"\n";

struct Run {
    code: Option<i32>,
    json: serde_json::Value,
    stderr: String,
}

/// `portkeep --json --server SERVER ARGS` with `PORTKEEP_KEY_FILE=key`.
fn portkeep(server: &str, key: &Path, args: &[&str]) -> Run {
    let out = Command::new(BINS.cli())
        .args(["--json", "--timeout", "5", "--server", server])
        .args(args)
        .env("PORTKEEP_KEY_FILE", key)
        .output()
        .unwrap();
    Run {
        code: out.status.code(),
        json: serde_json::from_slice(&out.stdout).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn mapping_count(d: &Daemon) -> usize {
    d.ctl(&["--json", "mappings"]).json()["mappings"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn rfc6887_s11_3_the_same_command_renews_and_delete_needs_no_nonce() {
    let d = Daemon::with_config(&BINS, CONFIG);
    let server = d.server();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("config/portkeep/cli.key");

    let first = portkeep(&server, &key, &["map", "tcp", "8080", "--lifetime", "600"]);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    // Created on first use, readable by its owner only.
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    let dir_mode = std::fs::metadata(key.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "key directory mode {dir_mode:o}");

    // The same command again renews the same mapping.
    let again = portkeep(&server, &key, &["map", "tcp", "8080", "--lifetime", "1200"]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(again.json["result"], "SUCCESS");
    assert_eq!(again.json["nonce"], first.json["nonce"]);
    assert_eq!(again.json["external_port"], first.json["external_port"]);
    assert_eq!(again.json["lifetime"], 1200);
    assert_eq!(mapping_count(&d), 1);

    // Another user's key cannot touch it, and is told why.
    let other = dir.path().join("other.key");
    let theirs = portkeep(&server, &other, &["map", "tcp", "8080"]);
    assert_eq!(theirs.code, Some(2), "{}", theirs.stderr);
    assert_eq!(theirs.json["result"], "NOT_AUTHORIZED");
    assert!(theirs.stderr.contains("hint:"), "{}", theirs.stderr);
    let theirs = portkeep(&server, &other, &["delete", "tcp", "8080"]);
    assert_eq!(theirs.code, Some(2), "{}", theirs.stderr);
    assert_eq!(mapping_count(&d), 1);

    // A PEER's nonce is its own (the remote peer is part of it), and
    // renews the same way.
    let peer = ["peer", "udp", "5000", "203.0.113.9:3478"];
    let p1 = portkeep(&server, &key, &peer);
    let p2 = portkeep(&server, &key, &peer);
    assert_eq!((p1.code, p2.code), (Some(0), Some(0)), "{}", p2.stderr);
    assert_eq!(p1.json["nonce"], p2.json["nonce"]);
    assert_ne!(p1.json["nonce"], first.json["nonce"]);

    // Delete without --nonce.
    let del = portkeep(&server, &key, &["delete", "tcp", "8080"]);
    assert_eq!(del.code, Some(0), "{}", del.stderr);
    assert_eq!(del.json["lifetime"], 0);
    assert_eq!(mapping_count(&d), 1, "only the PEER is left");

    // No key (empty): a fresh nonce every run, so a second run is refused.
    let none = Path::new("");
    let r1 = portkeep(&server, none, &["map", "tcp", "9090"]);
    assert_eq!(r1.code, Some(0), "{}", r1.stderr);
    let r2 = portkeep(&server, none, &["map", "tcp", "9090"]);
    assert_eq!(r2.code, Some(2), "{}", r2.stderr);
    assert_ne!(r1.json["nonce"], r2.json["nonce"]);
}

/// A key file that is not 64 hex digits is an error naming the file, not
/// a silent fresh key that would orphan every mapping made before.
#[test]
fn a_damaged_key_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cli.key");
    std::fs::write(&key, "not a key").unwrap();
    let r = portkeep("127.0.0.1:9", &key, &["map", "tcp", "8080"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("cli.key"), "{}", r.stderr);
    assert!(r.stderr.contains("64 hex digits"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "not a key");
}
