//! Check-pointing preferences: the application's default, the user's
//! override, the administrator's policy (RFC 7767 section 4).
//!
//! RFC 7767 section 4: "the application that requests a PCP mapping may
//! come with default settings [...] the user may change these settings
//! [...] in an enterprise environment, the administrator's policy
//! applies". The agent resolves, highest first:
//!
//! 1. the policy file's `[apps.NAME] checkpoint` (administrator);
//! 2. the policy file's `[all] checkpoint` (administrator);
//! 3. a check-point the application sent as `mandatory` with `add`: one the
//!    user's settings cannot turn off (RFC 7767 section 4, example 3: "an
//!    emergency call ... the user cannot disable"); only the administrator
//!    overrides it;
//! 4. the config file's `[apps.NAME] checkpoint` (user override);
//! 5. the `checkpoint` the application sent with `add` (its shipped default);
//! 6. the config file's `[defaults] checkpoint` (false when absent).
//!
//! Lifetimes resolve the same way without the policy file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Per-application settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppSettings {
    pub(crate) checkpoint: Option<bool>,
    pub(crate) lifetime: Option<u32>,
}

/// `--config` (user) and `--policy` (administrator) share this shape.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    /// Config only: the PCP server, re-read on SIGHUP (failure-scenarios
    /// draft section 2.1: a new server address re-creates everything).
    pub(crate) server: Option<String>,
    /// Config only: the address requests come from, re-read on SIGHUP
    /// (failure-scenarios draft section 2.4: a new internal address
    /// re-installs every mapping and deletes the stale ones).
    pub(crate) bind: Option<std::net::IpAddr>,
    #[serde(default)]
    pub(crate) defaults: AppSettings,
    /// Policy only: applies to every application.
    #[serde(default)]
    pub(crate) all: AppSettings,
    #[serde(default)]
    pub(crate) apps: BTreeMap<String, AppSettings>,
}

impl PolicyFile {
    /// Reads a TOML file; the error names the file and the key.
    pub(crate) fn load(path: &Path) -> Result<PolicyFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The resolved preferences.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    pub(crate) user: PolicyFile,
    pub(crate) admin: PolicyFile,
    pub(crate) user_path: Option<PathBuf>,
    pub(crate) admin_path: Option<PathBuf>,
}

/// Where an effective check-point choice came from.
pub(crate) type Source = &'static str;

impl Policy {
    /// Loads both files (each optional).
    pub(crate) fn load(user: Option<&Path>, admin: Option<&Path>) -> Result<Policy, String> {
        Ok(Policy {
            user: user.map(PolicyFile::load).transpose()?.unwrap_or_default(),
            admin: admin.map(PolicyFile::load).transpose()?.unwrap_or_default(),
            user_path: user.map(Path::to_path_buf),
            admin_path: admin.map(Path::to_path_buf),
        })
    }

    /// Re-reads the files it was loaded from.
    pub(crate) fn reload(&self) -> Result<Policy, String> {
        Policy::load(self.user_path.as_deref(), self.admin_path.as_deref())
    }

    /// The effective check-point choice for `app`, given what the
    /// application asked for (and whether it marked it mandatory), and
    /// where it came from.
    pub(crate) fn checkpoint(
        &self,
        app: &str,
        asked: Option<bool>,
        mandatory: bool,
    ) -> (bool, Source) {
        if let Some(c) = self.admin.apps.get(app).and_then(|a| a.checkpoint) {
            return (c, "policy:app");
        }
        if let Some(c) = self.admin.all.checkpoint {
            return (c, "policy:all");
        }
        if mandatory && asked == Some(true) {
            return (true, "application:mandatory");
        }
        if let Some(c) = self.user.apps.get(app).and_then(|a| a.checkpoint) {
            return (c, "config:app");
        }
        if let Some(c) = asked {
            return (c, "application");
        }
        match self.user.defaults.checkpoint {
            Some(c) => (c, "config:defaults"),
            None => (false, "built-in"),
        }
    }

    /// The lifetime to ask for.
    pub(crate) fn lifetime(&self, app: &str, asked: Option<u32>, fallback: u32) -> u32 {
        self.user
            .apps
            .get(app)
            .and_then(|a| a.lifetime)
            .or(asked)
            .or(self.user.defaults.lifetime)
            .unwrap_or(fallback)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(user: &str, admin: &str) -> Policy {
        Policy {
            user: toml::from_str(user).unwrap(),
            admin: toml::from_str(admin).unwrap(),
            ..Policy::default()
        }
    }

    #[test]
    fn rfc7767_s4_admin_policy_wins_over_user_and_app() {
        let p = policy(
            "[apps.cam]\ncheckpoint = false\n",
            "[apps.cam]\ncheckpoint = true\n",
        );
        assert_eq!(
            p.checkpoint("cam", Some(false), false),
            (true, "policy:app")
        );
        let p = policy(
            "[apps.cam]\ncheckpoint = true\n",
            "[all]\ncheckpoint = false\n",
        );
        assert_eq!(
            p.checkpoint("cam", Some(true), false),
            (false, "policy:all")
        );
        assert_eq!(
            p.checkpoint("cam", Some(true), true),
            (false, "policy:all"),
            "the administrator overrides even a mandatory check-point"
        );
    }

    #[test]
    fn rfc7767_s4_user_override_beats_app_default() {
        let p = policy("[apps.cam]\ncheckpoint = false\n", "");
        assert_eq!(
            p.checkpoint("cam", Some(true), false),
            (false, "config:app")
        );
        assert_eq!(
            p.checkpoint("web", Some(true), false),
            (true, "application")
        );
        let p = policy("[defaults]\ncheckpoint = true\n", "");
        assert_eq!(p.checkpoint("web", None, false), (true, "config:defaults"));
        assert_eq!(
            Policy::default().checkpoint("web", None, false),
            (false, "built-in")
        );
    }

    /// RFC 7767 section 4, example 3: an emergency call's mapping is
    /// check-pointed whatever the user's settings say; only the
    /// administrator's policy overrides it.
    #[test]
    fn rfc7767_s4_a_mandatory_checkpoint_beats_the_user_not_the_administrator() {
        let user_off = "[apps.sos]\ncheckpoint = false\n[defaults]\ncheckpoint = false\n";
        let p = policy(user_off, "");
        assert_eq!(
            p.checkpoint("sos", Some(true), true),
            (true, "application:mandatory")
        );
        assert_eq!(
            p.checkpoint("sos", Some(true), false),
            (false, "config:app")
        );
        // Mandatory only means something for a check-point asked for.
        assert_eq!(
            p.checkpoint("sos", Some(false), true),
            (false, "config:app")
        );
        let p = policy(user_off, "[apps.sos]\ncheckpoint = false\n");
        assert_eq!(p.checkpoint("sos", Some(true), true), (false, "policy:app"));
    }

    #[test]
    fn unknown_keys_are_config_errors() {
        assert!(toml::from_str::<PolicyFile>("[apps.x]\ncheckpoitn = true\n").is_err());
    }
}
