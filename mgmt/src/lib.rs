//! The tlsgate process: command line, configuration, start-up and offline token commands.
//!
//! The binary in `main.rs` only parses the command line and reports errors; everything else
//! lives here so integration tests can reach it.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod backend_tls;
pub mod cli;
pub mod client_auth;
pub mod config;
pub mod conn_limit;
pub mod fdlimit;
pub mod files;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod hardening;
pub mod http_head;
pub mod logging;
pub mod metrics_http;
pub mod mgmt_metrics;
pub mod ocsp;
pub mod policy;
pub mod privileges;
pub mod serve;
pub mod session;
pub mod state;
pub mod tls;
