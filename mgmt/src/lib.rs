//! The tlsgate process: command line, configuration, start-up and offline token commands.
//!
//! The binary in `main.rs` only parses the command line and reports errors; everything else
//! lives here so integration tests can reach it.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod files;
pub mod http_head;
pub mod logging;
pub mod metrics_http;
pub mod mgmt_metrics;
pub mod serve;
pub mod state;
pub mod tls;
