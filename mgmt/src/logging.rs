//! Log set-up: `tracing` to stderr, filtered by `TLSGATE_LOG` (default [`DEFAULT_FILTER`]).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `info` for everything, except cryptoki's complaint about each mechanism number it has no
/// name for, which it logs at error level on every token open (SoftHSM2 lists 40 of them), and
/// rustls, which logs every alert it sends at WARN: those are what peers do wrong, counted by
/// reason in `tlsgate_connections_closed_total` and logged by the data plane at debug
/// (rate-limited). `TLSGATE_LOG=info,rustls=debug` brings rustls's lines back.
pub const DEFAULT_FILTER: &str = "info,cryptoki::mechanism=off,rustls=error";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("TLSGATE_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second initialisation (tests calling into the library twice) keeps the first subscriber.
    drop(result);
}
