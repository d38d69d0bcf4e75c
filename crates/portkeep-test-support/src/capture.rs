//! Packet captures with tshark on loopback: what really went on the wire.
//!
//! Needs root (to capture on `lo`) and `/usr/bin/tshark`; callers check
//! both first (see [`crate::skip`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Where tshark is installed (Debian's `tshark` package).
pub const TSHARK: &str = "/usr/bin/tshark";

/// A running capture. Dropping it stops tshark (if still running) and
/// removes the capture file, however the test ends.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    /// Starts tshark on `lo` with the capture `filter`, stopping by itself
    /// after `count` frames; returns once it reports that it is capturing.
    ///
    /// # Panics
    /// If tshark cannot be started or does not start capturing.
    pub fn start(filter: &str, count: usize) -> Capture {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = std::env::temp_dir().join(format!(
            "portkeep-capture-{}-{n}.pcapng",
            std::process::id()
        ));
        let mut child = Command::new(TSHARK)
            .args(["-i", "lo", "-f", filter])
            .args(["-c", &count.to_string()])
            .arg("-w")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tshark");
        let stderr = child.stderr.take().expect("tshark's stderr");
        let mut capture = Capture {
            child: Some(child),
            file,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(8)) {
                Ok(line) if line.contains("Capturing on") => break,
                Ok(line) => seen.push(line),
                Err(_) => {
                    capture.stop();
                    panic!("tshark did not start capturing: {seen:?}");
                }
            }
        }
        // "Capturing on" is printed as the capture starts; give the kernel
        // filter a moment to be attached.
        std::thread::sleep(Duration::from_millis(300));
        capture
    }

    /// Waits up to `within` for tshark to stop by itself (after the frame
    /// count it was started with).
    pub fn wait_done(&mut self, within: Duration) {
        let step = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        while waited < within {
            if self
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
            {
                return;
            }
            std::thread::sleep(step);
            waited += step;
        }
    }

    /// The capture file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Ends the capture: SIGINT (tshark then flushes and exits), waiting
    /// up to about 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            for _ in 0..50 {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Stops the capture and reads `fields` of every frame, decoding UDP
    /// `port` as PCP (`portcontrol`): one row per frame, each field's
    /// occurrences joined by `|`.
    ///
    /// # Panics
    /// If tshark cannot read the file.
    pub fn fields(&mut self, port: u16, fields: &[&str]) -> Vec<Vec<String>> {
        self.stop();
        let mut cmd = Command::new(TSHARK);
        cmd.arg("-r")
            .arg(&self.file)
            .args(["-d", &format!("udp.port=={port},portcontrol")])
            .args(["-T", "fields", "-E", "separator=/t"])
            .args(["-E", "occurrence=a", "-E", "aggregator=|"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = cmd.output().expect("run tshark -r");
        assert!(out.status.success(), "tshark -r failed: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.split('\t').map(str::to_owned).collect())
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.file);
    }
}
