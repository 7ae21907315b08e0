//! `[api]` and `[state]`: where the management API listens and who may use it, and the state
//! directory. Plain data and the load-time checks; the API itself (`crate::api`) reads them.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tlsgate";
/// Default unix socket mode: the owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// Unix socket permissions (0o600 or 0o660).
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// HTTPS address.
    pub listen: Option<SocketAddr>,
    /// The HTTPS server's chain (PEM, leaf first).
    pub cert: Option<PathBuf>,
    /// The HTTPS server's key: `file:PATH` or `pkcs11:` URI.
    pub key: Option<String>,
    /// The management CA (PEM): HTTPS clients need a certificate it issued.
    pub client_ca: Option<PathBuf>,
    /// Audit log path (default: `audit.log` in the state directory).
    pub audit_log: Option<PathBuf>,
    /// Unix-socket peers (SO_PEERCRED) allowed by uid; default: root and the service's own uid.
    pub socket_uids: Option<Vec<u32>>,
    /// Unix-socket peers allowed by (effective) gid; default: the service's own group.
    pub socket_gids: Option<Vec<u32>>,
    /// Connections held at most, per listener (socket, HTTPS); past it a new one replaces the
    /// oldest idle one.
    #[serde(default = "crate::config::default_max_connections")]
    pub max_connections: usize,
    /// Accept `POST /v1/keys/import` over HTTPS too. Off by default: over HTTPS the key bytes
    /// pass through rustls's record buffers and the kernel's, which are freed unwiped, so they
    /// may linger in memory; over the unix socket they are read only into wiped, non-dumpable
    /// memory. Read at start.
    #[serde(default)]
    pub danger_allow_key_import_over_https: bool,
}

fn default_socket_mode() -> u32 {
    DEFAULT_SOCKET_MODE
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of certificates, bindings and CRLs (created 0700).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

/// Cross-field checks of `[api]` and `[state]`, run by [`Config::parse`].
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let invalid = |key: &str, why: String| ConfigError::Invalid {
        path: config.path.clone(),
        key: key.to_owned(),
        why,
    };
    let Some(api) = &config.api else {
        return Ok(());
    };
    if api.socket.is_none() && api.listen.is_none() {
        return Err(invalid(
            "api",
            "set `socket` (unix socket) and/or `listen` (HTTPS with client certificates)".into(),
        ));
    }
    if api.socket_mode & !0o660 != 0 || api.socket_mode & 0o600 != 0o600 {
        return Err(invalid(
            "api.socket_mode",
            format!(
                "{:#o}: use 0o600 (owner) or 0o660 (owner and group); others never get access",
                api.socket_mode
            ),
        ));
    }
    if let Some(listen) = api.listen {
        for (k, v) in [
            ("api.cert", api.cert.is_some()),
            ("api.key", api.key.is_some()),
            ("api.client_ca", api.client_ca.is_some()),
        ] {
            if !v {
                return Err(invalid(
                    k,
                    "needed with api.listen: HTTPS always authenticates clients by certificate"
                        .into(),
                ));
            }
        }
        if let Some(key) = &api.key {
            key.parse::<tlsgate_keystore::KeyRef>()
                .map_err(|e| invalid("api.key", format!("{e}; use a pkcs11: URI or file:PATH")))?;
        }
        for (i, l) in config.listeners.iter().enumerate() {
            if l.bind == listen && listen.port() != 0 {
                return Err(invalid(
                    "api.listen",
                    format!(
                        "{listen} is also listener[{i}].bind: the API never shares a TLS listener"
                    ),
                ));
            }
        }
        if let Some(m) = &config.metrics {
            if m.listen == listen && listen.port() != 0 {
                return Err(invalid(
                    "api.listen",
                    format!("{listen} is also metrics.listen"),
                ));
            }
        }
    }
    Ok(())
}

/// The state directory this configuration uses, if the management plane is on.
pub fn state_dir(config: &Config) -> Option<PathBuf> {
    match (&config.state, &config.api) {
        (Some(s), _) => Some(config.resolve(&s.dir)),
        (None, Some(_)) => Some(PathBuf::from(DEFAULT_STATE_DIR)),
        (None, None) => None,
    }
}
