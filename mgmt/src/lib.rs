//! The tlsgate process: command line, configuration, start-up and offline token commands.
//!
//! The binary in `main.rs` only parses the command line and reports errors; everything else
//! lives here so integration tests can reach it.
#![forbid(unsafe_code)]

pub mod acme;
pub mod api;
pub mod appliance;
pub mod audit;
pub mod backend_tls;
pub mod cli;
pub mod config;
pub mod conn_limit;
pub mod credential;
pub mod fdlimit;
pub mod files;
pub mod fleet;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod hardening;
pub mod logging;
pub mod metrics_http;
pub mod mgmt_metrics;
pub mod plain_http;
pub mod pools;
pub mod privileges;
pub mod sandbox;
pub mod serve;
pub mod snapshot;
pub mod state;
pub mod systemd;
pub mod tls;
pub mod upgrade;

/// TLS pieces that moved into `tls/`; their old paths stay for callers, tests and fuzz targets.
pub use tls::{client_auth, ocsp, policy, session};
