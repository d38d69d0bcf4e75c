//! Network namespaces for the root-only tests: running `ip` and commands
//! in a namespace, joining one from a thread, and [`Lab`], the namespaces
//! (and temporary directory) of one test, removed on drop.

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::skip::{require, skip};

mod join;

pub use join::in_ns;

/// A test's namespaces from `build`, or `None` if this machine cannot run
/// the test (`what`): not root, one of `tools` missing, or `build` failing
/// (root without `CAP_SYS_ADMIN`, as in some containers). Then the test is
/// skipped as [`skip`] says: under CI it fails here.
pub fn setup<T>(
    what: &str,
    tools: &[&str],
    build: impl FnOnce() -> Result<T, String>,
) -> Option<T> {
    if !require(what, tools) {
        return None;
    }
    match build() {
        Ok(t) => Some(t),
        Err(e) => {
            skip(what, &format!("cannot build namespaces: {e}"));
            None
        }
    }
}

/// Runs `cmd`; its stdout, or an error naming the command, its status
/// and its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// `ip ARGS`, which must succeed.
pub fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `args` inside namespace `ns`.
pub fn ns_exec(ns: &str, args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// `ip netns list`, empty if it fails.
pub fn netns_list() -> String {
    ip(&["netns", "list"]).unwrap_or_default()
}

/// Asserts that none of the namespaces `names` is left.
pub fn assert_gone(names: &[String]) {
    let list = netns_list();
    for n in names {
        assert!(
            !list.split_whitespace().any(|l| l == n),
            "namespace {n} left behind: {list}"
        );
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// The namespaces and temporary directory of one test, all removed on
/// drop, even when an assertion fails: whatever still runs in each
/// namespace is killed (`ip netns pids`), the namespaces are deleted
/// (their interfaces and nftables tables with them) and the directory
/// removed.
///
/// Namespaces are either linked directly ([`Lab::veth`]) or plugged into
/// bridges of a "switch" namespace ([`Lab::with_switch`], [`Lab::plug`]).
#[derive(Debug)]
pub struct Lab {
    /// Unique to this lab within this machine: `PID-N`.
    pub id: String,
    /// A temporary directory for the test's files.
    pub dir: std::path::PathBuf,
    /// The namespace holding the bridges, if any.
    pub switch: Option<String>,
    namespaces: Vec<String>,
    ports: usize,
}

impl Lab {
    /// A lab with no namespace yet; `prefix` (a few letters) names its
    /// directory.
    pub fn new(prefix: &str) -> Result<Lab, String> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("portkeep-{prefix}-{id}"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Lab {
            id,
            dir,
            switch: None,
            namespaces: Vec::new(),
            ports: 0,
        })
    }

    /// A lab with a switch namespace `PREFIXs-ID` holding `bridges`.
    pub fn with_switch(prefix: &str, bridges: &[&str]) -> Result<Lab, String> {
        let mut lab = Lab::new(prefix)?;
        let sw = format!("{prefix}s-{}", lab.id);
        lab.add_ns(&sw)?;
        lab.switch = Some(sw.clone());
        for b in bridges {
            ip(&["-n", &sw, "link", "add", b, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", b, "up"])?;
        }
        Ok(lab)
    }

    /// A new namespace with its loopback up.
    pub fn add_ns(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair between `ns_a` (end `dev_a`) and `ns_b` (end `dev_b`),
    /// made inside `ns_a` so that the host's namespace never sees it. Both
    /// ends stay down; `ns_a == ns_b` keeps both ends there.
    pub fn veth(&self, ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<(), String> {
        let mut args = vec![
            "-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
        ];
        if ns_a != ns_b {
            args.extend(["netns", ns_b]);
        }
        ip(&args).map(drop)
    }

    /// Connects `ns` to `bridge` of the switch with a veth whose end in
    /// `ns` is `ifname` and carries `addrs` (CIDR), and brings it up.
    pub fn plug(
        &mut self,
        ns: &str,
        ifname: &str,
        bridge: &str,
        addrs: &[&str],
    ) -> Result<(), String> {
        let sw = self
            .switch
            .clone()
            .ok_or("a lab made without a switch has no bridge")?;
        self.ports += 1;
        let port = format!("p{}", self.ports);
        self.veth(&sw, &port, ns, ifname)?;
        ip(&["-n", &sw, "link", "set", &port, "master", bridge])?;
        ip(&["-n", &sw, "link", "set", &port, "up"])?;
        for a in addrs {
            ip(&["-n", ns, "addr", "add", a, "dev", ifname])?;
        }
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Every namespace of the lab, the switch included.
    pub fn names(&self) -> Vec<String> {
        self.namespaces.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Whatever still runs in there: daemons, keepalived and its
            // scripts, nft sessions.
            if let Ok(pids) = ip(&["netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
