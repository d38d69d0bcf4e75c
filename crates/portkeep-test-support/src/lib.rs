//! Helpers shared by the integration tests of the Portkeep crates. A
//! development dependency only; never published.
//!
//! - [`skip`]: what a test does when this machine cannot run it: under CI
//!   it fails, naming what is missing; elsewhere it says so and records the
//!   skip in the file named by `PORTKEEP_SKIP_LOG`.
//! - [`netns`]: `ip`, commands in a namespace, a thread that joins one, and
//!   [`netns::Lab`], a set of namespaces removed on drop.
//! - [`process`]: the clock, polling, the binaries cargo built, a
//!   `portkeepd` process asked through `ctl`, and the agent's socket.
//! - [`pcp`]: raw PCP requests over UDP.
//! - [`daemon`]: `portkeepd` on loopback ports, and the `portkeep` CLI.
//! - [`keepalived`]: an active/backup pair under keepalived in namespaces.
//! - [`etcd`]: a real etcd cluster on loopback.
//! - [`flood`]: a hostile load (random, quota-exhausting, NEXT walks,
//!   oversized, unauthorised THIRD_PARTY) and a process's memory.
//!
//! Binary paths come from the calling test (`env!("CARGO_BIN_EXE_...")`
//! exists only in the crate that owns the binary), as [`process::Bins`].

// Test helpers: a failed setup fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

pub mod capture;
pub mod daemon;
pub mod etcd;
pub mod flood;
pub mod keepalived;
pub mod netns;
pub mod pcp;
pub mod process;
pub mod skip;
