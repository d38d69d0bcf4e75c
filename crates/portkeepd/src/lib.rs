//! The Portkeep PCP server daemon: configuration, the UDP runtime around
//! the sans-IO core in `portkeep-server`, and process concerns (logging,
//! signals). The binary `portkeepd` is a thin wrapper; tests and the
//! benchmark start a [`runtime::Daemon`] in-process.

pub mod bounded;
pub mod checkpoint_config;
pub mod clock;
pub mod config;
pub mod config_error;
pub mod control;
#[cfg(feature = "etcd")]
mod coordinator;
pub mod ha_config;
pub mod link;
pub mod metrics;
pub mod mmsg;
pub mod nfnl;
pub mod nft;
pub mod node;
pub mod pair;
pub mod replica;
pub mod runtime;
pub mod store;
pub mod wal;

pub use config::{ConfigError, ConfigFile, Settings};
pub use runtime::Daemon;
