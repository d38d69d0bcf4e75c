//! The Debian package (`scripts/build-deb.sh`, cargo-deb): built from this
//! checkout, installed on this machine with `dpkg -i`, checked, removed and
//! purged. It installs into the machine itself, so it is the only test of
//! its binary (cargo runs test binaries one after another: nothing runs
//! beside it), and it refuses to start where a `portkeep` package, its
//! users or its directories already exist rather than replace or purge
//! them. Needs root, dpkg and cargo-deb (scripts/test-all.sh installs it);
//! under CI a missing one fails the test.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use portkeep_test_support::skip::{require, skip};

const PACKAGE: &str = "portkeep";
const USERS: [&str; 2] = ["portkeep", "portkeep-agent"];
const CONFIG: &str = "/etc/portkeep/portkeepd.toml";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Purges the package if a step failed half-way, so the machine is left as
/// it was found.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the package into `out` and returns its path.
fn build(out: &Path) -> PathBuf {
    run(Command::new("bash")
        .arg(workspace().join("scripts/build-deb.sh"))
        .args(["--profile", "package-test", "--fast", "--output"])
        .arg(out)
        .current_dir(workspace()));
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package expected in {out:?}: {debs:?}");
    debs[0].clone()
}

#[test]
fn debian_package_installs_without_starting_checks_its_config_and_purges_clean() {
    if !require(
        "the Debian package",
        &["dpkg", "dpkg-deb", "dpkg-shlibdeps", "strip", "getent"],
    ) {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        skip(
            "the Debian package",
            "cargo-deb not installed (cargo install cargo-deb --locked; scripts/test-all.sh does)",
        );
        return;
    }
    // Never replace or purge what this machine holds of its own.
    assert!(
        !installed(),
        "a `{PACKAGE}` package is installed here: the test would replace and purge it"
    );
    for u in USERS {
        assert!(
            !user_exists(u),
            "user {u} exists here: purging the test's package would delete it"
        );
    }
    for d in [
        "/etc/portkeep",
        "/var/lib/portkeep",
        "/var/lib/portkeep-agent",
    ] {
        assert!(
            !Path::new(d).exists(),
            "{d} exists here: purging the test's package would delete it"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let deb = build(dir.path());

    // What the package says of itself before it is installed.
    let info = text(&run(Command::new("dpkg-deb").arg("--info").arg(&deb)));
    assert!(info.contains("Package: portkeep"), "{info}");
    assert!(
        info.contains("Depends:") && info.contains("libc6"),
        "dependencies from dpkg-shlibdeps: {info}"
    );
    let control = dir.path().join("control");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    for f in [CONFIG, "/etc/portkeep/agent.toml"] {
        assert!(
            conffiles.lines().any(|l| l == f),
            "{f} is not a conffile: {conffiles}"
        );
    }
    // Installing must not start (or enable) a service: the operator
    // configures first.
    for script in ["postinst", "prerm", "postrm"] {
        let s = std::fs::read_to_string(control.join(script)).unwrap();
        let commands: Vec<&str> = s
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        for verb in [
            "systemctl start",
            "systemctl enable",
            "systemctl restart",
            "deb-systemd-invoke",
            "invoke-rc.d",
        ] {
            assert!(
                !commands.iter().any(|l| l.contains(verb)),
                "{script} runs `{verb}`"
            );
        }
    }
    let listing = text(&run(Command::new("dpkg-deb").arg("--contents").arg(&deb)));

    let _purge = Purge;
    run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());

    for f in [
        "/usr/sbin/portkeepd",
        "/usr/bin/portkeep",
        "/usr/lib/systemd/system/portkeepd.service",
        "/usr/lib/systemd/system/portkeep-agent.service",
        "/usr/lib/sysusers.d/portkeep.conf",
        CONFIG,
        "/etc/portkeep/agent.toml",
        "/usr/share/bash-completion/completions/portkeepd",
        "/usr/share/bash-completion/completions/portkeep",
        "/usr/share/zsh/vendor-completions/_portkeep",
        "/usr/share/fish/vendor_completions.d/portkeepd.fish",
        "/usr/share/doc/portkeep/config.md",
    ] {
        assert!(
            Path::new(f).exists(),
            "{f} not installed; the package holds:\n{listing}"
        );
    }
    for u in USERS {
        assert!(user_exists(u), "the package did not create user {u}");
    }

    // The installed daemon accepts the installed configuration.
    let state = tempfile::tempdir().unwrap();
    let checked = text(&run(Command::new("/usr/sbin/portkeepd")
        .args(["--config", CONFIG, "--check-config", "--data-dir"])
        .arg(state.path())));
    assert!(checked.contains("configuration OK"), "{checked}");
    let version = text(&run(Command::new("/usr/bin/portkeep").arg("--version")));
    assert!(version.starts_with("portkeep "), "{version}");

    // Manual pages, one per command and subcommand, from the CLI
    // definitions.
    for (page, title) in [
        ("/usr/share/man/man8/portkeepd.8", ".TH portkeepd 8"),
        ("/usr/share/man/man8/portkeepd-ctl.8", ".TH portkeepd-ctl 8"),
        ("/usr/share/man/man1/portkeep.1", ".TH portkeep 1"),
        ("/usr/share/man/man1/portkeep-map.1", ".TH portkeep-map 1"),
    ] {
        let roff = man_page(page);
        assert!(roff.contains(title), "{page}: no `{title}` in:\n{roff}");
    }
    // The bash completion loads and completes the verbs.
    let completion = text(&run(Command::new("bash").arg("-c").arg(
        "source /usr/share/bash-completion/completions/portkeep && complete -p portkeep \
         && COMP_WORDS=(portkeep ma) COMP_CWORD=1 COMP_LINE='portkeep ma' COMP_POINT=11 \
         && _portkeep portkeep ma portkeep && echo \"${COMPREPLY[@]}\"",
    )));
    assert!(completion.contains("-F _portkeep portkeep"), "{completion}");
    assert!(
        completion
            .lines()
            .last()
            .is_some_and(|l| l.split(' ').any(|w| w == "map")),
        "`portkeep ma<TAB>` does not offer map: {completion}"
    );
    // Nothing was started.
    let running = Command::new("pgrep")
        .args(["-u", "portkeep"])
        .output()
        .unwrap();
    assert!(
        !running.status.success(),
        "a process of user portkeep runs after installing: {}",
        text(&running)
    );

    // Removing keeps the configuration (conffiles), purging removes
    // everything, users included.
    run(Command::new("dpkg").args(["-r", PACKAGE]));
    assert!(!Path::new("/usr/sbin/portkeepd").exists());
    assert!(Path::new(CONFIG).exists(), "dpkg -r removed the conffile");
    run(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert!(!installed());
    for f in [
        CONFIG,
        "/etc/portkeep",
        "/usr/share/doc/portkeep",
        "/var/lib/portkeep",
    ] {
        assert!(!Path::new(f).exists(), "{f} left after purge");
    }
    for u in USERS {
        assert!(!user_exists(u), "user {u} left after purge");
    }
}

/// A manual page's roff source, whether the package compressed it or not.
fn man_page(path: &str) -> String {
    if Path::new(path).exists() {
        return std::fs::read_to_string(path).unwrap();
    }
    let gz = format!("{path}.gz");
    assert!(Path::new(&gz).exists(), "neither {path} nor {gz} installed");
    text(&run(Command::new("zcat").arg(&gz)))
}
