//! Log set-up: `tracing` to stderr, filtered by `TLSGATE_LOG` (default [`DEFAULT_FILTER`]).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `info` for everything, except cryptoki's complaint about each mechanism number it has no
/// name for, which it logs at error level on every token open (SoftHSM2 lists 40 of them), and
/// rustls, which logs every alert it sends at WARN: those are what peers do wrong, counted by
/// reason in `tlsgate_connections_closed_total` and logged by the data plane at debug
/// (rate-limited). `TLSGATE_LOG=info,rustls=debug` brings rustls's lines back.
pub const DEFAULT_FILTER: &str = "info,cryptoki::mechanism=off,rustls=error";

/// Added to a `TLSGATE_LOG` that does not name cryptoki itself, so `TLSGATE_LOG=debug` does not
/// bring the 30-odd ERROR lines back (the token's mechanisms are logged once, at info).
const QUIET_MECHANISM_PROBE: &str = "cryptoki::mechanism=off";

/// The filter for a `TLSGATE_LOG` value (or the default when unset or invalid).
fn filter(env: Option<&str>) -> EnvFilter {
    match env.map(|v| (v, EnvFilter::try_new(v))) {
        Some((v, Ok(f))) if v.contains("cryptoki") => f,
        Some((_, Ok(f))) => match QUIET_MECHANISM_PROBE.parse() {
            Ok(d) => f.add_directive(d),
            Err(_) => f,
        },
        _ => EnvFilter::new(DEFAULT_FILTER),
    }
}

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
    let filter = filter(std::env::var("TLSGATE_LOG").ok().as_deref());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mechanism_probe_stays_quiet_unless_cryptoki_is_named() {
        for env in [
            None,
            Some("debug"),
            Some("info,tlsgate=trace"),
            Some("not a filter (("),
        ] {
            let f = filter(env).to_string();
            assert!(f.contains("cryptoki::mechanism=off"), "{env:?}: {f}");
        }
        let f = filter(Some("cryptoki=debug")).to_string();
        assert!(!f.contains("cryptoki::mechanism=off"), "{f}");
    }
}
