//! `[checkpoint]` and `[[subscribers.named]]`: the RFC 7767 check-pointing
//! policy and the explicit subscriber table, read from the file and
//! validated into the core's [`CheckpointPolicy`] and [`NamedSubscriber`]s.
//! Every error names the key. `docs/config.md` documents each key.

use std::collections::BTreeMap;
use std::time::Duration;

use portkeep_server::{
    CheckpointClass, CheckpointMode, CheckpointPolicy, NamedSubscriber, Prefix, RateLimit,
};
use serde::Deserialize;

use crate::config_error::{invalid, ConfigError};

/// `[checkpoint]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Check-pointed mappings the whole server may hold.
    pub max_mappings: Option<u32>,
    /// The class of subscribers no `assign` entry matches.
    pub default_class: Option<String>,
    /// Named classes.
    pub classes: Option<BTreeMap<String, ClassSection>>,
    /// Subscriber prefixes and their classes.
    pub assign: Option<Vec<AssignEntry>>,
}

/// `[checkpoint.classes.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSection {
    /// "always", "on-request" or "never".
    pub checkpoint: Option<String>,
    /// Check-pointed mappings per subscriber.
    pub max: Option<u32>,
    /// Check-point requests per subscriber, "N/s", "N/min" or "N/h".
    pub rate: Option<String>,
    /// Requests allowed back to back.
    pub burst: Option<u32>,
}

/// `[[checkpoint.assign]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignEntry {
    /// Subscriber prefix.
    pub prefix: String,
    /// Class name.
    pub class: String,
}

/// `[[subscribers.named]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedEntry {
    /// The subscriber's addresses.
    pub prefix: String,
    /// The operator's name for it.
    pub id: String,
}

/// Validates `[[subscribers.named]]`: prefixes parse, and no prefix or id
/// appears twice (two subscribers with one prefix would be ambiguous;
/// two prefixes with one id would make the admin view lie).
pub fn named_subscribers(entries: &[NamedEntry]) -> Result<Vec<NamedSubscriber>, ConfigError> {
    const KEY: &str = "subscribers.named";
    let mut out: Vec<NamedSubscriber> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let prefix: Prefix =
            e.prefix
                .parse()
                .map_err(|err: portkeep_server::prefix::PrefixError| {
                    invalid(format!("{KEY}[{i}].prefix"), err.to_string())
                })?;
        let prefix = Prefix::new(
            portkeep_server::prefix::canonical(prefix.addr()),
            prefix.len(),
        )
        .unwrap_or(prefix);
        if e.id.trim().is_empty() {
            return Err(invalid(format!("{KEY}[{i}].id"), "must not be empty"));
        }
        if let Some(other) = out.iter().find(|n| n.prefix == prefix) {
            return Err(invalid(
                format!("{KEY}[{i}].prefix"),
                format!("{prefix} is already subscriber `{}`", other.name),
            ));
        }
        if out.iter().any(|n| n.name == e.id) {
            return Err(invalid(
                format!("{KEY}[{i}].id"),
                format!("`{}` names two prefixes", e.id),
            ));
        }
        out.push(NamedSubscriber {
            prefix,
            name: e.id.clone(),
        });
    }
    Ok(out)
}

/// Parses a rate strictly: a positive integer, `/`, and `s`, `min` or `h`,
/// with nothing else (no spaces, no fractions, no other units).
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("`{s}` is not a rate (expected N/s, N/min or N/h, e.g. \"1/s\")");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u32 = n.parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!("`{s}`: the rate must be at least 1"));
    }
    let per = match unit {
        "s" => Duration::from_secs(1),
        "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok((count, per))
}

fn class(name: &str, c: &ClassSection) -> Result<CheckpointClass, ConfigError> {
    let key = |k: &str| format!("checkpoint.classes.{name}.{k}");
    let mode = match c.checkpoint.as_deref() {
        Some("always") => CheckpointMode::Always,
        Some("on-request") => CheckpointMode::OnRequest,
        Some("never") => CheckpointMode::Never,
        Some(other) => {
            return Err(invalid(
                key("checkpoint"),
                format!(
                    "`{other}` is not a mode (expected \"always\", \"on-request\" or \"never\")"
                ),
            ))
        }
        None => {
            return Err(invalid(
                key("checkpoint"),
                "is required (\"always\", \"on-request\" or \"never\")",
            ))
        }
    };
    if mode != CheckpointMode::OnRequest {
        // `always` is bounded by the server's capacity only; `never` has
        // nothing to bound. A limit there would be silently meaningless.
        for (k, set) in [
            ("max", c.max.is_some()),
            ("rate", c.rate.is_some()),
            ("burst", c.burst.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key(k),
                    format!("only applies to checkpoint = \"on-request\", not \"{mode}\""),
                ));
            }
        }
    }
    if c.max == Some(0) {
        return Err(invalid(
            key("max"),
            "must be at least 1 (use checkpoint = \"never\" to refuse every request)",
        ));
    }
    let rate = match &c.rate {
        None => {
            if c.burst.is_some() {
                return Err(invalid(key("burst"), "needs a `rate`"));
            }
            None
        }
        Some(r) => {
            let (count, per) = parse_rate(r).map_err(|m| invalid(key("rate"), m))?;
            let burst = c.burst.unwrap_or(count);
            if burst == 0 {
                return Err(invalid(key("burst"), "must be at least 1"));
            }
            Some(RateLimit { count, per, burst })
        }
    };
    Ok(CheckpointClass {
        name: name.to_owned(),
        mode,
        max: c.max,
        rate,
    })
}

/// Validates `[checkpoint]` against the subscriber keying it classifies.
pub fn checkpoint_policy(
    section: CheckpointSection,
    ipv4_prefix_len: u8,
    ipv6_prefix_len: u8,
    named: &[NamedSubscriber],
) -> Result<CheckpointPolicy, ConfigError> {
    let d = CheckpointPolicy::default();
    let max_mappings = section.max_mappings.unwrap_or(d.max_mappings);
    if max_mappings == 0 {
        return Err(invalid(
            "checkpoint.max_mappings",
            "must be at least 1 (use a class with checkpoint = \"never\" to refuse every request)",
        ));
    }
    let mut classes = d.classes.clone();
    if let Some(map) = &section.classes {
        if !map.is_empty() {
            classes = map
                .iter()
                .map(|(name, c)| class(name, c))
                .collect::<Result<_, _>>()?;
        }
    }
    let names = || {
        classes
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let index = |name: &str| classes.iter().position(|c| c.name == name);
    let default_class = match &section.default_class {
        Some(n) => index(n).ok_or_else(|| {
            invalid(
                "checkpoint.default_class",
                format!("no class `{n}` (defined: {})", names()),
            )
        })?,
        None if classes.len() == 1 => 0,
        None => index("default").ok_or_else(|| {
            invalid(
                "checkpoint.default_class",
                format!(
                    "is required when several classes are defined (defined: {})",
                    names()
                ),
            )
        })?,
    };
    let mut assign: Vec<(Prefix, usize)> = Vec::new();
    for (i, a) in section.assign.unwrap_or_default().iter().enumerate() {
        let key = |k: &str| format!("checkpoint.assign[{i}].{k}");
        let prefix: Prefix =
            a.prefix
                .parse()
                .map_err(|e: portkeep_server::prefix::PrefixError| {
                    invalid(key("prefix"), e.to_string())
                })?;
        let c = index(&a.class).ok_or_else(|| {
            invalid(
                key("class"),
                format!("no class `{}` (defined: {})", a.class, names()),
            )
        })?;
        if assign.iter().any(|(p, _)| *p == prefix) {
            return Err(invalid(
                key("prefix"),
                format!("{prefix} is assigned twice"),
            ));
        }
        // A class belongs to a whole subscriber: a prefix narrower than
        // the subscribers it falls in would never match one (and must not
        // split one), unless it covers named subscribers of its length.
        let family_len = if prefix.addr().is_ipv4() {
            ipv4_prefix_len
        } else {
            ipv6_prefix_len
        };
        let covers_named = named
            .iter()
            .any(|n| n.prefix.len() >= prefix.len() && prefix.contains(n.prefix.addr()));
        if prefix.len() > family_len && !covers_named {
            return Err(invalid(
                key("prefix"),
                format!(
                    "{prefix} is narrower than a subscriber (/{family_len}), so it would match none; \
                     classes apply to whole subscribers"
                ),
            ));
        }
        assign.push((prefix, c));
    }
    Ok(CheckpointPolicy {
        max_mappings,
        classes,
        default_class,
        assign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    fn ok(text: &str) -> crate::config::Settings {
        ConfigFile::parse(text, "test.toml")
            .and_then(ConfigFile::validate)
            .unwrap_or_else(|e| panic!("rejected: {e}\n{text}"))
    }

    fn err(text: &str) -> String {
        match ConfigFile::parse(text, "test.toml").and_then(ConfigFile::validate) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rfc7767_s3_2_default_policy_restricts_number_and_rate() {
        let s = ok("");
        let p = &s.server.checkpoint;
        assert_eq!(p.max_mappings, 100_000);
        assert_eq!(p.classes.len(), 1);
        assert_eq!(p.classes[0].mode, CheckpointMode::OnRequest);
        assert_eq!(p.classes[0].max, Some(64));
        assert!(p.classes[0].rate.is_some());
    }

    #[test]
    fn rfc7767_s4_classes_and_assignments_parse() {
        let s = ok(r#"
[subscribers]
ipv4_prefix_len = 32

[[subscribers.named]]
prefix = "198.51.100.0/24"
id = "cust-42"

[checkpoint]
max_mappings = 5000
default_class = "silver"

[checkpoint.classes.gold]
checkpoint = "always"

[checkpoint.classes.silver]
checkpoint = "on-request"
max = 8
rate = "1/s"
burst = 4

[checkpoint.classes.bronze]
checkpoint = "never"

[[checkpoint.assign]]
prefix = "198.51.100.0/24"
class = "gold"

[[checkpoint.assign]]
prefix = "203.0.113.0/24"
class = "bronze"
"#);
        let p = &s.server.checkpoint;
        assert_eq!(p.max_mappings, 5000);
        let silver = &p.classes[p.default_class];
        assert_eq!(silver.name, "silver");
        assert_eq!(silver.max, Some(8));
        assert_eq!(
            silver.rate,
            Some(RateLimit {
                count: 1,
                per: Duration::from_secs(1),
                burst: 4
            })
        );
        assert_eq!(p.assign.len(), 2);
        let k = &s.server.subscriber_keying;
        let sub = k.subscriber_of("198.51.100.9".parse().unwrap());
        assert_eq!(k.name_of(sub), Some("cust-42"));
        assert_eq!(p.classes[p.class_of(sub)].name, "gold");
        let other = k.subscriber_of("203.0.113.5".parse().unwrap());
        assert_eq!(p.classes[p.class_of(other)].name, "bronze");
    }

    #[test]
    fn rate_syntax_is_strict() {
        assert_eq!(parse_rate("1/s").unwrap(), (1, Duration::from_secs(1)));
        assert_eq!(parse_rate("10/min").unwrap(), (10, Duration::from_secs(60)));
        assert_eq!(
            parse_rate("500/h").unwrap(),
            (500, Duration::from_secs(3600))
        );
        for bad in [
            "",
            "1",
            "/s",
            "1/",
            "0/s",
            "1.5/s",
            "-1/s",
            "+1/s",
            " 1/s",
            "1 /s",
            "1/sec",
            "1/m",
            "1/S",
            "1/s ",
            "1/2s",
            "99999999999/s",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn checkpoint_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[checkpoint]\nmax_mappings = 0", "`checkpoint.max_mappings`"),
            ("[checkpoint]\nmax_mapings = 1", "unknown field `max_mapings`"),
            ("[checkpoint]\ndefault_class = \"gold\"", "`checkpoint.default_class`: no class `gold`"),
            (
                "[checkpoint.classes.gold]\ncheckpoint = \"sometimes\"",
                "`checkpoint.classes.gold.checkpoint`",
            ),
            ("[checkpoint.classes.gold]\nmax = 3", "`checkpoint.classes.gold.checkpoint`: is required"),
            (
                "[checkpoint.classes.gold]\ncheckpoint = \"always\"\nmax = 3",
                "`checkpoint.classes.gold.max`: only applies",
            ),
            (
                "[checkpoint.classes.b]\ncheckpoint = \"never\"\nrate = \"1/s\"",
                "`checkpoint.classes.b.rate`",
            ),
            (
                "[checkpoint.classes.s]\ncheckpoint = \"on-request\"\nrate = \"fast\"",
                "`checkpoint.classes.s.rate`: `fast` is not a rate",
            ),
            (
                "[checkpoint.classes.s]\ncheckpoint = \"on-request\"\nburst = 3",
                "`checkpoint.classes.s.burst`: needs a `rate`",
            ),
            (
                "[checkpoint.classes.s]\ncheckpoint = \"on-request\"\nrate = \"1/s\"\nburst = 0",
                "`checkpoint.classes.s.burst`",
            ),
            (
                "[checkpoint.classes.s]\ncheckpoint = \"on-request\"\nmax = 0",
                "`checkpoint.classes.s.max`",
            ),
            (
                "[checkpoint.classes.s]\ncheckpoint = \"on-request\"\nmaxx = 1",
                "key `checkpoint.classes.s.maxx`",
            ),
            (
                "[checkpoint.classes.a]\ncheckpoint = \"never\"\n[checkpoint.classes.b]\ncheckpoint = \"always\"",
                "`checkpoint.default_class`: is required",
            ),
            (
                "[[checkpoint.assign]]\nprefix = \"10.0.0.0/8\"\nclass = \"gold\"",
                "`checkpoint.assign[0].class`: no class `gold`",
            ),
            (
                "[[checkpoint.assign]]\nprefix = \"10.0.0.0/88\"\nclass = \"default\"",
                "`checkpoint.assign[0].prefix`",
            ),
            (
                "[[checkpoint.assign]]\nprefix = \"10.0.0.0/8\"\nclass = \"default\"\n[[checkpoint.assign]]\nprefix = \"10.0.0.0/8\"\nclass = \"default\"",
                "`checkpoint.assign[1].prefix`: 10.0.0.0/8 is assigned twice",
            ),
            (
                "[subscribers]\nipv6_prefix_len = 56\n[[checkpoint.assign]]\nprefix = \"2001:db8::/64\"\nclass = \"default\"",
                "narrower than a subscriber",
            ),
            (
                "[[subscribers.named]]\nprefix = \"banana\"\nid = \"x\"",
                "`subscribers.named[0].prefix`",
            ),
            (
                "[[subscribers.named]]\nprefix = \"10.0.0.0/8\"\nid = \"\"",
                "`subscribers.named[0].id`",
            ),
            (
                "[[subscribers.named]]\nprefix = \"10.0.0.0/8\"\nid = \"a\"\n[[subscribers.named]]\nprefix = \"10.1.2.3/8\"\nid = \"b\"",
                "`subscribers.named[1].prefix`: 10.0.0.0/8 is already subscriber `a`",
            ),
            (
                "[[subscribers.named]]\nprefix = \"10.0.0.0/8\"\nid = \"a\"\n[[subscribers.named]]\nprefix = \"11.0.0.0/8\"\nid = \"a\"",
                "`subscribers.named[1].id`",
            ),
            (
                "[[subscribers.named]]\nprefix = \"10.0.0.0/8\"\nname = \"a\"",
                "unknown field `name`",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{text}\n  gave: {e}\n  wanted: {want}");
        }
    }

    #[test]
    fn assignment_narrower_than_keying_is_fine_for_named_subscribers() {
        let s = ok(r#"
[[subscribers.named]]
prefix = "2001:db8:0:1::/64"
id = "lab"
[[checkpoint.assign]]
prefix = "2001:db8:0:1::/64"
class = "default"
"#);
        assert_eq!(s.server.checkpoint.assign.len(), 1);
    }
}
