//! The client side of the agent's local API (`portkeep::api`): one
//! request and its answer, or the stream of events.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

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
