//! The configuration error and its constructor, shared by `config` and
//! the section modules it validates through (`checkpoint_config`,
//! `ha_config`), so that those depend on this leaf rather than back on
//! `config`.

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value of the right type but wrong meaning.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// What was expected.
        message: String,
    },
}

/// A [`ConfigError::Invalid`] for the dotted key `key`.
pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}
